"""SASL user name / password authentication for a libvirtd the tests start themselves.

:func:`configure_sasl` writes, into the daemon's own folder, a ``libvirtd.conf`` that asks for SASL on the
UNIX sockets (``auth_unix_rw`` and ``auth_unix_ro``), a Cyrus SASL application config ``libvirt.conf`` that
offers one password mechanism (SCRAM-SHA-256, else DIGEST-MD5: whichever the installed SASL modules
have) and a sasldb holding one account, made with ``saslpasswd2`` (the password goes in on its stdin).
The daemon finds the SASL config through ``SASL_CONF_PATH`` in its environment (:attr:`SaslAccount.env`).

Debian packages: ``sasl2-bin`` (saslpasswd2, saslpluginviewer) and ``libsasl2-modules`` (SCRAM, DIGEST-MD5).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

#: The mechanisms the daemon may offer, best first (both are password mechanisms a sasldb can serve).
MECHANISMS = ("SCRAM-SHA-256", "DIGEST-MD5")


class SaslUnavailable(Exception):
    """The SASL tools or modules are not installed; the message names the Debian package."""


@dataclass(frozen=True)
class SaslAccount:
    """The one account a SASL-protected libvirtd knows, and where its SASL config lives."""

    user: str
    password: str
    mechanism: str
    config: Path

    @property
    def env(self) -> dict[str, str]:
        """What the daemon's environment needs to find its SASL config (not root's /etc/sasl2)."""
        return {"SASL_CONF_PATH": str(self.config)}


def _program(name: str, package: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
    if found is None:
        raise SaslUnavailable(f"{name} is missing (Debian {package})")
    return found


def server_mechanism() -> str:
    """The best of :data:`MECHANISMS` the installed Cyrus SASL server modules offer."""
    done = subprocess.run([_program("saslpluginviewer", "sasl2-bin"), "-s"], capture_output=True, text=True,
                          timeout=30, check=False)
    # First line of the listing: "Installed and properly configured SASL (server side) mechanisms are:".
    lines = done.stdout.splitlines()
    offered = set(lines[1].split()) if done.returncode == 0 and len(lines) > 1 else set()
    for mechanism in MECHANISMS:
        if mechanism in offered:
            return mechanism
    raise SaslUnavailable(f"no SASL password mechanism among {', '.join(MECHANISMS)} is installed (Debian "
                          f"libsasl2-modules); saslpluginviewer -s said: {done.stdout.strip() or done.stderr.strip()}")


def configure_sasl(root: Path, user: str, password: str) -> SaslAccount:
    """Make the libvirtd whose ``XDG_CONFIG_HOME`` is ``root/config`` ask for SASL on its UNIX sockets, with
    ``user`` / ``password`` its only account. The caller hands the folder to the daemon's account."""
    mechanism = server_mechanism()
    libvirt_config = root / "config" / "libvirt"
    libvirt_config.mkdir(parents=True, exist_ok=True)
    (libvirt_config / "libvirtd.conf").write_text('auth_unix_rw = "sasl"\nauth_unix_ro = "sasl"\n')
    sasl_config = root / "sasl2"
    sasl_config.mkdir()
    database = sasl_config / "passwd.db"
    (sasl_config / "libvirt.conf").write_text(f"mech_list: {mechanism.lower()}\nsasldb_path: {database}\n")
    done = subprocess.run([_program("saslpasswd2", "sasl2-bin"), "-f", str(database), "-a", "libvirt", "-p", "-c",
                           user], input=password, capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0 or not database.exists():
        raise AssertionError(f"saslpasswd2 could not create the sasldb for {user}: {done.stderr.strip()}")
    return SaslAccount(user, password, mechanism, sasl_config)
