"""Without a directory: filter escaping, SID conversion, and how refusals and transport failures read."""

from __future__ import annotations

import socket
import ssl

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.catalog.models import DirectorySecurity
from app.directory import DirectoryError, DirectorySettings, SignInRefused
from app.directory.errors import WRONG_CREDENTIALS, ad_data_code, refusal_from_result, transport_error
from app.directory.ldapfilter import (
    escape_filter_bytes,
    escape_filter_value,
    is_sid,
    sid_from_bytes,
    sid_to_bytes,
)

# --- escaping ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "escaped"), [
    ("*", r"\2a"),
    ("(", r"\28"),
    (")", r"\29"),
    ("\\", r"\5c"),
    ("\x00", r"\00"),
    ("al*ice)(objectClass=*", r"al\2aice\29\28objectClass=\2a"),
    ("LAB\\alice", r"LAB\5calice"),
    ("*)(|(cn=*", r"\2a\29\28|\28cn=\2a"),
    ("plain name é", "plain name é"),
    ("", ""),
])
def test_the_five_special_characters_are_escaped_and_nothing_else(value: str, escaped: str) -> None:
    assert escape_filter_value(value) == escaped


@given(st.text())
def test_an_escaped_value_holds_no_filter_syntax(value: str) -> None:
    escaped = escape_filter_value(value)
    assert not set(escaped) & {"*", "(", ")", "\x00"}
    # Every backslash starts an escape of two hex digits, so the value cannot end an escape early.
    i = 0
    while (i := escaped.find("\\", i)) != -1:
        assert escaped[i + 1: i + 3] in {"5c", "2a", "28", "29", "00"}
        i += 3


def test_binary_values_are_escaped_byte_by_byte() -> None:
    assert escape_filter_bytes(b"\x01\x05\x00*") == r"\01\05\00\2a"


# --- SIDs -------------------------------------------------------------------------------------------

ALICE = "S-1-5-21-603418580-407616907-2747250635-1102"
ALICE_BYTES = bytes.fromhex("010500000000000515000000d46ff7238bbd4b18cbb7bfa34e040000")


def test_a_sid_converts_both_ways() -> None:
    assert sid_from_bytes(ALICE_BYTES) == ALICE
    assert sid_to_bytes(ALICE) == ALICE_BYTES
    assert sid_from_bytes(sid_to_bytes("S-1-5-32-544")) == "S-1-5-32-544"
    assert sid_to_bytes("s-1-5-18") == sid_to_bytes("S-1-5-18")
    assert is_sid(ALICE) and not is_sid("alice") and not is_sid("S-1-x")


@given(st.integers(0, 2**48 - 1), st.lists(st.integers(0, 2**32 - 1), max_size=15))
def test_any_sid_survives_a_round_trip(authority: int, subs: list[int]) -> None:
    text = "-".join(["S", "1", str(authority), *map(str, subs)])
    assert sid_from_bytes(sid_to_bytes(text)) == text


@pytest.mark.parametrize("bad", [b"", b"\x02\x01" + bytes(10), b"\x01\x02" + bytes(6) + bytes(4)])
def test_malformed_binary_sids_are_refused(bad: bytes) -> None:
    with pytest.raises(ValueError, match="SID"):
        sid_from_bytes(bad)


@pytest.mark.parametrize("bad", ["alice", "S-1-5-99999999999", "S-1-281474976710656-1", "S-1-5-21-*"])
def test_malformed_text_sids_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        sid_to_bytes(bad)


# --- refused binds ------------------------------------------------------------------------------------

def _ad(code: str) -> dict[str, object]:
    return {"result": 49, "description": "invalidCredentials",
            "message": f"80090308: LdapErr: DSID-0C0903A9, comment: AcceptSecurityContext error, data {code}, v1db1"}


@pytest.mark.parametrize(("code", "reason", "words"), [
    ("52e", "wrong_credentials", WRONG_CREDENTIALS),
    ("525", "wrong_credentials", WRONG_CREDENTIALS),
    ("533", "account_disabled", r"The account LAB\carol is disabled"),
    ("532", "password_expired", r"The password of LAB\carol has expired"),
    ("773", "password_must_change", r"LAB\carol must change the password"),
    ("775", "account_locked", r"The account LAB\carol is locked"),
    ("701", "account_expired", r"The account LAB\carol has expired"),
    ("530", "logon_hours", "at this time of day"),
    ("531", "workstation_restricted", "from this computer"),
])
def test_each_active_directory_refusal_has_its_own_reason_and_message(code: str, reason: str, words: str) -> None:
    error = refusal_from_result(_ad(code), r"LAB\carol")
    assert isinstance(error, SignInRefused)
    assert error.reason == reason and words in error.message
    assert error.exit_status == 4


def test_every_refusal_message_is_distinct() -> None:
    codes = ["52e", "533", "532", "773", "775", "701", "530", "531"]
    assert len({refusal_from_result(_ad(c), "u").message for c in codes}) == len(codes)


def test_other_refusals() -> None:
    assert ad_data_code("… data 52E, v4563") == "52e"
    assert ad_data_code("no code here") is None
    stronger = refusal_from_result({"description": "strongerAuthRequired", "message": "Transport encryption"}, "u")
    assert isinstance(stronger, DirectoryError) and stronger.reason == "encryption_required"
    plain = refusal_from_result({"description": "invalidCredentials", "message": ""}, "u")
    assert isinstance(plain, SignInRefused) and plain.reason == "wrong_credentials"
    odd = refusal_from_result({"description": "unwillingToPerform", "message": "data 0"}, "u")
    assert isinstance(odd, DirectoryError) and odd.reason == "bind_failed" and "unwillingToPerform" in odd.message


# --- transport failures -----------------------------------------------------------------------------

def _verify_error(code: int, message: str) -> ssl.SSLCertVerificationError:
    error = ssl.SSLCertVerificationError(1, f"[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: {message}")
    error.verify_code, error.verify_message = code, message
    return error


@pytest.mark.parametrize(("failure", "reason", "words"), [
    (ConnectionRefusedError(111, "Connection refused"), "unreachable", "nothing accepts connections"),
    (TimeoutError("timed out"), "unreachable", "no answer in time"),
    (socket.gaierror(-2, "Name or service not known"), "unreachable", "cannot be resolved"),
    (_verify_error(19, "self-signed certificate in certificate chain"), "untrusted_certificate", "not trusted"),
    (_verify_error(62, "Hostname mismatch, certificate is not valid for 'x'."), "certificate_name_mismatch",
     "not issued for the name"),
    (ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number"), "tls_failed", "TLS handshake"),
])
def test_transport_failures_say_what_to_check(failure: Exception, reason: str, words: str) -> None:
    error = transport_error(failure, "dc1.lab.test", 636)
    assert error.reason == reason and words in error.message and "dc1.lab.test" in error.message


def test_the_tls_layers_own_failure_wins_over_a_rewrapped_one() -> None:
    rewrapped = OSError("socket ssl wrapping error: certificate verify failed")
    error = transport_error(rewrapped, "h", 636, tls_failure=_verify_error(62, "Hostname mismatch"))
    assert error.reason == "certificate_name_mismatch"
    # ldap3 keeps each address's failure as (exception, address) pairs.
    listed = OSError("unable to open socket", [(ConnectionRefusedError(111, "refused"), ("::1", 636))])
    assert transport_error(listed, "h", 636).reason == "unreachable"


def test_settings_never_show_the_bind_password() -> None:
    settings = DirectorySettings("dc1", 636, DirectorySecurity.LDAPS, "DC=lab,DC=test", "svc", "S3cret-bind!")
    assert "S3cret-bind!" not in repr(settings) and "S3cret-bind!" not in str(settings)
