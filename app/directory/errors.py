"""What went wrong talking to the directory, in words an administrator can act on.

Two families:

* :class:`SignInRefused` – the directory answered and said no to a user's sign-in (wrong password,
  disabled, expired, locked…). Active Directory explains a refused bind with a ``data NNN`` code in
  the result's diagnostic message; :func:`refusal_from_result` reads it.
* :class:`DirectoryError` – LayerDesk could not use the directory at all (server unreachable, its
  certificate not trusted, the bind account refused, a search failed).

Each carries a stable ``reason`` for scripts (``layerctl --json``) and tests. No message ever holds a
password.
"""

from __future__ import annotations

import re
import socket
import ssl
from collections.abc import Mapping
from typing import Any

from app.errors import AuthenticationFailed, UserError


class SignInRefused(AuthenticationFailed):
    """The directory refused a user's credentials or account."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class DirectoryError(UserError):
    """The directory could not be reached or used as configured."""

    code = "directory"

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


WRONG_CREDENTIALS = "The user name or password is incorrect."

#: Active Directory's ``data`` codes in a refused bind (hexadecimal Win32 error numbers).
_AD_CODES: dict[str, tuple[str, str]] = {
    "525": ("wrong_credentials", WRONG_CREDENTIALS),
    "52e": ("wrong_credentials", WRONG_CREDENTIALS),
    "530": ("logon_hours", "{user} may not sign in at this time of day (the directory's logon hours)."),
    "531": ("workstation_restricted", "{user} may not sign in from this computer (the directory's workstation "
                                      "restrictions)."),
    "532": ("password_expired", "The password of {user} has expired: change it (for example by signing in to "
                                "Windows), then sign in again."),
    "533": ("account_disabled", "The account {user} is disabled in the directory; ask your directory "
                                "administrator to enable it."),
    "701": ("account_expired", "The account {user} has expired in the directory; ask your directory "
                               "administrator to extend it."),
    "773": ("password_must_change", "{user} must change the password before signing in: change it (for example "
                                    "by signing in to Windows), then sign in again."),
    "775": ("account_locked", "The account {user} is locked after too many wrong passwords; wait for it to "
                              "unlock or ask your directory administrator."),
}
_DATA = re.compile(r"\bdata ([0-9a-fA-F]{3,8})\b")


def ad_data_code(message: str) -> str | None:
    """The ``data NNN`` code of an Active Directory bind refusal, lower-case, or ``None``."""
    match = _DATA.search(message or "")
    return match.group(1).lower() if match else None


def refusal_from_result(result: Mapping[str, Any], user: str) -> UserError:
    """The error for a refused bind of ``user`` (``result`` as ldap3 reports it)."""
    description = str(result.get("description") or "")
    message = str(result.get("message") or "")
    if description == "strongerAuthRequired":
        return DirectoryError(
            "The directory refuses passwords over unencrypted LDAP: set the junction to LDAPS or StartTLS.",
            reason="encryption_required",
        )
    code = ad_data_code(message)
    if code in _AD_CODES:
        reason, text = _AD_CODES[code]
        return SignInRefused(text.format(user=user), reason=reason)
    if description == "invalidCredentials":
        return SignInRefused(WRONG_CREDENTIALS, reason="wrong_credentials")
    return DirectoryError(f"The directory refused to sign in {user}: {description or 'error'}"
                          f"{f' ({code})' if code else ''}.", reason="bind_failed")


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    pending: list[BaseException] = [exc]
    while pending:
        item = pending.pop(0)
        if item in seen:
            continue
        seen.append(item)
        pending.extend(e for e in (item.__cause__, item.__context__) if e is not None)
        # ldap3 keeps the failure of every address it tried as (exception, address) pairs.
        for arg in item.args:
            if isinstance(arg, list):
                pending.extend(p[0] for p in arg if isinstance(p, tuple) and p and isinstance(p[0], BaseException))
    return seen


def transport_error(exc: BaseException, server: str, port: int,
                    tls_failure: BaseException | None = None) -> DirectoryError:
    """The error for a connection, TLS or StartTLS failure (``tls_failure``: the TLS layer's own, if any)."""
    where = f"{server}:{port}"
    chain = ([tls_failure] if tls_failure is not None else []) + _chain(exc)
    for item in chain:
        if isinstance(item, ssl.SSLCertVerificationError):
            why = item.verify_message or str(item)
            # 62: host name mismatch, 64: IP address mismatch (OpenSSL's X509_V_ERR_* codes).
            if item.verify_code in (62, 64) or "mismatch" in why.lower() or "doesn't match" in why:
                return DirectoryError(
                    f"The certificate of {where} is not issued for the name {server!r}: connect by a name the "
                    "certificate lists (its subject alternative names).", reason="certificate_name_mismatch")
            return DirectoryError(
                f"The certificate of {where} is not trusted ({why}): give the CA certificate that signed it "
                "(--ca-file), or have the server use a certificate this computer trusts.",
                reason="untrusted_certificate")
        text = str(item)
        if "certificate verify failed" in text:
            return DirectoryError(
                f"The certificate of {where} is not trusted ({text}): give the CA certificate that signed it "
                "(--ca-file).", reason="untrusted_certificate")
        if isinstance(item, ssl.SSLError):
            why = getattr(item, "reason", None) or text
            return DirectoryError(f"The TLS handshake with {where} failed ({why}): check that the port speaks "
                                  "LDAPS (636) or StartTLS (389) as configured.", reason="tls_failed")
    for item in chain:
        if isinstance(item, socket.gaierror):
            return DirectoryError(f"The directory server name {server!r} cannot be resolved: check its spelling "
                                  "and DNS.", reason="unreachable")
        if isinstance(item, ConnectionRefusedError):
            return DirectoryError(f"Cannot reach the directory server {where}: nothing accepts connections on "
                                  "that port. Check the server name, the port and the firewall.",
                                  reason="unreachable")
        if isinstance(item, TimeoutError | socket.timeout):
            return DirectoryError(f"Cannot reach the directory server {where}: no answer in time. Check the "
                                  "server name, the port and the firewall.", reason="unreachable")
    for item in chain:
        if type(item).__name__.startswith("LDAPStartTLS"):
            return DirectoryError(f"{where} did not start TLS (StartTLS): {item}.", reason="tls_failed")
    return DirectoryError(f"Cannot reach the directory server {where}: {exc}.", reason="unreachable")
