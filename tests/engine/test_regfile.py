""".reg files: both formats and their encodings, every value type, every error, writing and round trips."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.engine.registry.delta import CreateKey, DeleteKey, DeleteValue, Operation, RegistryDelta, SetValue
from app.engine.registry.model import Hive, RegistryKey, ValueType
from app.engine.registry.regfile import (
    RegFileError,
    decode_reg_bytes,
    encode_reg_text,
    parse_reg_bytes,
    parse_reg_file,
    parse_reg_text,
    write_reg_file,
    write_reg_text,
)
from app.errors import UserError

V5 = "Windows Registry Editor Version 5.00"
SZ, EXPAND_SZ, BINARY, DWORD = int(ValueType.SZ), int(ValueType.EXPAND_SZ), int(ValueType.BINARY), int(ValueType.DWORD)
MULTI_SZ, QWORD = int(ValueType.MULTI_SZ), int(ValueType.QWORD)


def sz(text: str) -> bytes:
    return (text + "\0").encode("utf-16-le")


def crlf(text: str) -> str:
    return text.replace("\n", "\r\n")


def v5(body: str) -> bytes:
    """A 5.00 file as regedit writes it: UTF-16LE with BOM, CRLF."""
    return b"\xff\xfe" + crlf(f"{V5}\n\n{body}").encode("utf-16-le")


def v4(body: str) -> bytes:
    """A REGEDIT4 file: ANSI (Windows-1252), CRLF."""
    return crlf(f"REGEDIT4\n\n{body}").encode("cp1252")


def ops(data: bytes, **options: str) -> list[Operation]:
    return list(parse_reg_bytes(data, source="test.reg", **options))


def error(data: bytes) -> RegFileError:
    with pytest.raises(RegFileError) as caught:
        parse_reg_bytes(data, source="test.reg")
    return caught.value


# --- values ----------------------------------------------------------------------------------------


def test_every_value_form_in_a_5_00_file() -> None:
    body = r'''[HKEY_LOCAL_MACHINE\SOFTWARE\Contoso\Widget]
"Name"="Widget \"Pro\" in C:\\Program Files\\"
@="the default"
"Empty"=""
"Count"=dword:0000001f
"Max"=dword:FFFFFFFF
"Blob"=hex:00,ff,7F,1
"EmptyBlob"=hex:
"None"=hex(0):01,02
"Text"=hex(1):41,00,00,00
"Expand"=hex(2):25,00,41,00,25,00,00,00
"Bin"=hex(3):aa
"Dw"=hex(4):01,00,00,00
"Big"=hex(5):00,00,00,01
"Link"=hex(6):5c,00
"Multi"=hex(7):61,00,00,00,62,00,00,00,00,00
"Res"=hex(8):08
"Full"=hex(9):09
"Req"=hex(a):0a
"Quad"=hex(b):00,00,00,40,01,00,00,00
"Custom"=hex(100):ff
"Top"=HEX(FFFFFFFF):01
"Zeros"=hex(00000002):00,00
'''
    key = r"Contoso\Widget"
    assert ops(v5(body)) == [
        SetValue("SOFTWARE", key, "Name", SZ, sz(r'Widget "Pro" in C:\Program Files' + "\\")),
        SetValue("SOFTWARE", key, "", SZ, sz("the default")),
        SetValue("SOFTWARE", key, "Empty", SZ, sz("")),
        SetValue("SOFTWARE", key, "Count", DWORD, b"\x1f\0\0\0"),
        SetValue("SOFTWARE", key, "Max", DWORD, b"\xff\xff\xff\xff"),
        SetValue("SOFTWARE", key, "Blob", BINARY, b"\x00\xff\x7f\x01"),
        SetValue("SOFTWARE", key, "EmptyBlob", BINARY, b""),
        SetValue("SOFTWARE", key, "None", 0, b"\1\2"),
        SetValue("SOFTWARE", key, "Text", SZ, sz("A")),
        SetValue("SOFTWARE", key, "Expand", EXPAND_SZ, sz("%A%")),
        SetValue("SOFTWARE", key, "Bin", BINARY, b"\xaa"),
        SetValue("SOFTWARE", key, "Dw", DWORD, b"\1\0\0\0"),
        SetValue("SOFTWARE", key, "Big", int(ValueType.DWORD_BIG_ENDIAN), b"\0\0\0\1"),
        SetValue("SOFTWARE", key, "Link", int(ValueType.LINK), b"\\\0"),
        SetValue("SOFTWARE", key, "Multi", MULTI_SZ, "a\0b\0\0".encode("utf-16-le")),
        SetValue("SOFTWARE", key, "Res", int(ValueType.RESOURCE_LIST), b"\x08"),
        SetValue("SOFTWARE", key, "Full", int(ValueType.FULL_RESOURCE_DESCRIPTOR), b"\x09"),
        SetValue("SOFTWARE", key, "Req", int(ValueType.RESOURCE_REQUIREMENTS_LIST), b"\x0a"),
        SetValue("SOFTWARE", key, "Quad", QWORD, (0x1_4000_0000).to_bytes(8, "little")),
        SetValue("SOFTWARE", key, "Custom", 0x100, b"\xff"),
        SetValue("SOFTWARE", key, "Top", 0xFFFF_FFFF, b"\1"),
        SetValue("SOFTWARE", key, "Zeros", EXPAND_SZ, b"\0\0"),
    ]


def test_value_and_key_deletions() -> None:
    body = r'''[HKEY_LOCAL_MACHINE\SOFTWARE\Contoso]
"Old"=-
@=-
"Quoted \"name\""=-

[-HKEY_LOCAL_MACHINE\SOFTWARE\Contoso\Legacy]
'''
    assert ops(v5(body)) == [
        DeleteValue("SOFTWARE", "Contoso", "Old"),
        DeleteValue("SOFTWARE", "Contoso", ""),
        DeleteValue("SOFTWARE", "Contoso", 'Quoted "name"'),
        DeleteKey("SOFTWARE", r"Contoso\Legacy"),
    ]


def test_a_section_without_values_creates_its_key_and_one_with_values_does_not_need_to() -> None:
    body = r'''[HKEY_CURRENT_USER\Software\Empty]

; a comment between sections
[HKEY_CURRENT_USER\Software\Full]
"v"="x"

[HKEY_CURRENT_USER\Software\OnlyDeletes]
"v"=-
[HKEY_CURRENT_USER\Software\Last]'''
    assert ops(v5(body)) == [
        CreateKey("NTUSER", r"Software\Empty"),
        SetValue("NTUSER", r"Software\Full", "v", SZ, sz("x")),
        DeleteValue("NTUSER", r"Software\OnlyDeletes", "v"),
        CreateKey("NTUSER", r"Software\Last"),
    ]


def test_names_and_strings_keep_every_character_but_the_escaped_ones() -> None:
    body = '[HKEY_CURRENT_USER\\Software\\Ünïcödé ]] x]\n"名前 ;=[x]"="ü ; not a comment \t€ 😀"\n'
    assert ops(v5(body)) == [SetValue("NTUSER", "Software\\Ünïcödé ]] x", "名前 ;=[x]", SZ,
                                      sz("ü ; not a comment \t€ 😀"))]


def test_blanks_comments_and_line_ends() -> None:
    text = (f"{V5}  \n"
            "; comment\r\n"
            "   ;   indented comment\n"
            "\t\n"
            "  [HKEY_CURRENT_USER\\A]   ; comment after a section\r\n"
            '  "s" = "x"  ; comment after a string\n'
            '"d"\t=\tdword:00000002 ;dword\r\n'
            '@=hex:01, 02 ,03 ; hex\n'
            '"cont"=hex:01,\\\n'
            '        02,\\   \r\n'
            '\t03\n'
            '"c2"=hex:01,02\\\n'
            '  ,03\n'
            '"c3"=hex:\\\n'
            '  04\n'
            '"gone"=-   ; deleted\n')
    assert list(parse_reg_text(text)) == [
        SetValue("NTUSER", "A", "s", SZ, sz("x")),
        SetValue("NTUSER", "A", "d", DWORD, b"\2\0\0\0"),
        SetValue("NTUSER", "A", "", BINARY, b"\1\2\3"),
        SetValue("NTUSER", "A", "cont", BINARY, b"\1\2\3"),
        SetValue("NTUSER", "A", "c2", BINARY, b"\1\2\3"),
        SetValue("NTUSER", "A", "c3", BINARY, b"\4"),
        DeleteValue("NTUSER", "A", "gone"),
    ]


# --- roots -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "hive", "key"), [
    (r"HKEY_LOCAL_MACHINE\SOFTWARE\A", "SOFTWARE", "A"),
    (r"HKLM\Software\A\B", "SOFTWARE", r"A\B"),
    (r"hklm\software", "SOFTWARE", ""),
    (r"HKEY_LOCAL_MACHINE\SYSTEM\ControlSet002\Services", "SYSTEM", r"ControlSet002\Services"),
    (r"HKEY_LOCAL_MACHINE\SYSTEM\CurrentControlSet\Services\W", "SYSTEM", r"ControlSet001\Services\W"),
    (r"HKLM\System\currentcontrolset", "SYSTEM", "ControlSet001"),
    (r"HKLM\SYSTEM\Select", "SYSTEM", "Select"),
    (r"HKEY_LOCAL_MACHINE\DRIVERS\DriverDatabase", "DRIVERS", "DriverDatabase"),
    (r"HKEY_USERS\.DEFAULT\Control Panel", "DEFAULT", "Control Panel"),
    (r"HKU\.default", "DEFAULT", ""),
    (r"HKEY_CURRENT_USER\Software\Contoso", "NTUSER", r"Software\Contoso"),
    (r"HKCU\Environment", "NTUSER", "Environment"),
    (r"hkey_current_user", "NTUSER", ""),
    (r"HKEY_CLASSES_ROOT\.txt", "SOFTWARE", r"Classes\.txt"),
    (r"HKCR\CLSID\{0}", "SOFTWARE", r"Classes\CLSID\{0}"),
    (r"HKEY_CLASSES_ROOT", "SOFTWARE", "Classes"),
])
def test_root_keys_map_to_hives(path: str, hive: str, key: str) -> None:
    assert ops(v5(f"[{path}]\n")) == [CreateKey(hive, key)]


def test_current_control_set_maps_to_the_one_given() -> None:
    data = v5("[HKLM\\SYSTEM\\CurrentControlSet\\Control]\n[-HKLM\\SYSTEM\\CurrentControlSet\\Old]\n")
    assert ops(data, current_control_set="ControlSet003") == [
        CreateKey("SYSTEM", r"ControlSet003\Control"), DeleteKey("SYSTEM", r"ControlSet003\Old")]


@pytest.mark.parametrize("name", ["", "A\\B", "CurrentControlSet", ".."])
def test_the_current_control_set_must_be_a_key_name(name: str) -> None:
    with pytest.raises(ValueError, match="not a control set key name"):
        parse_reg_text(V5, current_control_set=name)


@pytest.mark.parametrize(("section", "message"), [
    (r"[HKEY_USERS\S-1-5-21-1004336348-1177238915-682003330-1001\Software]",
     r"HKEY_USERS\S-1-5-21-1004336348-1177238915-682003330-1001 is one user's own hive, which layers do not "
     "change: use HKEY_CURRENT_USER for the default user profile"),
    (r"[HKU\S-1-5-18]", r"HKU\S-1-5-18 is one user's own hive"),
    (r"[HKEY_USERS\Other]", r"HKEY_USERS\Other is not a hive a layer can change (only HKEY_USERS\.DEFAULT)"),
    (r"[HKEY_USERS]", r"HKEY_USERS itself cannot be changed: name a key below HKEY_USERS\.DEFAULT"),
    (r"[HKEY_LOCAL_MACHINE\SAM\SAM]",
     r"HKEY_LOCAL_MACHINE\SAM cannot be changed by a layer: the SAM and SECURITY hives come only from the OS layer"),
    (r"[HKLM\SECURITY\Policy]", r"HKLM\SECURITY cannot be changed by a layer: the SAM and SECURITY hives"),
    (r"[HKEY_LOCAL_MACHINE\HARDWARE\DESCRIPTION]",
     r"HKEY_LOCAL_MACHINE\HARDWARE cannot be changed by a layer: Windows builds it at every boot"),
    (r"[HKLM\BCD00000000\Objects]", r"HKLM\BCD00000000 is not a hive a layer can change"),
    (r"[HKEY_LOCAL_MACHINE]", "HKEY_LOCAL_MACHINE itself cannot be changed: name a key below SOFTWARE, SYSTEM"),
    (r"[HKEY_CURRENT_CONFIG\Software]", "HKEY_CURRENT_CONFIG cannot be changed by a layer: Windows builds it at boot"),
    (r"[HKEY_PERFORMANCE_DATA\X]", "unknown root key 'HKEY_PERFORMANCE_DATA' (expected HKEY_LOCAL_MACHINE, "
                                   "HKEY_CURRENT_USER, HKEY_USERS or HKEY_CLASSES_ROOT)"),
    (r"[Software\Contoso]", "unknown root key 'Software'"),
    (r"[-HKEY_LOCAL_MACHINE\SOFTWARE]", r"[-HKEY_LOCAL_MACHINE\SOFTWARE] would delete the whole SOFTWARE hive"),
    (r"[-HKCU]", "[-HKCU] would delete the whole NTUSER hive; delete keys below it instead"),
    (r"[-HKU\.DEFAULT\Software\..]", r"key path 'HKU\.DEFAULT\Software\..' has a '..' component"),
    (r"[HKLM\SOFTWARE\\x]", r"key path 'HKLM\SOFTWARE\\x' has an empty key name (a doubled or trailing '\')"),
    (r"[HKLM\SOFTWARE\x\]", "key path 'HKLM\\SOFTWARE\\x\\' has an empty key name"),
    (r"[\HKLM\SOFTWARE\x]", "key path '\\HKLM\\SOFTWARE\\x' has an empty key name"),
    (r"[HKLM\SOFTWARE\.\x]", "key path 'HKLM\\SOFTWARE\\.\\x' has a '.' component"),
    (r"[]", "a section must name a key: [] is empty"),
    (r"[-]", "a section must name a key"),
])
def test_roots_and_paths_that_are_refused(section: str, message: str) -> None:
    caught = error(v5(f"; header, blank line, this comment, then the section\n{section}\n"))
    assert (caught.source, caught.line) == ("test.reg", 4)
    assert str(caught).startswith(f"test.reg, line 4: {message}"), str(caught)


# --- encodings -------------------------------------------------------------------------------------

BODY = '[HKEY_CURRENT_USER\\Software\\Café]\n"Prix"="5 €"\n'
EXPECTED = [SetValue("NTUSER", "Software\\Café", "Prix", SZ, sz("5 €"))]


@pytest.mark.parametrize("data", [
    v5(BODY),
    b"\xef\xbb\xbf" + crlf(f"{V5}\n\n{BODY}").encode("utf-8"),
    f"{V5}\n\n{BODY}".encode(),
    crlf(f"{V5}\n\n{BODY}").encode("utf-16-le"),
    b"\xfe\xff" + crlf(f"{V5}\n\n{BODY}").encode("utf-16-be"),
    v4(BODY),
    b"\xff\xfe" + crlf(f"REGEDIT4\n\n{BODY}").encode("utf-16-le"),
])
def test_every_encoding_read(data: bytes) -> None:
    assert ops(data) == EXPECTED


def test_regedit4_strings_are_ansi_and_stored_as_utf16() -> None:
    body = ('[HKEY_LOCAL_MACHINE\\SOFTWARE\\Contoso]\n'
            '"Expand"=hex(2):25,53,79,73,74,65,6d,52,6f,6f,74,25,5c,e9,80,00\n'
            '"Multi"=hex(7):61,00,e9,00,00\n'
            '"Text"=hex(1):81,00\n'
            '"Bin"=hex:e9,80\n'
            '"Quad"=hex(b):01,00,00,00,00,00,00,00\n'
            '"S"="? undefined in cp1252"\n')
    assert ops(v4(body).replace(b"?", b"\x81")) == [
        SetValue("SOFTWARE", "Contoso", "Expand", EXPAND_SZ, sz("%SystemRoot%\\é€")),
        SetValue("SOFTWARE", "Contoso", "Multi", MULTI_SZ, "a\0é\0\0".encode("utf-16-le")),
        SetValue("SOFTWARE", "Contoso", "Text", SZ, sz("\x81")),
        SetValue("SOFTWARE", "Contoso", "Bin", BINARY, b"\xe9\x80"),
        SetValue("SOFTWARE", "Contoso", "Quad", QWORD, b"\1" + b"\0" * 7),
        SetValue("SOFTWARE", "Contoso", "S", SZ, sz("\x81 undefined in cp1252")),
    ]


def test_5_00_hex_strings_are_kept_as_given() -> None:
    assert ops(v5('[HKCU\\A]\n"odd"=hex(2):41,00,42\n"ansi"=hex(7):61,00,00\n')) == [
        SetValue("NTUSER", "A", "odd", EXPAND_SZ, b"A\0B"), SetValue("NTUSER", "A", "ansi", MULTI_SZ, b"a\0\0")]


def test_decode_reg_bytes() -> None:
    assert decode_reg_bytes(v5("")) == f"{V5}\r\n\r\n"
    assert decode_reg_bytes(b"REGEDIT4\r\n\x80\x8d") == "REGEDIT4\r\n€\x8d"


# --- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("data", "line", "message"), [
    (b"", 1, "not a .reg file: the first line must be 'Windows Registry Editor Version 5.00' or 'REGEDIT4'"),
    (b"\xff\xfe", 1, "not a .reg file"),
    (crlf(f"\n{V5}\n").encode(), 1, "not a .reg file"),
    (b"Windows Registry Editor Version 5.0\r\n", 1, "not a .reg file"),
    (b"regedit4\r\n", 1, "not a .reg file"),
    (b"[HKEY_CURRENT_USER\\A]\n", 1, "not a .reg file"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00", 1, "not a .reg file"),
    (b"\x7fELF\x02\x01\x01\x00\x00\x00", 1, "not a .reg file"),
    (f"{V5}\r\n\r\n".encode() + b"\x00\x01\x02\x03binary", 3,
     "NUL character: this is not a text .reg file (or a UTF-16 file without its BOM)"),
    (f"{V5}\r\n\x01\x02\r\n".encode(), 2, "control character U+0001: this is not a text .reg file"),
    (f"{V5}\r\n\r\n[HKCU\\A]\r\r\n".encode(), 3, "stray carriage return (lines must end in CRLF or LF)"),
    (f"{V5}\r\n\r\n".encode() + "[HKCU\\Café]".encode("cp1252"), 3,
     "not valid UTF-8 text (save the file as Unicode, which is UTF-16LE, or as UTF-8)"),
    (b"\xff\xfe" + crlf(f"{V5}\n\n[HKCU\\A]").encode("utf-16-le") + b"\x00\xd8", 3,
     "not a text file: the UTF-16 text is broken here"),
    (b"\xff\xfe" + crlf(f"{V5}\n").encode("utf-16-le") + b"A", 2, "not a text file: the UTF-16 text is broken"),
])
def test_files_that_are_not_reg_text(data: bytes, line: int, message: str) -> None:
    caught = error(data)
    assert (caught.source, caught.line) == ("test.reg", line)
    assert str(caught).startswith(f"test.reg, line {line}: {message}"), str(caught)


@pytest.mark.parametrize(("body", "line", "message"), [
    ('"v"="x"\n', 3, "a value line before any [key] section"),
    ("@=dword:00000001\n", 3, "a value line before any [key] section"),
    ("[-HKCU\\A]\n\"v\"=-\n", 4, "a value line in a [-key] deletion section (the key is being deleted)"),
    ("[HKCU\\A\n", 3, "unterminated section: the line has no closing ']'"),
    ("[HKCU\\A] x\n", 3, "unexpected text 'x' after the section's closing ']'"),
    ('[HKCU\\A]\n"v"="x\n', 4, "unterminated string: missing the closing '\"'"),
    ('[HKCU\\A]\n"v"="x\\"\n', 4, "unterminated string"),
    ('[HKCU\\A]\n"v=x\n', 4, "unterminated string"),
    ('[HKCU\\A]\n"v"="C:\\Temp"\n', 4, "unknown escape '\\T' in a string (only \\\\ and \\\" are escapes)"),
    ('[HKCU\\A]\n"a\\nb"="x"\n', 4, "unknown escape '\\n'"),
    ('[HKCU\\A]\n"v"="x" "y"\n', 4, "unexpected text '\"y\"' after the value"),
    ('[HKCU\\A]\n"v"=- x\n', 4, "unexpected text 'x' after the value"),
    ('[HKCU\\A]\n"v" "x"\n', 4, "expected '=' after the value name, found '\"x\"'"),
    ('[HKCU\\A]\n"v"\n', 4, "expected '=' after the value name, found the end of the line"),
    ('[HKCU\\A]\n@"x"\n', 4, "expected '=' after @, found '\"x\"'"),
    ("[HKCU\\A]\nv=\"x\"\n", 4, "unexpected text 'v=\"x\"': expected a [key] section, a \"name\"= or @= value "
                               "line, or a ; comment"),
    ('[HKCU\\A]\n"v"=x\n', 4, "unknown value data 'x': expected \"text\", dword:, hex:, hex(N): or -"),
    ('[HKCU\\A]\n"v"=\n', 4, "unknown value data ''"),
    ('[HKCU\\A]\n"v"=qword:0000000000000001\n', 4, "unknown value data 'qword:0000000000000001'"),
    ('[HKCU\\A]\n"v"=dword:1f\n', 4, "dword 1f must have exactly 8 hex digits (dword:0000001f)"),
    ('[HKCU\\A]\n"v"=dword:000000001\n', 4, "dword 000000001 must have exactly 8 hex digits"),
    ('[HKCU\\A]\n"v"=dword:100000000\n', 4, "dword 100000000 is out of range (more than 32 bits)"),
    ('[HKCU\\A]\n"v"=dword:0000001g\n', 4, "bad dword '0000001g': expected 8 hex digits, like dword:0000001f"),
    ('[HKCU\\A]\n"v"=dword:\n', 4, "bad dword ''"),
    ('[HKCU\\A]\n"v"=dword:-0000001\n', 4, "bad dword '-0000001'"),
    ('[HKCU\\A]\n"v"=dword:00000001 x\n', 4, "unexpected text 'x' after the value"),
    ('[HKCU\\A]\n"v"=hex:0g\n', 4, "bad hex byte '0g': bytes are one or two hex digits, like 1f"),
    ('[HKCU\\A]\n"v"=hex:100\n', 4, "bad hex byte '100'"),
    ('[HKCU\\A]\n"v"=hex:01 02\n', 4, "bad hex byte '01 02'"),
    ('[HKCU\\A]\n"v"=hex:01,02,\\\n  03,04,\\\n  05,zz,06\n', 6, "bad hex byte 'zz'"),
    ('[HKCU\\A]\n"v"=hex:01,02,\n', 4, "the hex data ends with a comma (is a '\\' line continuation missing?)"),
    ('[HKCU\\A]\n"v"=hex:01,\\\n\n', 5, "the hex data ends with a comma"),
    ('[HKCU\\A]\n"v"=hex:01,\\\n; comment\n  02\n', 5, "the hex data ends with a comma"),
    ('[HKCU\\A]\n"v"=hex:01,,02\n', 4, "a hex byte is missing between two commas"),
    ('[HKCU\\A]\n"v"=hex:,\n', 4, "a hex byte is missing between two commas"),
    ('[HKCU\\A]\n"v"=hex:01,\\', 4, "the hex data goes on ('\\' at the end of the line) past the end of the file"),
    ('[HKCU\\A]\n"v"=hex(z):01\n', 4, "bad value type hex(z): the type must be a hex number, like hex(2)"),
    ('[HKCU\\A]\n"v"=hex():01\n', 4, "bad value type hex()"),
    ('[HKCU\\A]\n"v"=hex(100000000):01\n', 4, "value type hex(100000000) is out of range (more than 32 bits)"),
    ('[HKCU\\A]\n"v"=hex(2:01\n', 4, "unknown value data 'hex(2:01'"),
    ("[HKLM\\SOFTWARE\\\\x]\n", 3, "key path 'HKLM\\SOFTWARE\\\\x' has an empty key name"),
    ("[HKLM\\SOFTWARE\\..\\SYSTEM]\n", 3, "key path 'HKLM\\SOFTWARE\\..\\SYSTEM' has a '..' component"),
])
def test_malformed_lines(body: str, line: int, message: str) -> None:
    caught = error(v5(body))
    assert isinstance(caught, UserError)
    assert (caught.source, caught.line) == ("test.reg", line)
    assert str(caught).startswith(f"test.reg, line {line}: {message}"), str(caught)


def test_errors_in_regedit4_files_too() -> None:
    caught = error(v4('[HKCU\\A]\n"v"=dword:1\n'))
    assert str(caught) == "test.reg, line 4: dword 1 must have exactly 8 hex digits (dword:00000001)"


def test_text_errors_name_the_source_given(tmp_path: Path) -> None:
    with pytest.raises(RegFileError, match=r"^policy\.reg, line 2: unexpected text 'oops'"):
        parse_reg_text(f"{V5}\noops", source="policy.reg")
    with pytest.raises(RegFileError, match=r"^<text>, line 1: not a \.reg file"):
        parse_reg_text("")


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(RegFileError, match=r"nope\.reg: cannot read the file: No such file or directory$"):
        parse_reg_file(tmp_path / "nope.reg")
    with pytest.raises(RegFileError, match="cannot read the file: Is a directory"):
        parse_reg_file(tmp_path)


# --- a file written the way `reg export` writes it -------------------------------------------------

REG_EXPORT = r'''Windows Registry Editor Version 5.00

[HKEY_LOCAL_MACHINE\SOFTWARE\Contoso]

[HKEY_LOCAL_MACHINE\SOFTWARE\Contoso\Widget Pro]
@="Contoso Widget Pro"
"Version"="4.2.1.1187"
"InstallDir"=hex(2):25,00,50,00,72,00,6f,00,67,00,72,00,61,00,6d,00,46,00,69,00,6c,00,65,00,73,\
  00,25,00,5c,00,43,00,6f,00,6e,00,74,00,6f,00,73,00,6f,00,5c,00,57,00,69,00,64,\
  00,67,00,65,00,74,00,20,00,50,00,72,00,6f,00,5c,00,62,00,69,00,6e,00,00,00
"Plugins"=hex(7):53,00,70,00,65,00,6c,00,6c,00,20,00,43,00,68,00,65,00,63,00,6b,00,65,00,72,\
  00,00,00,54,00,68,00,65,00,73,00,61,00,75,00,72,00,75,00,73,00,00,00,50,00,44,\
  00,46,00,20,00,45,00,78,00,70,00,6f,00,72,00,74,00,00,00,00,00
"Licence"=hex:10,11,12,13,14,15,16,17,18,19,1a,1b,1c,1d,1e,1f,20,21,22,23,24,25,26,27,28,\
  29,2a,2b,2c,2d,2e,2f,30,31,32,33,34,35,36,37,38,39,3a,3b,3c,3d,3e,3f,40,41,42,\
  43,44,45,46,47,48,49,4a,4b
"AutoUpdate"=dword:00000001
"MaxCacheBytes"=hex(b):00,00,00,40,01,00,00,00

[HKEY_LOCAL_MACHINE\SOFTWARE\Contoso\Widget Pro\Capabilities]
"ApplicationName"="@C:\\Program Files\\Contoso\\Widget Pro\\bin\\widget.exe,-101"

[HKEY_LOCAL_MACHINE\SOFTWARE\Contoso\Widget Pro\Capabilities\FileAssociations]
".wdg"="Contoso.Widget.Document"
".wdgx"="Contoso.Widget.Document"

'''


def test_a_reg_export_file() -> None:
    data = b"\xff\xfe" + crlf(REG_EXPORT).encode("utf-16-le")
    delta = parse_reg_bytes(data, source="widget.reg")
    key = r"Contoso\Widget Pro"
    assert list(delta) == [
        CreateKey("SOFTWARE", "Contoso"),
        SetValue("SOFTWARE", key, "", SZ, sz("Contoso Widget Pro")),
        SetValue("SOFTWARE", key, "Version", SZ, sz("4.2.1.1187")),
        SetValue("SOFTWARE", key, "InstallDir", EXPAND_SZ, sz(r"%ProgramFiles%\Contoso\Widget Pro\bin")),
        SetValue("SOFTWARE", key, "Plugins", MULTI_SZ, "Spell Checker\0Thesaurus\0PDF Export\0\0".encode("utf-16-le")),
        SetValue("SOFTWARE", key, "Licence", BINARY, bytes(range(0x10, 0x4C))),
        SetValue("SOFTWARE", key, "AutoUpdate", DWORD, b"\1\0\0\0"),
        SetValue("SOFTWARE", key, "MaxCacheBytes", QWORD, (0x1_4000_0000).to_bytes(8, "little")),
        SetValue("SOFTWARE", key + r"\Capabilities", "ApplicationName", SZ,
                 sz(r"@C:\Program Files\Contoso\Widget Pro\bin\widget.exe,-101")),
        SetValue("SOFTWARE", key + r"\Capabilities\FileAssociations", ".wdg", SZ, sz("Contoso.Widget.Document")),
        SetValue("SOFTWARE", key + r"\Capabilities\FileAssociations", ".wdgx", SZ, sz("Contoso.Widget.Document")),
    ]
    # Applied to a SOFTWARE hive it gives exactly this tree.
    software = Hive(RegistryKey("ROOT"))
    delta.apply({"SOFTWARE": software})
    tree = {path: sorted(key.values) for path, key in software.root.walk()}
    assert tree == {
        "": [], "Contoso": [],
        key: ["", "autoupdate", "installdir", "licence", "maxcachebytes", "plugins", "version"],
        key + r"\Capabilities": ["applicationname"],
        key + r"\Capabilities\FileAssociations": [".wdg", ".wdgx"],
    }
    # Written back, it reads the same; this sample's long values come out in the lines regedit writes.
    assert parse_reg_text(write_reg_text(delta)) == delta


# --- writing ---------------------------------------------------------------------------------------


def test_write_reg_text_layout() -> None:
    delta = RegistryDelta([
        SetValue("SOFTWARE", r"Contoso\App", "Name", SZ, sz('say "hi" \\o/')),
        SetValue("SOFTWARE", r"Contoso\App", "", SZ, sz("default")),
        SetValue("SOFTWARE", r"Contoso\App", "Count", DWORD, b"\x1f\0\0\0"),
        DeleteValue("SOFTWARE", r"Contoso\App", "Old"),
        SetValue("SOFTWARE", r"Contoso\App", "Blob", BINARY, b"\1\xab"),
        SetValue("SOFTWARE", r"Contoso\App", "Exp", EXPAND_SZ, sz("%A%")),
        SetValue("SOFTWARE", r"Contoso\App", "Quad", QWORD, b"\1" + b"\0" * 7),
        SetValue("SOFTWARE", r"Contoso\App", "Odd", 0x1234, b""),
        SetValue("SOFTWARE", r"Contoso\App", "NotTerminated", SZ, b"a\0"),
        SetValue("SOFTWARE", r"Contoso\App", "ShortDword", DWORD, b"\1"),
        SetValue("SOFTWARE", r"Contoso\App", "Newline", SZ, sz("a\r\nb")),
        DeleteValue("SOFTWARE", r"Contoso\App", ""),
        CreateKey("SYSTEM", r"ControlSet001\Services\W"),
        SetValue("SYSTEM", r"ControlSet001\Services\W", "Start", DWORD, b"\3\0\0\0"),
        DeleteKey("DEFAULT", r"Control Panel\Old"),
        SetValue("DRIVERS", "", "x", SZ, sz("")),
        SetValue("NTUSER", "Environment", "TEMP", SZ, sz("t")),
        SetValue("NTUSER", "environment", "TMP", SZ, sz("t")),
    ])
    assert write_reg_text(delta) == crlf(r'''Windows Registry Editor Version 5.00

[HKEY_LOCAL_MACHINE\SOFTWARE\Contoso\App]
"Name"="say \"hi\" \\o/"
@="default"
"Count"=dword:0000001f
"Old"=-
"Blob"=hex:01,ab
"Exp"=hex(2):25,00,41,00,25,00,00,00
"Quad"=hex(b):01,00,00,00,00,00,00,00
"Odd"=hex(1234):
"NotTerminated"=hex(1):61,00
"ShortDword"=hex(4):01
"Newline"=hex(1):61,00,0d,00,0a,00,62,00,00,00
@=-

[HKEY_LOCAL_MACHINE\SYSTEM\ControlSet001\Services\W]

[HKEY_LOCAL_MACHINE\SYSTEM\ControlSet001\Services\W]
"Start"=dword:00000003

[-HKEY_USERS\.DEFAULT\Control Panel\Old]

[HKEY_LOCAL_MACHINE\DRIVERS]
"x"=""

[HKEY_CURRENT_USER\Environment]
"TEMP"="t"

[HKEY_CURRENT_USER\environment]
"TMP"="t"

''')
    assert parse_reg_text(write_reg_text(delta)) == delta


def test_long_hex_data_wraps_like_regedit() -> None:
    data = "%SystemRoot%\\System32\\WindowsPowerShell\\v1.0\\Modules".encode("utf-16-le") * 3
    text = write_reg_text(RegistryDelta([SetValue("NTUSER", "Environment", "PSModulePath", EXPAND_SZ, data)]))
    lines = text.split("\r\n")[3:-2]
    assert lines[0].startswith('"PSModulePath"=hex(2):25,00,53,00,')
    assert all(len(line) <= 80 for line in lines)
    assert all(line.endswith(",\\") for line in lines[:-1])
    assert all(line.startswith("  ") and not line.startswith("   ") for line in lines[1:])
    assert [len(line) for line in lines[1:-1]] == [78] * (len(lines) - 2)  # 25 bytes a line
    assert not lines[-1].endswith(",")
    assert parse_reg_text(text) == RegistryDelta([SetValue("NTUSER", "Environment", "PSModulePath", EXPAND_SZ, data)])


def test_a_long_value_name_still_gets_bytes_on_its_first_line() -> None:
    name = "N" * 90
    text = write_reg_text(RegistryDelta([SetValue("NTUSER", "A", name, BINARY, b"\1\2")]))
    assert f'"{name}"=hex:01,\\\r\n  02\r\n' in text


def test_an_empty_delta_is_just_the_header() -> None:
    assert write_reg_text(RegistryDelta()) == f"{V5}\r\n\r\n"
    assert parse_reg_text(write_reg_text(RegistryDelta())) == RegistryDelta()


@pytest.mark.parametrize("op", [
    SetValue("NTUSER", "A", "two\nlines", SZ, sz("")),
    DeleteValue("NTUSER", "A", "nul\0"),
    CreateKey("NTUSER", "A\rB"),
])
def test_names_a_reg_file_cannot_hold_are_refused(op: Operation) -> None:
    with pytest.raises(RegFileError, match=r"contains a control character, which a \.reg file cannot hold"):
        write_reg_text(RegistryDelta([op]))


def test_files_round_trip(tmp_path: Path) -> None:
    delta = parse_reg_bytes(b"\xff\xfe" + crlf(REG_EXPORT).encode("utf-16-le"))
    path = tmp_path / "layer.reg"
    write_reg_file(delta, path)
    assert path.read_bytes().startswith(b"\xff\xfe" + V5.encode("utf-16-le") + b"\r\0\n\0")
    assert parse_reg_file(path) == delta
    assert encode_reg_text("x") == b"\xff\xfex\0"


# --- round trip, generated -------------------------------------------------------------------------

_name_text = st.text(st.characters(blacklist_categories=("Cs", "Cc")) | st.sampled_from("\t\\\"[];=@- \x7f\x85\u2028"),
                     max_size=12)
_key_name = _name_text.filter(lambda name: name not in ("", ".", "..") and "\\" not in name)
_key_path = st.lists(_key_name, max_size=4).map("\\".join)
_hive = st.sampled_from(["SOFTWARE", "SYSTEM", "DEFAULT", "DRIVERS", "NTUSER"])
_value_type = st.one_of(st.sampled_from([SZ, EXPAND_SZ, BINARY, DWORD, MULTI_SZ, QWORD, 0]),
                        st.integers(0, 0xFFFF_FFFF))
_value_data = st.one_of(st.binary(max_size=120), _name_text.map(sz), st.integers(0, 0xFFFF_FFFF).map(
    lambda n: n.to_bytes(4, "little")))


def _system_safe(hive: str, key: str) -> str:
    return "ControlSet001\\" + key if hive == "SYSTEM" and key.split("\\")[0].casefold() == "currentcontrolset" else key


_operation = st.one_of(
    st.builds(lambda h, k, n, t, d: SetValue(h, _system_safe(h, k), n, t, d),
              _hive, _key_path, _name_text, _value_type, _value_data),
    st.builds(lambda h, k, n: DeleteValue(h, _system_safe(h, k), n), _hive, _key_path, _name_text),
    st.builds(lambda h, k: DeleteKey(h, _system_safe(h, k) or "K"), _hive, _key_path),
    st.builds(lambda h, k: CreateKey(h, _system_safe(h, k)), _hive, _key_path),
)


@settings(max_examples=300, database=None, deadline=None)
@given(st.lists(_operation, max_size=12).map(RegistryDelta))
def test_write_then_parse_gives_the_same_delta(delta: RegistryDelta) -> None:
    text = write_reg_text(delta)
    assert parse_reg_text(text) == delta
    assert parse_reg_bytes(encode_reg_text(text)) == delta
