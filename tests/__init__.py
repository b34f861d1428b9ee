"""msgd's test suite: run with ``python -m twisted.trial tests`` (``make test``).

A DeprecationWarning that msgd's own code causes (the warning is attributed
to a file under msgd/, apps/, tests/, bench/ or twisted/plugins/: a
deprecated API called from there) is an error in every run of the suite, so
``make test`` and CI prove there is none.  Warnings that dependencies raise
inside themselves (Twisted's, ldap3's pyasn1 use) are theirs and stay
warnings.  trial re-raises a test's warnings by file name after the test;
warnings at import time carry the module name: the filter matches both.
"""

import os
import re
import warnings

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_OWN_DIRS = ("msgd", "apps", "tests", "bench", os.path.join("twisted", "plugins"))

warnings.filterwarnings(
    "error", category=DeprecationWarning,
    module="|".join(re.escape(os.path.join(_ROOT, d) + os.sep) for d in _OWN_DIRS)
    + r"|(msgd|apps|tests|bench)(\.|$)|msgd_plugin$|msgd_endpoints$")

# Raised inside dependencies, not by msgd's use of them: shown once, never an
# error, also under ``python -W error::DeprecationWarning -m twisted.trial tests``.
for _message, _module in (
    (r"twisted\.web\.resource\._Unsafe(NoResource|ForbiddenResource)\.__init__ was deprecated", r"twisted[/.]web[/.]static"),
    (r"Passing pyOpenSSL (PKey|X509) objects is deprecated", r"OpenSSL[/.]SSL"),   # Twisted's CertificateOptions
    (r"(typeMap|tagMap) is deprecated", r"ldap3[/.]utils[/.]asn1"),                # ldap3 on pyasn1 0.6
    # Python 3.12 only: Twisted's conch checkers import spwd, reached when a
    # plugin-prefixed endpoint makes Twisted scan its plugins
    (r"'spwd' is deprecated", r"twisted[/.]conch[/.]checkers"),
):
    warnings.filterwarnings("default", message=_message, category=DeprecationWarning,
                            module=r"(.*[/.])?" + _module + r"$")
