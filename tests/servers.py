"""Throwaway real servers for integration tests.

Each function returns a running :class:`Server` (``host``, ``port``,
``stop()``, ``start()`` to restart it on the same port) or raises
``SkipTest`` with the reason — except under ``MSGD_REQUIRE_SERVERS=1`` (CI),
where a missing server is an error, so the test fails instead of skipping.

Order of preference for each: an address from the environment, else a
private instance started from the Debian binary in a temp dir, else (for
machine-wide services that are slow to start) the machine's own instance on
its standard port.

==========  =========================  ======================================
server      environment variable       private instance
==========  =========================  ======================================
Redis       MSGD_TEST_REDIS=host:port  redis-server, no persistence
Redis       (none: private only)       redis_cluster(): three masters,
Cluster                                cluster-enabled redis-servers
LDAP        MSGD_TEST_LDAP=host:port   slapd with a generated slapd.conf
POP3        (none: needs its users)    dovecot with a passwd-file
STOMP       MSGD_TEST_STOMP=host:port  the machine's RabbitMQ (rabbitmq_stomp)
PostgreSQL  MSGD_TEST_POSTGRES=DSN     the machine's PostgreSQL (trust auth)
nginx       (none: needs its config)   nginx (nginx-light) with a given config
HAProxy     (none: needs its config)   haproxy with a given config
==========  =========================  ======================================
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import unittest
from dataclasses import dataclass, field

REQUIRE = os.environ.get("MSGD_REQUIRE_SERVERS") == "1"


def unavailable(reason: str):
    """Skip, or under MSGD_REQUIRE_SERVERS=1 fail, for a missing server."""
    if REQUIRE:
        raise RuntimeError(f"required test server unavailable: {reason}")
    raise unittest.SkipTest(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_port(host: str, port: int, timeout: float = 10.0, proc=None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_open(host, port):
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening on {port}")
        time.sleep(0.02)
    raise RuntimeError(f"nothing listening on {host}:{port} after {timeout}s")


def which(name: str, *extra_dirs: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for d in ("/usr/sbin", "/usr/local/sbin", *extra_dirs):
        p = os.path.join(d, name)
        if os.access(p, os.X_OK):
            return p
    return None


def _env_addr(var: str) -> tuple[str, int] | None:
    value = os.environ.get(var)
    if not value:
        return None
    host, _, port = value.rpartition(":")
    return host or "127.0.0.1", int(port)


@dataclass
class Server:
    """A server; ``own`` ones can be stopped and started again on the same
    port (for outage tests)."""
    name: str
    host: str
    port: int
    dir: str | None = None
    argv: list = field(default_factory=list)
    own: bool = False
    proc: subprocess.Popen | None = None
    pidfile: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> "Server":
        if not self.own:
            raise RuntimeError(f"{self.name} at {self.address} is not ours to start")
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     cwd=self.dir, start_new_session=True)
        try:
            wait_port(self.host, self.port, timeout, self.proc if not self.pidfile else None)
        except RuntimeError:
            err = self.proc.stderr.read().decode(errors="replace") if self.proc.poll() is not None else ""
            self.cleanup()
            raise RuntimeError(f"{self.name} did not start: {err.strip()[-500:]}") from None
        return self

    def _pid(self) -> int | None:
        if self.pidfile and os.path.exists(self.pidfile):
            try:
                return int(open(self.pidfile).read().split()[0])
            except (ValueError, IndexError):
                return None
        return None

    def stop(self, sig=signal.SIGTERM) -> None:
        if not self.own:
            return
        pid = self._pid()
        if pid:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        deadline = time.monotonic() + 5
        while port_open(self.host, self.port) and time.monotonic() < deadline:
            time.sleep(0.02)
        if self.proc is not None and self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None

    def signal(self, sig) -> None:
        """Send ``sig`` to an own server's process: ``SIGSTOP`` freezes it
        with its connections open (a hung server), ``SIGCONT`` resumes it."""
        if not self.own or self.proc is None:
            raise RuntimeError(f"{self.name} at {self.address} is not ours to signal")
        os.kill(self.proc.pid, sig)

    def cleanup(self) -> None:
        if self.own and self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)      # a frozen one must hear the SIGTERM
        self.stop()
        if self.own and self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)


# -- Redis ---------------------------------------------------------------------

def redis(own: bool = True, tls: tuple = ()) -> Server:
    """A private redis-server (``own=False`` accepts MSGD_TEST_REDIS or the
    machine's instance on 6379, for tests that never stop it).  ``tls``: the
    names (e.g. ``("127.0.0.1",)``) of the certificate, from a test CA
    (``extra['ca']``, PEM), it then serves TLS only with."""
    addr = _env_addr("MSGD_TEST_REDIS")
    if addr and not own:
        return Server("redis", *addr)
    binary = which("redis-server")
    if binary is None:
        if not own and port_open("127.0.0.1", 6379):
            return Server("redis", "127.0.0.1", 6379)
        unavailable("redis-server is not installed (Debian package redis-server)")
    d = tempfile.mkdtemp(prefix="msgd-redis-")
    port = free_port()
    argv = [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
            "--dir", d, "--daemonize", "no", "--logfile", os.path.join(d, "redis.log")]
    extra = {}
    if tls:
        from msgd.security.tls import make_ca, make_cert
        ca = make_ca(d)
        cert = make_cert(ca, d, "server", tls[0], hosts=tls)
        argv[3:5] = ["--port", "0", "--tls-port", str(port), "--tls-cert-file", cert["cert"],
                     "--tls-key-file", cert["key"], "--tls-ca-cert-file", ca["cert"], "--tls-auth-clients", "no"]
        extra = {"ca": ca["cert"]}
    srv = Server("redis", "127.0.0.1", port, dir=d, own=True, argv=argv, extra=extra)
    return srv.start()


def cli(server: Server, *args: str) -> str:
    """Run ``redis-cli`` against ``server`` (a Redis, or a node of a
    :class:`RedisCluster`); returns its output, stripped."""
    out = subprocess.run([which("redis-cli"), "-h", server.host, "-p", str(server.port), *args],
                         check=True, capture_output=True, text=True, timeout=30)
    return out.stdout.strip()


def free_bus_port() -> int:
    """A free port P whose cluster bus port P + 10000 is free too."""
    for _ in range(100):
        port = free_port()
        if port + 10000 <= 65535 and not port_open("127.0.0.1", port + 10000):
            try:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port + 10000))
                return port
            except OSError:
                pass
    raise RuntimeError("no free port with a free cluster bus port")


@dataclass
class RedisCluster:
    """A private Redis Cluster: ``nodes`` are its masters (each a
    :class:`Server` that can be stopped and started again), ``seeds`` their
    ``host:port``."""
    nodes: list
    dir: str

    @property
    def seeds(self) -> list[str]:
        return [n.address for n in self.nodes]

    def cleanup(self) -> None:
        for n in self.nodes:
            n.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def redis_cluster(masters: int = 3, timeout: float = 20.0) -> RedisCluster:
    """A throwaway Redis Cluster of ``masters`` masters and no replicas, on
    loopback ports, created with ``redis-cli --cluster create``; returns once
    every node says ``cluster_state:ok``."""
    binary, cli_binary = which("redis-server"), which("redis-cli")
    if binary is None or cli_binary is None:
        unavailable("redis-server/redis-cli are not installed (Debian package redis-server)")
    d = tempfile.mkdtemp(prefix="msgd-redis-cluster-")
    nodes = []
    cluster = RedisCluster(nodes, d)
    try:
        for i in range(masters):
            nd = os.path.join(d, str(i))
            os.makedirs(nd)
            port = free_bus_port()
            argv = [binary, "--bind", "127.0.0.1", "--port", str(port), "--cluster-enabled", "yes",
                    "--cluster-config-file", os.path.join(nd, "nodes.conf"), "--cluster-node-timeout", "2000",
                    "--save", "", "--appendonly", "no", "--dir", nd, "--daemonize", "no",
                    "--logfile", os.path.join(nd, "redis.log")]
            nodes.append(Server("redis-cluster", "127.0.0.1", port, dir=nd, own=True, argv=argv).start())
        subprocess.run([cli_binary, "--cluster", "create", *cluster.seeds, "--cluster-yes"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60)
        deadline = time.monotonic() + timeout
        while not all("cluster_state:ok" in cli(n, "cluster", "info") for n in nodes):
            if time.monotonic() > deadline:
                raise RuntimeError(f"Redis Cluster not ok after {timeout}s")
            time.sleep(0.05)
    except BaseException:
        cluster.cleanup()
        raise
    return cluster


# -- LDAP ----------------------------------------------------------------------

SLAPD_CONF = """\
include {schema}/core.schema
include {schema}/cosine.schema
include {schema}/inetorgperson.schema
include {schema}/nis.schema
pidfile {dir}/slapd.pid
argsfile {dir}/slapd.args
modulepath /usr/lib/ldap
moduleload back_mdb
database mdb
maxsize 104857600
suffix "{suffix}"
rootdn "cn=admin,{suffix}"
rootpw {password}
directory {dir}/data
index objectClass eq
index uid eq
index member eq
"""


SLAPD_TLS = """\
TLSCACertificateFile {ca}
TLSCertificateFile {cert}
TLSCertificateKeyFile {key}
"""


def slapd(suffix: str = "dc=example,dc=org", password: str = "secret", ldif: str = "", tls: bool = False,
          tls_hosts=("127.0.0.1", "localhost")) -> Server:
    """A private slapd with ``suffix``; ``ldif`` is added with ldapadd.
    ``extra``: ``base``, ``bind_dn``, ``password``.
    ``tls``: always a private slapd (MSGD_TEST_LDAP is not used), with a
    certificate for ``tls_hosts`` from a test CA: StartTLS on the
    plain port and LDAPS on ``extra['tls_port']`` (``extra['ldaps_url']``);
    ``extra['ca']`` is the CA's PEM file, ``extra['ca_info']`` what
    msgd.security.tls.make_ca returned (to sign more certificates)."""
    addr = _env_addr("MSGD_TEST_LDAP")
    if addr and not tls:
        return Server("slapd", *addr, extra={"base": suffix, "bind_dn": f"cn=admin,{suffix}", "password": password})
    binary, ldapadd = which("slapd"), which("ldapadd")
    if binary is None or ldapadd is None:
        unavailable("slapd/ldapadd are not installed (Debian packages slapd, ldap-utils)")
    d = tempfile.mkdtemp(prefix="msgd-slapd-")
    os.makedirs(os.path.join(d, "data"))
    port = free_port()
    url = f"ldap://127.0.0.1:{port}/"
    extra = {"base": suffix, "bind_dn": f"cn=admin,{suffix}", "password": password, "url": url}
    listen = url
    with open(os.path.join(d, "slapd.conf"), "w") as f:
        if tls:
            from msgd.security.tls import make_ca, make_cert
            ca = make_ca(d)
            cert = make_cert(ca, d, "slapd", tls_hosts[0], hosts=tls_hosts)
            f.write(SLAPD_TLS.format(ca=ca["cert"], cert=cert["cert"], key=cert["key"]))
            tls_port = free_port()
            extra.update(tls_port=tls_port, ca=ca["cert"], ca_info=ca, ldaps_url=f"ldaps://127.0.0.1:{tls_port}/")
            listen = f"{url} {extra['ldaps_url']}"
        f.write(SLAPD_CONF.format(schema="/etc/ldap/schema", dir=d, suffix=suffix, password=password))
    srv = Server("slapd", "127.0.0.1", port, dir=d, own=True, pidfile=os.path.join(d, "slapd.pid"),
                 argv=[binary, "-d", "0", "-f", os.path.join(d, "slapd.conf"), "-h", listen], extra=extra)
    srv.start()
    if tls:
        try:
            wait_port("127.0.0.1", extra["tls_port"], 10.0)
        except RuntimeError:
            srv.cleanup()
            raise
    dc = suffix.split(",")[0].split("=")[1]
    base = f"dn: {suffix}\nobjectClass: dcObject\nobjectClass: organization\no: {dc}\ndc: {dc}\n"
    _ldapadd(srv, base + ("\n" + ldif if ldif else ""))
    return srv


def _ldapadd(srv: Server, ldif: str) -> None:
    subprocess.run([which("ldapadd"), "-x", "-H", f"ldap://127.0.0.1:{srv.port}/", "-D", srv.extra["bind_dn"],
                    "-w", srv.extra["password"]], input=ldif.encode(), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=30)


PEOPLE_BASE = "dc=example,dc=org"
# two people (ann, bob) and two groups (admins: ann; staff: both), for slapd(ldif=...)
PEOPLE_LDIF = f"""\
dn: ou=people,{PEOPLE_BASE}
objectClass: organizationalUnit
ou: people

dn: ou=groups,{PEOPLE_BASE}
objectClass: organizationalUnit
ou: groups

dn: uid=ann,ou=people,{PEOPLE_BASE}
objectClass: inetOrgPerson
uid: ann
cn: Ann Smith
sn: Smith
mail: ann@example.org
userPassword: annpw

dn: uid=bob,ou=people,{PEOPLE_BASE}
objectClass: inetOrgPerson
uid: bob
cn: Bob Jones
sn: Jones
userPassword: bobpw

dn: cn=admins,ou=groups,{PEOPLE_BASE}
objectClass: groupOfNames
cn: admins
member: uid=ann,ou=people,{PEOPLE_BASE}

dn: cn=staff,ou=groups,{PEOPLE_BASE}
objectClass: groupOfNames
cn: staff
member: uid=ann,ou=people,{PEOPLE_BASE}
member: uid=bob,ou=people,{PEOPLE_BASE}
"""

# -- POP3 ----------------------------------------------------------------------

DOVECOT_CONF = """\
protocols = pop3
listen = 127.0.0.1
ssl = {ssl}
disable_plaintext_auth = no
auth_mechanisms = plain apop
auth_failure_delay = 0
base_dir = {dir}/run
state_dir = {dir}/state
log_path = {dir}/dovecot.log
info_log_path = {dir}/dovecot.log
default_login_user = {login_user}
default_internal_user = {internal_user}
default_internal_group = {group}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {dir}/passwd
}}
userdb {{
  driver = static
  args = uid={user} gid={group} home={dir}/home/%u
}}
mail_location = maildir:~/Maildir
pop3_uidl_format = %g
service pop3-login {{
  inet_listener pop3 {{
    address = 127.0.0.1
    port = {port}
  }}
}}
service anvil {{
  chroot =
}}
service pop3-login {{
  chroot =
}}
"""


DOVECOT_TLS = """\
ssl_cert = <{dir}/cert.pem
ssl_key = <{dir}/key.pem
service pop3-login {{
  inet_listener pop3s {{
    address = 127.0.0.1
    port = {tls_port}
    ssl = yes
  }}
}}
"""


def dovecot(users: dict[str, str] | None = None, tls: bool = False) -> Server:
    """A private dovecot serving POP3 for ``users`` ({name: password}).
    ``extra['maildir'](user)`` is the user's Maildir, to deliver into.
    ``tls``: STLS on the plain port and POP3S on ``extra['tls_port']``, with
    a self-signed certificate for 127.0.0.1 in ``extra['ca']`` (a PEM file,
    alone in its directory ``extra['ca_dir']``)."""
    binary = which("dovecot")
    if binary is None:
        unavailable("dovecot is not installed (Debian packages dovecot-core, dovecot-pop3d)")
    users = users or {"alice": "secret"}
    d = tempfile.mkdtemp(prefix="msgd-dovecot-")
    os.chmod(d, 0o755)
    for sub in ("run", "state", "home"):
        os.makedirs(os.path.join(d, sub))
    import grp
    import pwd
    if os.getuid() == 0:
        # dovecot refuses to run its login processes as root: use the package's
        # users, and let mail belong to nobody
        login_user, internal_user, me, group = "dovenull", "dovecot", "nobody", "nogroup"
    else:
        me = login_user = internal_user = pwd.getpwuid(os.getuid()).pw_name
        group = grp.getgrgid(os.getgid()).gr_name
    with open(os.path.join(d, "passwd"), "w") as f:
        for u, p in users.items():
            f.write(f"{u}:{{PLAIN}}{p}::::::\n")
    owner = (pwd.getpwnam(me).pw_uid, grp.getgrnam(group).gr_gid)
    for u in users:
        for sub in ("", "Maildir", "Maildir/cur", "Maildir/new", "Maildir/tmp"):
            p = os.path.join(d, "home", u, sub)
            os.makedirs(p, exist_ok=True)
            os.chown(p, *owner)
    port = free_port()
    extra = {"users": users, "maildir": lambda u: os.path.join(d, "home", u, "Maildir"), "owner": owner}
    conf = os.path.join(d, "dovecot.conf")
    with open(conf, "w") as f:
        f.write(DOVECOT_CONF.format(dir=d, port=port, user=me, group=group, ssl="yes" if tls else "no",
                                    login_user=login_user, internal_user=internal_user))
        if tls:
            openssl = which("openssl")
            if openssl is None:
                unavailable("openssl is not installed (Debian package openssl)")
            os.makedirs(os.path.join(d, "ca"))
            subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
                            "-keyout", os.path.join(d, "key.pem"), "-out", os.path.join(d, "cert.pem")],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
            shutil.copy(os.path.join(d, "cert.pem"), os.path.join(d, "ca", "ca.pem"))
            extra.update(tls_port=free_port(), ca=os.path.join(d, "ca", "ca.pem"), ca_dir=os.path.join(d, "ca"))
            f.write(DOVECOT_TLS.format(dir=d, tls_port=extra["tls_port"]))
    srv = Server("dovecot", "127.0.0.1", port, dir=d, own=True, pidfile=os.path.join(d, "run", "master.pid"),
                 argv=[binary, "-F", "-c", conf], extra=extra)
    return srv.start()


def deliver(srv: Server, user: str, message: bytes) -> str:
    """Put ``message`` into ``user``'s Maildir (as a local delivery agent
    would); returns its file name."""
    md = srv.extra["maildir"](user)
    name = f"{time.time_ns()}.{os.getpid()}.msgd"
    tmp = os.path.join(md, "tmp", name)
    with open(tmp, "wb") as f:
        f.write(message)
    os.chown(tmp, *srv.extra["owner"])
    os.rename(tmp, os.path.join(md, "new", name))
    return name


# -- STOMP (RabbitMQ) ------------------------------------------------------------

def stomp_broker() -> Server:
    """RabbitMQ's STOMP listener: MSGD_TEST_STOMP, else the machine's
    RabbitMQ on 61613 (the plugin is enabled when it is off)."""
    addr = _env_addr("MSGD_TEST_STOMP") or ("127.0.0.1", 61613)
    if port_open(*addr):
        return Server("rabbitmq-stomp", *addr, extra={"login": "guest", "passcode": "guest", "vhost": "/"})
    plugins = which("rabbitmq-plugins")
    if plugins and port_open("127.0.0.1", 5672):
        subprocess.run([plugins, "enable", "--quiet", "rabbitmq_stomp"], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=60)
        try:
            wait_port(*addr, timeout=20)
            return Server("rabbitmq-stomp", *addr, extra={"login": "guest", "passcode": "guest", "vhost": "/"})
        except RuntimeError:
            pass
    unavailable(f"no STOMP broker at {addr[0]}:{addr[1]} (RabbitMQ with rabbitmq_stomp)")


# -- PostgreSQL --------------------------------------------------------------------

def postgres() -> Server:
    """MSGD_TEST_POSTGRES (a libpq DSN), else the machine's PostgreSQL on
    5432.  ``extra['dsn']`` is the DSN."""
    dsn = os.environ.get("MSGD_TEST_POSTGRES")
    if dsn:
        return Server("postgres", "", 0, extra={"dsn": dsn})
    if port_open("127.0.0.1", 5432):
        return Server("postgres", "127.0.0.1", 5432,
                      extra={"dsn": "host=127.0.0.1 port=5432 user=postgres dbname=postgres"})
    unavailable("no PostgreSQL at 127.0.0.1:5432 and MSGD_TEST_POSTGRES is not set")


# -- reverse proxies (nginx, HAProxy) -----------------------------------------------

NGINX_CONF = """\
daemon off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log notice;
{user}
events { worker_connections 512; }
http {
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
{http}
}
"""


def _configured(name: str, package: str, conf: str, port: int, argv) -> Server:
    """A private ``name`` started in the foreground as ``argv(binary, dir,
    conf_path)``, ``conf`` (a template of ``{dir}``) in its temp dir."""
    binary = which(name)
    if binary is None:
        unavailable(f"{name} is not installed (Debian package {package})")
    d = tempfile.mkdtemp(prefix=f"msgd-{name}-")
    path = os.path.join(d, name + ".conf")
    with open(path, "w") as f:
        f.write(conf.replace("{dir}", d))
    return Server(name, "127.0.0.1", port, dir=d, own=True, argv=argv(binary, d, path)).start()


def nginx(http_conf: str, port: int) -> Server:
    """A private nginx whose ``http { }`` block holds ``http_conf`` (which
    listens on ``port``)."""
    # run as root (CI), its workers would switch to nobody, who cannot enter the temp dir
    conf = NGINX_CONF.replace("{user}", "user root;" if os.geteuid() == 0 else "").replace("{http}", http_conf)
    return _configured("nginx", "nginx-light", conf, port,
                       lambda binary, d, path: [binary, "-p", d, "-c", path, "-e", os.path.join(d, "error.log")])


def haproxy(conf: str, port: int) -> Server:
    """A private HAProxy running ``conf`` (which listens on ``port``) in
    the foreground."""
    return _configured("haproxy", "haproxy", conf, port, lambda binary, d, path: [binary, "-f", path, "-db"])
