"""Credential checkers (:mod:`twisted.cred`): a bcrypt password file and
LDAP search-then-bind through the node's LDAP adapter.

Both implement :class:`ICredentialsChecker` for ``IUsernamePassword`` and
answer with a :class:`Principal` as the avatar id, or fail with
:class:`UnauthorizedLogin`.  bcrypt runs in the node's thread pool (it takes
tens of milliseconds on purpose); the LDAP adapter runs ldap3 in its own.

Password file: one ``user:bcrypt-hash[:role,role...]`` line per user; blank
lines and ``#`` comments are skipped.  It is re-read when its modification
time changes, so ``msgd passwd`` takes effect without a restart; the check
of the file's stamp, its re-read and bcrypt run together in the node's thread
pool, never on the reactor thread.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Callable

import bcrypt
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from zope.interface import implementer

from msgd.security.principal import Principal

# compared against when the user is unknown, so that unknown users and wrong
# passwords take the same time
_DUMMY = bcrypt.hashpw(b"-", bcrypt.gensalt(4))
MAX_PASSWORD = 72       # bytes bcrypt hashes; bcrypt >= 5 raises for more (4 ignored the rest)


def check_password(password: str, hashed: bytes) -> bool:
    """Whether ``password`` is the one ``hashed`` was made from (blocking).
    One longer than bcrypt can hash is refused, after the same bcrypt work
    as any other wrong password."""
    secret = password.encode()
    return bcrypt.checkpw(secret[:MAX_PASSWORD], hashed) and len(secret) <= MAX_PASSWORD


def _text(v) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else v


def read_password_file(path: str) -> dict[str, tuple[bytes, frozenset]]:
    """user -> (hash, roles).  Raises ValueError naming the bad line."""
    users = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split(":")
            if len(parts) not in (2, 3) or not parts[0] or not parts[1].startswith("$2"):
                raise ValueError(f"{path}:{n}: expected user:bcrypt-hash[:roles]")
            roles = frozenset(r for r in parts[2].split(",") if r) if len(parts) == 3 else frozenset()
            users[parts[0]] = (parts[1].encode(), roles)
    return users


def set_password(path: str, user: str, password: str, roles=None, rounds: int = 12) -> None:
    """Add ``user`` or change its password (and roles when given), writing
    the file atomically with mode 0600."""
    if not user or any(c in user for c in ":\n\r") or user != user.strip():
        raise ValueError("a user name may not be empty or hold ':' or spaces at its ends")
    users = read_password_file(path) if os.path.exists(path) else {}
    old_roles = users.get(user, (b"", frozenset()))[1]
    roles = frozenset(roles) if roles is not None else old_roles
    if any(not r or any(c in r for c in ":,\n") for r in roles):
        raise ValueError("a role may not be empty or hold ':' or ','")
    if len(password.encode()) > MAX_PASSWORD:
        raise ValueError(f"a password may be at most {MAX_PASSWORD} bytes long (bcrypt hashes no more)")
    users[user] = (bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds)), roles)
    lines = [f"{u}:{h.decode()}" + (":" + ",".join(sorted(r)) if r else "") for u, (h, r) in users.items()]
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".passwd-")
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


@implementer(ICredentialsChecker)
class PasswordFileChecker:
    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, path: str, run_blocking):
        self.path = path
        self.run_blocking = run_blocking
        self._cache: tuple[tuple[int, int, int] | None, dict] = (None, {})      # (the file's stamp, its users), replaced whole

    def users(self) -> dict:
        """user -> (hash, roles), re-read when the file changed (blocking:
        called at start-up and, for logins, in ``run_blocking``)."""
        st = os.stat(self.path)
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        cached, users = self._cache
        if stamp != cached:
            users = read_password_file(self.path)
            self._cache = (stamp, users)
        return users

    def _check(self, user: str, password: str):
        """Blocking: the user's entry (or None) and whether the password is
        right; the file's stat, re-read and bcrypt all run here."""
        try:
            entry = self.users().get(user)
        except (OSError, ValueError) as e:
            raise UnauthorizedLogin(f"password file unusable: {e}") from None
        return entry, check_password(password, entry[0] if entry else _DUMMY)

    def requestAvatarId(self, credentials):
        user, password = _text(credentials.username), _text(credentials.password)

        def checked(outcome):
            entry, ok = outcome
            if not ok or entry is None:
                raise UnauthorizedLogin("wrong user or password")
            return Principal(user, entry[1], "password")
        return self.run_blocking(self._check, user, password).addCallback(checked)


@implementer(ICredentialsChecker)
class LDAPChecker:
    """Search-then-bind through ``[adapter:NAME] type = ldap``; the user's
    groups (the adapter's ``group_attribute``) become roles."""

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, adapters: Callable[[str], Any], adapter: str):
        self.adapters = adapters        # name -> adapter (Services.adapter), looked up at each login
        self.adapter = adapter

    def requestAvatarId(self, credentials):
        user, password = _text(credentials.username), _text(credentials.password)
        try:
            d = self.adapters(self.adapter).authenticate(user, password)
        except Exception:
            return defer.fail()

        def found(entry):
            if entry is None:
                raise UnauthorizedLogin("wrong user or password")
            return Principal(user, frozenset(entry.get("roles", ())), "ldap")
        return d.addCallback(found)


def passwd_main(argv: list, stdin=None, stderr=None, prog: str = "python -m msgd") -> int:
    """``msgd passwd FILE USER [--roles R1,R2]``: add USER or change its
    password (asked twice on a terminal, else read as one line of stdin)."""
    import getpass
    import sys
    stdin, stderr = stdin or sys.stdin, stderr or sys.stderr
    usage = f"usage: {prog} passwd FILE USER [--roles ROLE,ROLE]"
    if argv and argv[0] in ("-h", "--help"):
        print(usage + "\n\nAdd USER to the bcrypt password file FILE or change its password (asked twice\n"
              "on a terminal, else read as one line of stdin); --roles sets its roles.")
        return 0
    roles = None
    if "--roles" in argv:
        i = argv.index("--roles")
        if i + 1 >= len(argv):
            print("msgd passwd: --roles needs a value", file=stderr)
            return 2
        roles = [r for r in argv[i + 1].split(",") if r]
        argv = argv[:i] + argv[i + 2:]
    if len(argv) != 2:
        print(usage, file=stderr)
        return 2
    path, user = argv
    if stdin.isatty():
        password = getpass.getpass(f"password for {user}: ")
        if password != getpass.getpass("again: "):
            print("msgd passwd: the passwords differ", file=stderr)
            return 1
    else:
        password = stdin.readline().rstrip("\r\n")
    if not password:
        print("msgd passwd: empty password refused", file=stderr)
        return 1
    try:
        set_password(path, user, password, roles)
    except (OSError, ValueError) as e:
        print(f"msgd passwd: {e}", file=stderr)
        return 1
    print(f"{path}: {user} set", file=stderr)
    return 0
