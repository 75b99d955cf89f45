"""A real Samba Active Directory domain controller on loopback, for the directory tests.

Provisioning takes seconds, so it happens once per machine into a *golden copy* kept under the system
temp folder (keyed by :data:`RECIPE_VERSION`: change the recipe, bump the version). Each test module that
needs a DC copies the golden copy and starts ``samba -i`` on it (about a second); closing samba's stdin stops
it, and ``--maximum-runtime`` is a safety net should the test process die without closing it. Samba listens
on fixed ports, so a running DC holds a host-wide lease (an exclusive lock beside the golden copy): test
processes running side by side (pytest-xdist workers) take turns.

The domain (realm LAB.TEST, NetBIOS LAB, base DN DC=lab,DC=test):

* users ``alice`` (in Finance-Users, which is in All-Staff), ``bob`` (LayerDesk-Admins), ``carol``
  (disabled), ``dave`` (must change his password: the form an expired password takes when the
  directory says so at bind), ``erin`` (account expired), ``frank`` (locked after two bad passwords,
  through a fine-grained password policy that applies to him alone), ``gina`` (password expired: set
  400 days ago, past the domain's 42-day maximum age), the bind account ``svc-layerdesk``,
  and ``pager001``…``pager030`` (to page searches through);
* groups ``All-Staff`` ⊃ ``Finance-Users`` ⊃ alice; ``LayerDesk-Admins`` ⊃ bob;
* a TLS certificate for dc1.lab.test, localhost, 127.0.0.1 and ::1, signed by a 2048-bit test CA;
* a ``[layers]`` share (read only = no) next to the domain's own ``sysvol`` and ``netlogon``.

Samba listens on 127.0.0.1 (LDAP 389, LDAPS 636, SMB 445, Kerberos 88, …): one DC per host.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

#: Bump when anything below changes what a provisioned domain holds.
RECIPE_VERSION = 1

REALM = "LAB.TEST"
DNS_DOMAIN = "lab.test"
NETBIOS_DOMAIN = "LAB"
HOST_NAME = "dc1"
BASE_DN = "DC=lab,DC=test"
ADMIN_PASSWORD = "Adm1n!Lab-Passw0rd"
BIND_USER = "svc-layerdesk"
BIND_PASSWORD = "Bind!Lab-Passw0rd1"
PASSWORDS = {
    "alice": "Alice!Passw0rd-1",
    "bob": "Bob!Passw0rd-22",
    "carol": "Carol!Passw0rd-3",
    "dave": "Dave!Passw0rd-44",
    "erin": "Erin!Passw0rd-55",
    "frank": "Frank!Passw0rd-6",
    "gina": "Gina!Passw0rd-77",
    BIND_USER: BIND_PASSWORD,
}
PAGER_USERS = [f"pager{i:03d}" for i in range(1, 31)]
PAGER_PASSWORD = "Pager!Passw0rd-7"
#: frank is locked out after this many wrong passwords (his own password policy).
LOCKOUT_THRESHOLD = 2
LAYERS_SHARE = "layers"
PORTS = {"ldap": 389, "ldaps": 636, "smb": 445}
#: A session never runs longer than this; samba exits by itself afterwards.
MAX_RUNTIME_S = 4 * 3600
_REQUIRED_PROGRAMS = ("samba", "samba-tool", "openssl")


class SambaUnavailable(Exception):
    """The machine cannot run the test DC (packages missing, ports taken)."""


def missing_programs() -> list[str]:
    return [p for p in _REQUIRED_PROGRAMS if _which(p) is None]


def _which(program: str) -> str | None:
    return shutil.which(program, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/bin", "/sbin"]))


def cache_root() -> Path:
    return Path(tempfile.gettempdir()) / f"layerdesk-samba-dc-r{RECIPE_VERSION}"


def _run(*argv: str | Path, cwd: Path | None = None, timeout_s: float = 120) -> str:
    program = _which(str(argv[0]))
    if program is None:
        raise SambaUnavailable(f"{argv[0]} is not installed: tests/run.sh installs the Samba packages")
    done = subprocess.run([program, *map(str, argv[1:])], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout_s, stdin=subprocess.DEVNULL, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done.stdout


# --- configuration ------------------------------------------------------------------------------


def write_config(root: Path) -> Path:
    """The smb.conf of the DC whose files are under ``root`` (its paths are absolute, so a copied DC
    gets its own)."""
    for sub in ("run", "state", "cache", "private", "layers", "lock"):
        (root / sub).mkdir(exist_ok=True)
    tls = root / "tls"
    conf = root / "etc" / "smb.conf"
    conf.parent.mkdir(exist_ok=True)
    conf.write_text(f"""[global]
    netbios name = {HOST_NAME.upper()}
    realm = {REALM}
    workgroup = {NETBIOS_DOMAIN}
    server role = active directory domain controller
    # No DNS server here (provisioned with --dns-backend=NONE), so no DNS updates either.
    server services = s3fs, rpc, ldap, cldap, kdc, drepl, winbindd, ntp_signd, kcc
    interfaces = lo
    bind interfaces only = yes
    private dir = {root / 'private'}
    state directory = {root / 'state'}
    cache directory = {root / 'cache'}
    lock directory = {root / 'lock'}
    pid directory = {root / 'run'}
    ncalrpc dir = {root / 'run' / 'ncalrpc'}
    ntp signd socket directory = {root / 'run' / 'ntp_signd'}
    binddns dir = {root / 'bind-dns'}
    log file = {root / 'log.samba'}
    log level = 1
    idmap_ldb:use rfc2307 = yes
    tls enabled = yes
    tls keyfile = {tls / 'dc.key'}
    tls certfile = {tls / 'dc.crt'}
    tls cafile = {tls / 'ca.crt'}

[sysvol]
    path = {root / 'state' / 'sysvol'}
    read only = no

[netlogon]
    path = {root / 'state' / 'sysvol' / DNS_DOMAIN / 'scripts'}
    read only = no

[{LAYERS_SHARE}]
    path = {root / 'layers'}
    read only = no
""", encoding="utf-8")
    return conf


def _make_certificates(tls: Path) -> None:
    """A 2048-bit test CA and a server certificate for every name the tests reach the DC by."""
    tls.mkdir(parents=True, exist_ok=True)
    _run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "3650",
         "-keyout", tls / "ca.key", "-out", tls / "ca.crt", "-subj", "/CN=LayerDesk Test Lab CA")
    _run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-sha256", "-keyout", tls / "dc.key",
         "-out", tls / "dc.csr", "-subj", f"/CN={HOST_NAME}.{DNS_DOMAIN}")
    (tls / "dc.ext").write_text(
        f"subjectAltName = DNS:{HOST_NAME}.{DNS_DOMAIN}, DNS:localhost, IP:127.0.0.1, IP:::1\n"
        "extendedKeyUsage = serverAuth\nbasicConstraints = CA:FALSE\n", encoding="utf-8")
    _run("openssl", "x509", "-req", "-in", tls / "dc.csr", "-CA", tls / "ca.crt", "-CAkey", tls / "ca.key",
         "-CAcreateserial", "-days", "3650", "-sha256", "-extfile", tls / "dc.ext", "-out", tls / "dc.crt")
    # Samba refuses a private key that others may read.
    (tls / "dc.key").chmod(0o600)


def _populate(conf: Path) -> None:
    """Users, groups and policies, written offline into the provisioned sam.ldb."""

    def tool(*args: str) -> None:
        # ``-s CONF`` must follow the sub-command.
        _run("samba-tool", *args, "-s", conf)

    for user, password in PASSWORDS.items():
        tool("user", "create", user, password, f"--given-name={user.capitalize()}", "--surname=Lab",
             f"--mail-address={user}@{DNS_DOMAIN}")
    for user in PAGER_USERS:
        tool("user", "create", user, PAGER_PASSWORD, f"--description=paging {user}")
    tool("user", "setexpiry", BIND_USER, "--noexpiry")
    tool("user", "disable", "carol")
    for group in ("All-Staff", "Finance-Users", "LayerDesk-Admins", "Pager-Users"):
        tool("group", "add", group, f"--description={group} (LayerDesk tests)")
    tool("group", "addmembers", "Finance-Users", "alice")
    tool("group", "addmembers", "All-Staff", "Finance-Users")
    tool("group", "addmembers", "LayerDesk-Admins", "bob")
    tool("group", "addmembers", "Pager-Users", ",".join(PAGER_USERS))
    # frank alone is locked out after LOCKOUT_THRESHOLD wrong passwords; everyone else never is.
    tool("domain", "passwordsettings", "pso", "create", "lockout-fast", "1",
         f"--account-lockout-threshold={LOCKOUT_THRESHOLD}", "--account-lockout-duration=30",
         "--reset-account-lockout-after=30")
    tool("domain", "passwordsettings", "pso", "apply", "lockout-fast", "frank")


def _expire_offline(root: Path) -> None:
    """dave must change his password at next sign-in, erin's account expired yesterday, gina's password
    is 400 days old.

    ``samba-tool`` has no switch for these, so set the attributes through Samba's own Python bindings, on
    the stopped DC's database. Samba's directory modules accept only 0 or -1 for ``pwdLastSet``, so
    gina's is written into the domain partition's file directly, past those modules."""
    script = f"""
import time
import ldb
from samba.auth import system_session
from samba.param import LoadParm
from samba.samdb import SamDB
lp = LoadParm()
lp.load({str(root / 'etc' / 'smb.conf')!r})
db = SamDB(url={str(root / 'private' / 'sam.ldb')!r}, session_info=system_session(), lp=lp)
def dn(user):
    return db.search(base={BASE_DN!r}, expression="(sAMAccountName=%s)" % user, attrs=[])[0].dn
m = ldb.Message(dn("dave"))
m["pwdLastSet"] = ldb.MessageElement("0", ldb.FLAG_MOD_REPLACE, "pwdLastSet")
db.modify(m)
yesterday = int((time.time() - 86400 + 11644473600) * 10**7)
m = ldb.Message(dn("erin"))
m["accountExpires"] = ldb.MessageElement(str(yesterday), ldb.FLAG_MOD_REPLACE, "accountExpires")
db.modify(m)
partition = ldb.Ldb({str(root / 'private' / 'sam.ldb.d' / f'{BASE_DN.upper()}.ldb')!r})
m = ldb.Message(partition.search(base={BASE_DN!r}, expression="(sAMAccountName=gina)", attrs=[])[0].dn)
long_ago = int((time.time() - 400 * 86400 + 11644473600) * 10**7)
m["pwdLastSet"] = ldb.MessageElement(str(long_ago), ldb.FLAG_MOD_REPLACE, "pwdLastSet")
partition.modify(m)
"""
    # Samba's bindings belong to the system Python, not the test virtualenv.
    _run("/usr/bin/python3", "-c", script)


def _provision(target: Path) -> None:
    target.mkdir(parents=True)
    empty = target / "empty.conf"
    empty.write_text("", encoding="utf-8")
    _make_certificates(target / "tls")
    _run("samba-tool", "domain", "provision", "-s", empty, f"--realm={REALM}", f"--domain={NETBIOS_DOMAIN}",
         "--server-role=dc", "--dns-backend=NONE", "--use-rfc2307", f"--host-name={HOST_NAME}",
         f"--adminpass={ADMIN_PASSWORD}", f"--targetdir={target}", "--option=interfaces=lo",
         "--option=bind interfaces only=yes", timeout_s=300)
    empty.unlink()
    conf = write_config(target)
    _populate(conf)
    _expire_offline(target)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def golden_copy() -> tuple[Path, float | None]:
    """The provisioned, stopped DC to copy; provisions it first if needed.

    Returns its folder and the seconds provisioning took (``None`` when it was already there)."""
    missing = missing_programs()
    if missing:
        raise SambaUnavailable(f"{', '.join(missing)} not installed: tests/run.sh installs the Samba packages")
    root = cache_root()
    golden = root / "golden"
    with _locked(root / ".lock"):
        if (golden / "ready").exists():
            return golden, None
        started = time.monotonic()
        building = root / f"building-{os.getpid()}"
        shutil.rmtree(building, ignore_errors=True)
        shutil.rmtree(golden, ignore_errors=True)
        _provision(building)
        (building / "ready").write_text(f"recipe {RECIPE_VERSION}\n", encoding="utf-8")
        building.rename(golden)
        return golden, time.monotonic() - started


# --- a running DC ---------------------------------------------------------------------------------


@dataclass
class RunningDC:
    root: Path
    process: subprocess.Popen[bytes]
    #: Seconds from copying the golden copy to LDAPS answering; and provisioning, when it happened.
    start_s: float = 0.0
    provision_s: float | None = None
    host: str = "127.0.0.1"
    realm: str = REALM
    netbios_domain: str = NETBIOS_DOMAIN
    dns_domain: str = DNS_DOMAIN
    base_dn: str = BASE_DN
    passwords: dict[str, str] = field(default_factory=lambda: dict(PASSWORDS))
    #: The host-wide lease this DC holds while it runs (released by :meth:`stop`).
    lease: _Lease | None = None

    @property
    def ca_file(self) -> Path:
        return self.root / "tls" / "ca.crt"

    @property
    def ca_pem(self) -> str:
        return self.ca_file.read_text(encoding="utf-8")

    @property
    def log_file(self) -> Path:
        return self.root / "log.samba"

    @contextlib.contextmanager
    def layers_folder(self, name: str) -> Iterator[Path]:
        """The DC's own folder behind ``\\\\127.0.0.1\\layers\\<name>`` (made empty, removed afterwards): what
        a test writes over SMB is read back from here."""
        folder = self.root / "layers" / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def tool(self, *args: str) -> str:
        """Run ``samba-tool ARGS`` on this DC's own database (samba locks it, so this is safe while it
        runs): for tests that change the directory, e.g. delete a user. Returns its output."""
        return _run("samba-tool", *args, "-s", str(self.root / "etc" / "smb.conf"))

    def stop(self) -> None:
        """Close samba's stdin (it exits with its children), escalating to signals to its process group;
        returns once no process of the group runs any more."""
        if self.process.poll() is None:
            with contextlib.suppress(OSError):
                if self.process.stdin:
                    self.process.stdin.close()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                _signal_group(self.process.pid, signal.SIGTERM)
                try:
                    self.process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    _signal_group(self.process.pid, signal.SIGKILL)
                    self.process.wait(timeout=5)
        elif self.process.stdin:
            self.process.stdin.close()
        deadline = time.monotonic() + 10
        while _group_running(self.process.pid):
            if time.monotonic() > deadline:
                _signal_group(self.process.pid, signal.SIGKILL)
                deadline = time.monotonic() + 5
            time.sleep(0.05)
        if self.lease is not None:
            self.lease.release()
            self.lease = None


class _Lease:
    """The host-wide right to run the DC: an exclusive lock on a file beside the golden copy, held from
    before samba starts until its last process is gone."""

    def __init__(self, path: Path, timeout_s: float) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = path.open("a")
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(self._handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    self._handle.close()
                    raise RuntimeError(f"another test process kept the Samba DC for more than {timeout_s:.0f} s "
                                       f"({path})") from None
                time.sleep(0.2)

    def release(self) -> None:
        with contextlib.suppress(OSError):
            fcntl.flock(self._handle, fcntl.LOCK_UN)
        self._handle.close()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _group_running(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs (zombies waiting to be reaped do not count)."""
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == pgid and process.status() != psutil.STATUS_ZOMBIE:
                return True
        except (psutil.Error, OSError):
            continue
    return False


def _port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.2)
        return probe.connect_ex((host, port)) == 0


def _ldaps_ready(ca_file: Path) -> bool:
    context = ssl.create_default_context(cafile=str(ca_file))
    try:
        with socket.create_connection(("127.0.0.1", PORTS["ldaps"]), timeout=1) as raw, \
                context.wrap_socket(raw, server_hostname="127.0.0.1"):
            return True
    except OSError:
        return False


def start(workdir: Path, *, timeout_s: float = 60, lease_timeout_s: float = 1800) -> RunningDC:
    """Take the host's DC lease (waiting up to ``lease_timeout_s`` for another test process to stop its DC),
    copy the golden DC into ``workdir`` and start it; returns once LDAPS and SMB answer."""
    golden, provision_s = golden_copy()
    lease = _Lease(cache_root() / "running.lock", lease_timeout_s)
    try:
        dc = _start(golden, workdir, timeout_s)
    except BaseException:
        lease.release()
        raise
    dc.lease, dc.provision_s = lease, provision_s
    return dc


def _start(golden: Path, workdir: Path, timeout_s: float) -> RunningDC:
    taken = [name for name, port in PORTS.items() if _port_open(port)]
    if taken:
        raise SambaUnavailable(
            f"ports {', '.join(f'{n} {PORTS[n]}' for n in taken)} on 127.0.0.1 are taken: another DC or "
            "Samba runs on this host (one DC per host)")
    began = time.monotonic()
    root = workdir / "dc"
    shutil.copytree(golden, root, symlinks=True)
    conf = write_config(root)
    # Samba's winbindd socket must stay at its default place (a private one breaks SMB sessions).
    Path("/run/samba").mkdir(parents=True, exist_ok=True)
    samba = _which("samba")
    assert samba is not None
    with (root / "samba.out").open("wb") as output:
        process = subprocess.Popen(
            [samba, "-i", "-s", str(conf), f"--maximum-runtime={MAX_RUNTIME_S}", "--debug-stdout"],
            stdin=subprocess.PIPE, stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
        )
    dc = RunningDC(root, process)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            said = (root / "samba.out").read_text(errors="replace")[-4000:]
            raise RuntimeError(f"samba exited with {process.returncode} while starting:\n{said}")
        if _ldaps_ready(dc.ca_file) and _port_open(PORTS["smb"]):
            dc.start_s = time.monotonic() - began
            return dc
        time.sleep(0.1)
    dc.stop()
    raise RuntimeError(f"samba did not answer on LDAPS within {timeout_s} s; see {root / 'samba.out'}")
