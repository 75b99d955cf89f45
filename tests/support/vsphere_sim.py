"""A real vCenter simulator (govmomi's vcsim) on loopback, for the vSphere connector tests.

The simulator is ``tests/support/vcsim/main.go`` built against Debian's govmomi sources
(``golang-go``, ``golang-github-vmware-govmomi-dev``) with ``GO111MODULE=off``. Building takes from
seconds to two minutes, so it happens once per machine into a cache under the system temp folder, keyed
by the hash of ``main.go`` and the Go version (a changed main builds anew). Each test session makes a
2048-bit test CA and a server certificate for 127.0.0.1, starts the simulator on a free port with them
and stops it by closing its stdin.

The simulator serves govmomi's VPX model: datacenter ``DC0``, cluster ``DC0_C0`` (three hosts) and host
``DC0_H0``, datastore ``LocalDS_0`` (a folder under the session's work folder, so its files can be read
back), port group ``DC0_DVPG0`` and network ``VM Network``, VMs ``DC0_H0_VM0``… and ``DC0_C0_RP0_VM0``….
It accepts only :data:`USER` with :data:`PASSWORD`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

USER = "administrator@vsphere.local"
PASSWORD = "Vc-Lab!Passw0rd"
SOURCE = Path(__file__).with_name("vcsim") / "main.go"
GOPATH = Path("/usr/share/gocode")
_GOVMOMI = GOPATH / "src/github.com/vmware/govmomi/simulator"


class SimulatorUnavailable(Exception):
    """The machine cannot build or run the simulator (Go or the govmomi sources missing)."""


def cache_root() -> Path:
    return Path(tempfile.gettempdir()) / "layerdesk-vcsim"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def binary() -> tuple[Path, float | None]:
    """The built simulator and, when it had to be built now, how long that took (seconds)."""
    go = shutil.which("go")
    if go is None or not _GOVMOMI.is_dir():
        raise SimulatorUnavailable("go or govmomi's sources are missing: tests/run.sh installs golang-go and "
                                   "golang-github-vmware-govmomi-dev")
    version = subprocess.run([go, "version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256(SOURCE.read_bytes() + version.encode()).hexdigest()[:16]
    root = cache_root()
    built = root / f"vcsim-{key}"
    with _locked(root / ".lock"):
        if built.is_file():
            return built, None
        started = time.monotonic()
        work = Path(tempfile.mkdtemp(prefix="build-", dir=root))
        try:
            shutil.copy(SOURCE, work / "main.go")
            env = {**os.environ, "GO111MODULE": "off", "GOPATH": str(GOPATH), "GOCACHE": str(root / "go-cache"),
                   "GOFLAGS": "", "CGO_ENABLED": "0"}
            done = subprocess.run([go, "build", "-o", str(work / "vcsim"), "main.go"], cwd=work, env=env,
                                  capture_output=True, text=True, timeout=900, check=False)
            if done.returncode != 0:
                raise SimulatorUnavailable(f"building the vCenter simulator failed:\n{done.stderr}")
            (work / "vcsim").rename(built)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return built, time.monotonic() - started


def _certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A test CA and a server certificate for 127.0.0.1/localhost it signed: ``(ca, cert, key)``."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, ca, key, csr, cert = (folder / n for n in ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem"))
    ext = folder / "server.ext"
    ext.write_text("basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
                   "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n")

    def openssl(*args: str | Path) -> None:
        subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca, "-days", "2",
            "-subj", "/CN=LayerDesk test vCenter CA")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1")
    openssl("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert, "-days", "2",
            "-extfile", ext)
    return ca, cert, key


@dataclass
class RunningSimulator:
    host: str
    port: int
    #: The CA that signed the simulator's certificate (the connector's CA file).
    ca_file: Path
    #: The folder holding the simulator's datastore folders (its TMPDIR).
    datastores: Path
    process: subprocess.Popen[str]
    build_s: float | None = None
    start_s: float = 0.0
    _stopped: bool = field(default=False, repr=False)

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        with contextlib.suppress(OSError):
            assert self.process.stdin is not None
            self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        assert self.process.stdout is not None
        self.process.stdout.close()


def start(workdir: Path) -> RunningSimulator:
    """Build (once per machine) and start the simulator with its datastores under ``workdir``."""
    program, build_s = binary()
    if shutil.which("openssl") is None:
        raise SimulatorUnavailable("openssl is missing: tests/run.sh installs it")
    ca, cert, key = _certificates(workdir / "tls")
    datastores = workdir / "datastores"
    datastores.mkdir()
    started = time.monotonic()
    with (workdir / "vcsim.log").open("w") as log:  # the simulator keeps its own handle
        process = subprocess.Popen(
            [str(program), "-listen", "127.0.0.1:0", "-user", USER, "-cert", str(cert), "-key", str(key)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
            env={**os.environ, "VCSIM_PASSWORD": PASSWORD, "TMPDIR": str(datastores)}, start_new_session=True)
    assert process.stdout is not None
    line = process.stdout.readline().strip()
    if not line:
        process.wait(timeout=10)
        process.stdout.close()
        assert process.stdin is not None
        process.stdin.close()
        raise SimulatorUnavailable(f"the vCenter simulator did not start: {(workdir / 'vcsim.log').read_text()}")
    host, _, port = line.rpartition(":")
    return RunningSimulator(host, int(port), ca, datastores, process, build_s, time.monotonic() - started)
