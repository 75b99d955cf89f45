"""The first two steps of a connector test against a network peer: can a TCP connection be opened, and does
the TLS handshake succeed with the certificate verified (or, when verification is turned off, at all).

Both raise a :class:`~app.errors.LayerDeskError` with a message saying what to check, so
:meth:`app.connectors.base.TestSteps.run` records them as failed steps. :func:`lost_reason` and
:func:`mib_text` word what happened to a transfer whose connection went away.
"""

from __future__ import annotations

import http.client
import logging
import socket
import ssl
from pathlib import Path
from typing import Any

from app.errors import EnvironmentProblem, UserError, ValidationError

log = logging.getLogger(__name__)


def tls_context(verify: bool, ca_file: str | None) -> ssl.SSLContext:
    """A client TLS context: the system's trust store plus ``ca_file`` when given; no checks at all when
    ``verify`` is off (logged as a warning every time, because anyone on the path can then listen in)."""
    if not verify:
        log.warning("TLS certificate verification is turned off for this connector; the peer is not authenticated")
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    if ca_file and not Path(ca_file).is_file():
        raise ValidationError(f"The CA file {ca_file} does not exist; correct the connector's CA file.",
                              field="ca_file")
    try:
        return ssl.create_default_context(cafile=ca_file or None)
    except ssl.SSLError as exc:
        raise ValidationError(f"The CA file {ca_file} is not a PEM certificate file ({exc.reason}).",
                              field="ca_file") from None


def tcp_reach(host: str, port: int, timeout_s: float = 10.0) -> str:
    """Open and close a TCP connection; the step's detail, or :class:`EnvironmentProblem`."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as connection:
            peer = connection.getpeername()
    except OSError as exc:
        raise EnvironmentProblem(f"Cannot reach {host} on port {port}: {exc.strerror or exc}. Check the host name, "
                                 "that the host is on and that no firewall blocks the port.") from None
    return f"{host} answers on port {port} ({peer[0]})"


def tls_handshake(host: str, port: int, context: ssl.SSLContext, timeout_s: float = 10.0) -> str:
    """Complete a TLS handshake with ``context``; the step's detail (protocol and certificate subject), or
    :class:`UserError` when the certificate is not trusted / does not name the host."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as raw, \
                context.wrap_socket(raw, server_hostname=host) as tls:
            version = tls.version()
            certificate = tls.getpeercert() or {}
    except ssl.SSLCertVerificationError as exc:
        raise UserError(f"The TLS certificate of {host}:{port} is not trusted ({exc.verify_message}). Give the "
                        "connector the CA file that issued it; turn verification off only in a closed lab.") from None
    except ssl.SSLError as exc:
        raise EnvironmentProblem(f"The TLS handshake with {host}:{port} failed ({exc.reason or exc}); check that the "
                                 "port is the TLS one.") from None
    except OSError as exc:
        raise EnvironmentProblem(f"Cannot reach {host} on port {port}: {exc.strerror or exc}.") from None
    subject_parts: Any = certificate.get("subject", ())
    subject = ", ".join(f"{key}={value}" for part in subject_parts for key, value in part)
    checked = "verified" if context.verify_mode == ssl.CERT_REQUIRED else "NOT verified"
    return f"{version}, certificate {checked}" + (f" ({subject})" if subject else "")


# --- saying what happened to a transfer -----------------------------------------------------------------


def mib_text(count: int) -> str:
    """``count`` bytes in MiB for a message: whole MiB from 10 MiB on (or when exact), else one decimal."""
    return f"{count / 1024**2:.0f}" if count >= 10 * 1024**2 or count % 1024**2 == 0 else f"{count / 1024**2:.1f}"


def lost_reason(exc: BaseException) -> str:
    """Why an established connection failed, in words (a reset and a TLS stream cut short read alike)."""
    if isinstance(exc, TimeoutError):
        return "it stopped answering"
    if isinstance(exc, http.client.RemoteDisconnected):
        return "it was closed without an answer"
    if isinstance(exc, ConnectionResetError | BrokenPipeError | ConnectionAbortedError | ssl.SSLError
                  | http.client.IncompleteRead):
        return "it was reset"
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
