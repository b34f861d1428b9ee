"""Security: who may connect, who is calling, what they may do.

See docs/security.rst.  Interfaces use :class:`Guard` (through
:class:`SecurityOptions` keys in their section); the node uses
:class:`Access` as the dispatcher's ``authorize`` hook.
"""

from msgd.security.access import Access
from msgd.security.guard import Guard
from msgd.security.options import SecurityOptions
from msgd.security.principal import Principal

__all__ = ["Access", "Guard", "Principal", "SecurityOptions"]
