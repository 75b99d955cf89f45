"""``.reg`` files (what regedit and ``reg export`` write) read into and written from a :class:`RegistryDelta`.

Reading follows the format regedit writes and imports, strictly: anything regedit would skip silently is
an error here, naming the file and the line, so an administrator never gets half a layer's settings.

Format rules (and the choices made where regedit's behaviour is loose or unknown):

* Line 1 is ``Windows Registry Editor Version 5.00`` or ``REGEDIT4`` (trailing blanks allowed, nothing
  before it). 5.00 files are UTF-16LE with a byte order mark as regedit writes them; UTF-8 (with or
  without BOM) and UTF-16 (BE with a BOM, LE without one) are read too. REGEDIT4 files without a BOM are
  ANSI, read as Windows-1252 (the five bytes cp1252 leaves undefined map to U+0081… as Windows does).
* Lines end in CRLF or LF. Blank lines and lines whose first non-blank character is ``;`` are ignored; a
  ``;`` comment may also follow a section's ``]`` or a value's data (not inside a string).
* ``[path]`` starts a section, ``[-path]`` deletes the key and its subtree. The path ends at the last
  ``]`` on the line (key names may contain ``]``); it is not trimmed (key names may end in blanks).
  Empty key names (``a\\\\b``, a trailing ``\\``) and ``.``/``..`` components are errors.
* A section with no value lines creates its key (:class:`CreateKey`); a section with value lines only
  yields their operations – setting a value creates its key anyway, and a section that only deletes values
  does not create a key that is not there.
* Value lines: ``"name"=…`` or ``@=…`` (the default value), blanks allowed around ``=``. In strings the
  only escapes are ``\\\\`` and ``\\"``; any other backslash sequence is an error. Data:
  ``"text"`` (REG_SZ, stored as UTF-16LE with its terminating NUL), ``dword:`` with exactly 8 hex digits,
  ``hex:`` (REG_BINARY) or ``hex(N):`` with N in hex (any 32-bit type, ``hex(b)`` being REG_QWORD) followed
  by comma-separated bytes of one or two hex digits, and ``-`` to delete the value. Hex data continues on
  the next line after a trailing ``\\`` (the next line's leading blanks are skipped); a final comma with no
  continuation is an error. Type prefixes are case-insensitive.
* In 5.00 files hex bytes are kept as given. In REGEDIT4 files ``hex(1)``, ``hex(2)`` and ``hex(7)`` data
  are ANSI strings; they are converted to UTF-16LE, as regedit does when importing REGEDIT4 on NT.
* Roots: ``HKEY_LOCAL_MACHINE\\SOFTWARE`` → SOFTWARE, ``…\\SYSTEM`` → SYSTEM (``CurrentControlSet`` →
  the current control set), ``…\\DRIVERS`` → DRIVERS, ``HKEY_USERS\\.DEFAULT`` → DEFAULT,
  ``HKEY_CURRENT_USER`` → NTUSER (the default user profile), ``HKEY_CLASSES_ROOT`` → ``SOFTWARE\\Classes``;
  ``HKLM``, ``HKCU``, ``HKU`` and ``HKCR`` are accepted, root names case-insensitively. Every other root or
  hive (SAM, SECURITY, HARDWARE, another user's SID, HKEY_CURRENT_CONFIG) is refused.
"""

from __future__ import annotations

import re
from pathlib import Path

from app.engine.registry.delta import (
    CreateKey,
    DeleteKey,
    DeleteValue,
    HiveName,
    Operation,
    RegistryDelta,
    RegistryDeltaError,
    SetValue,
)
from app.engine.registry.model import ValueType, fold
from app.errors import UserError

HEADER_V5 = "Windows Registry Editor Version 5.00"
HEADER_V4 = "REGEDIT4"


class RegFileError(UserError):
    """A ``.reg`` file cannot be read (or a delta cannot be written as one); says where and why."""

    code = "reg_file"

    def __init__(self, reason: str, *, source: str | None = None, line: int | None = None) -> None:
        where = source or ""
        if line is not None:
            where = f"{where}, line {line}" if where else f"line {line}"
        super().__init__(f"{where}: {reason}" if where else reason)
        self.reason = reason
        self.source = source
        self.line = line


# --- decoding ----------------------------------------------------------------------------------------


def _ansi_to_text(data: bytes) -> str:
    """Windows-1252, with the bytes cp1252 leaves undefined mapped to the same code point (as Windows does)."""
    text = data.decode("cp1252", errors="surrogateescape")
    return re.sub("[\udc80-\udcff]", lambda m: chr(ord(m.group()) - 0xDC00), text)


def _utf16(data: bytes, encoding: str, source: str) -> str:
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        start = exc.start - exc.start % 2
        line = data[:start].decode(encoding, errors="replace").count("\n") + 1
        raise RegFileError("not a text file: the UTF-16 text is broken here", source=source, line=line) from None


def decode_reg_bytes(data: bytes, *, source: str = "<bytes>") -> str:
    """The text of a ``.reg`` file's bytes (see the module docstring for the encodings read)."""
    if data.startswith(b"\xff\xfe"):
        return _utf16(data[2:], "utf-16-le", source)
    if data.startswith(b"\xfe\xff"):
        return _utf16(data[2:], "utf-16-be", source)
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    elif len(data) >= 2 and data[0] != 0 and data[1] == 0:
        return _utf16(data, "utf-16-le", source)
    first_line = data.split(b"\n", 1)[0].rstrip(b"\r \t")
    if first_line == HEADER_V4.encode("ascii"):
        return _ansi_to_text(data)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        if first_line != HEADER_V5.encode("ascii"):
            raise _missing_header(source) from None
        line = data[: exc.start].count(b"\n") + 1
        raise RegFileError("not valid UTF-8 text (save the file as Unicode, which is UTF-16LE, or as UTF-8)",
                           source=source, line=line) from None


def _missing_header(source: str) -> RegFileError:
    return RegFileError(f"not a .reg file: the first line must be {HEADER_V5!r} or {HEADER_V4!r}",
                        source=source, line=1)


# --- parsing -----------------------------------------------------------------------------------------

_BLANKS = " \t"
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f]")
_STRING = re.compile(r'"((?:[^"\\]|\\.)*)"', re.DOTALL)
_ESCAPE = re.compile(r"\\(.)", re.DOTALL)
_HEX_PREFIX = re.compile(r"hex(?:\(([^)]*)\))?:", re.IGNORECASE)
_DWORD_PREFIX = re.compile(r"dword:", re.IGNORECASE)
_HEX_BYTE = re.compile(r"[0-9a-fA-F]{1,2}")
_HEX_DIGITS = re.compile(r"[0-9a-fA-F]+")
_HEX_LIST = re.compile(r"[0-9a-fA-F]{2}(?:,[0-9a-fA-F]{2})*")
_ANSI_STRING_TYPES = (ValueType.SZ, ValueType.EXPAND_SZ, ValueType.MULTI_SZ)


class _Section:
    __slots__ = ("deleting", "hive", "key", "placeholder")

    def __init__(self, hive: str, key: str, *, deleting: bool, placeholder: int | None) -> None:
        self.hive, self.key, self.deleting = hive, key, deleting
        #: Where this section's CreateKey sits in the operations, dropped when a value line follows.
        self.placeholder = placeholder


class _Parser:
    def __init__(self, text: str, source: str, current_control_set: str) -> None:
        self.source = source
        self.current_control_set = current_control_set
        if text.startswith("\ufeff"):
            text = text[1:]
        self.lines = [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]
        self.index = 0
        self.ops: list[Operation] = []
        self.section: _Section | None = None
        self.ansi = False

    def error(self, reason: str, line: int | None = None) -> RegFileError:
        return RegFileError(reason, source=self.source, line=self.index + 1 if line is None else line)

    # --- driver --------------------------------------------------------------------------------

    def parse(self) -> RegistryDelta:
        header = self.lines[0].rstrip(_BLANKS) if self.lines else ""
        if header not in (HEADER_V5, HEADER_V4):
            raise _missing_header(self.source)
        self.ansi = header == HEADER_V4
        for number, line in enumerate(self.lines, 1):
            bad = _CONTROL.search(line)
            if bad is not None:
                char = bad.group()
                if char == "\0":
                    reason = "NUL character: this is not a text .reg file (or a UTF-16 file without its BOM)"
                elif char == "\r":
                    reason = "stray carriage return (lines must end in CRLF or LF)"
                else:
                    reason = f"control character U+{ord(char):04X}: this is not a text .reg file"
                raise self.error(reason, number)
        self.index = 1
        while self.index < len(self.lines):
            line = self.lines[self.index].lstrip(_BLANKS)
            if line and not line.startswith(";"):
                if line.startswith("["):
                    self.parse_section(line)
                elif line.startswith(('"', "@")):
                    self.parse_value(line)
                else:
                    raise self.error(f"unexpected text {_excerpt(line)}: expected a [key] section, "
                                     'a "name"= or @= value line, or a ; comment')
            self.index += 1
        return RegistryDelta(self.ops)

    # --- sections ------------------------------------------------------------------------------

    def parse_section(self, line: str) -> None:
        end = line.rfind("]")
        if end < 0:
            raise self.error("unterminated section: the line has no closing ']'")
        rest = line[end + 1:].strip(_BLANKS)
        if rest and not rest.startswith(";"):
            raise self.error(f"unexpected text {_excerpt(rest)} after the section's closing ']'")
        path = line[1:end]
        deleting = path.startswith("-")
        if deleting:
            path = path[1:]
        hive, key = self.map_path(path)
        if deleting:
            if key == "":
                raise self.error(f"[-{path}] would delete the whole {hive} hive; delete keys below it instead")
            self.ops.append(self.make(DeleteKey, hive, key))
            self.section = _Section(hive, key, deleting=True, placeholder=None)
        else:
            self.ops.append(self.make(CreateKey, hive, key))
            self.section = _Section(hive, key, deleting=False, placeholder=len(self.ops) - 1)

    def map_path(self, path: str) -> tuple[str, str]:
        """(hive, key path inside it) for a section's path, or a clear error."""
        if path == "":
            raise self.error("a section must name a key: [] is empty")
        parts = path.split("\\")
        for part in parts:
            if part == "":
                raise self.error(f"key path '{path}' has an empty key name (a doubled or trailing '\\')")
            if part in (".", ".."):
                raise self.error(f"key path '{path}' has a '{part}' component")
        root, rest = fold(parts[0]), parts[1:]
        if root in ("hkey_local_machine", "hklm"):
            if not rest:
                raise self.error(f"{parts[0]} itself cannot be changed: name a key below SOFTWARE, SYSTEM or DRIVERS")
            hive_name = fold(rest[0])
            if hive_name == "software":
                return HiveName.SOFTWARE, "\\".join(rest[1:])
            if hive_name == "system":
                keys = rest[1:]
                if keys and fold(keys[0]) == "currentcontrolset":
                    keys = [self.current_control_set, *keys[1:]]
                return HiveName.SYSTEM, "\\".join(keys)
            if hive_name == "drivers":
                return HiveName.DRIVERS, "\\".join(rest[1:])
            if hive_name in ("sam", "security"):
                raise self.error(f"{parts[0]}\\{rest[0]} cannot be changed by a layer: "
                                 "the SAM and SECURITY hives come only from the OS layer")
            if hive_name == "hardware":
                raise self.error(f"{parts[0]}\\{rest[0]} cannot be changed by a layer: Windows builds it at every boot")
            raise self.error(f"{parts[0]}\\{rest[0]} is not a hive a layer can change "
                             "(HKEY_LOCAL_MACHINE\\SOFTWARE, \\SYSTEM or \\DRIVERS)")
        if root in ("hkey_users", "hku"):
            if not rest:
                raise self.error(f"{parts[0]} itself cannot be changed: name a key below {parts[0]}\\.DEFAULT")
            if fold(rest[0]) == ".default":
                return HiveName.DEFAULT, "\\".join(rest[1:])
            if fold(rest[0]).startswith("s-1-"):
                raise self.error(f"{parts[0]}\\{rest[0]} is one user's own hive, which layers do not change: "
                                 "use HKEY_CURRENT_USER for the default user profile")
            raise self.error(f"{parts[0]}\\{rest[0]} is not a hive a layer can change "
                             f"(only {parts[0]}\\.DEFAULT)")
        if root in ("hkey_current_user", "hkcu"):
            return HiveName.NTUSER, "\\".join(rest)
        if root in ("hkey_classes_root", "hkcr"):
            return HiveName.SOFTWARE, "\\".join(["Classes", *rest])
        if root in ("hkey_current_config", "hkcc"):
            raise self.error(f"{parts[0]} cannot be changed by a layer: Windows builds it at boot "
                             "(change HKEY_LOCAL_MACHINE\\SYSTEM\\CurrentControlSet\\Hardware Profiles instead)")
        raise self.error(f"unknown root key {parts[0]!r} (expected HKEY_LOCAL_MACHINE, HKEY_CURRENT_USER, "
                         "HKEY_USERS or HKEY_CLASSES_ROOT)")

    # --- values --------------------------------------------------------------------------------

    def parse_value(self, line: str) -> None:
        section = self.section
        if section is None:
            raise self.error("a value line before any [key] section")
        if section.deleting:
            raise self.error("a value line in a [-key] deletion section (the key is being deleted)")
        if line.startswith("@"):
            name, pos = "", 1
        else:
            name, pos = self.read_string(line, 0)
        pos = _skip_blanks(line, pos)
        if not line.startswith("=", pos):
            what = "@" if name == "" else "the value name"
            found = _excerpt(line[pos:]) if line[pos:] else "the end of the line"
            raise self.error(f"expected '=' after {what}, found {found}")
        pos = _skip_blanks(line, pos + 1)
        op = self.parse_data(section, name, line, pos)
        if section.placeholder is not None:
            del self.ops[section.placeholder]
            section.placeholder = None
        self.ops.append(op)

    def parse_data(self, section: _Section, name: str, line: str, pos: int) -> Operation:
        hive, key = section.hive, section.key
        data = line[pos:]
        if data.startswith("-"):
            self.expect_end(line, pos + 1)
            return self.make(DeleteValue, hive, key, name)
        if data.startswith('"'):
            text, end = self.read_string(line, pos)
            self.expect_end(line, end)
            return self.make(SetValue, hive, key, name, int(ValueType.SZ), (text + "\0").encode("utf-16-le"))
        dword = _DWORD_PREFIX.match(line, pos)
        if dword is not None:
            return self.make(SetValue, hive, key, name, int(ValueType.DWORD), self.read_dword(line, dword.end()))
        hex_prefix = _HEX_PREFIX.match(line, pos)
        if hex_prefix is not None:
            type_text = hex_prefix.group(1)
            if type_text is None:
                value_type = int(ValueType.BINARY)
            elif not _HEX_DIGITS.fullmatch(type_text):
                raise self.error(f"bad value type hex({type_text}): the type must be a hex number, like hex(2)")
            elif int(type_text, 16) > 0xFFFF_FFFF:
                raise self.error(f"value type hex({type_text}) is out of range (more than 32 bits)")
            else:
                value_type = int(type_text, 16)
            raw = self.read_hex(line[hex_prefix.end():])
            if self.ansi and value_type in _ANSI_STRING_TYPES:
                raw = _ansi_to_text(raw).encode("utf-16-le")
            return self.make(SetValue, hive, key, name, value_type, raw)
        raise self.error(f"unknown value data {_excerpt(data)}: expected \"text\", dword:, hex:, hex(N): or -")

    def read_string(self, line: str, pos: int) -> tuple[str, int]:
        match = _STRING.match(line, pos)
        if match is None:
            raise self.error("unterminated string: missing the closing '\"'")

        def unescape(escape: re.Match[str]) -> str:
            char = escape.group(1)
            if char not in '\\"':
                raise self.error(f"unknown escape '\\{char}' in a string (only \\\\ and \\\" are escapes)")
            return char

        return _ESCAPE.sub(unescape, match.group(1)), match.end()

    def read_dword(self, line: str, pos: int) -> bytes:
        end = pos
        while end < len(line) and line[end] not in _BLANKS + ";":
            end += 1
        digits = line[pos:end]
        self.expect_end(line, end)
        if not _HEX_DIGITS.fullmatch(digits):
            raise self.error(f"bad dword {digits!r}: expected 8 hex digits, like dword:0000001f")
        if int(digits, 16) > 0xFFFF_FFFF:
            raise self.error(f"dword {digits} is out of range (more than 32 bits)")
        if len(digits) != 8:
            raise self.error(f"dword {digits} must have exactly 8 hex digits (dword:{int(digits, 16):08x})")
        return int(digits, 16).to_bytes(4, "little")

    def read_hex(self, rest: str) -> bytes:
        """The bytes of hex data starting with ``rest``, following ``\\`` continuations to later lines."""
        pieces: list[tuple[int, str]] = []
        text, number = rest, self.index + 1
        while True:
            text = text.split(";", 1)[0].strip(_BLANKS)
            if not text.endswith("\\"):
                pieces.append((number, text))
                break
            pieces.append((number, text[:-1]))
            if self.index + 1 >= len(self.lines):
                raise self.error("the hex data goes on ('\\' at the end of the line) past the end of the file")
            self.index += 1
            text, number = self.lines[self.index], self.index + 1

        combined = "".join(piece for _, piece in pieces)
        if _HEX_LIST.fullmatch(combined):  # the usual case, as regedit writes it
            return bytes.fromhex(combined.replace(",", ""))
        tokens: list[tuple[int, str]] = []
        current, current_line = "", pieces[0][0]
        for number, piece in pieces:
            for position, part in enumerate(piece.split(",")):
                if position:
                    tokens.append((current_line, current))
                    current, current_line = "", number
                if not current.strip(_BLANKS):
                    current_line = number
                current += part
        tokens.append((current_line, current))

        if len(tokens) == 1 and not tokens[0][1].strip(_BLANKS):
            return b""
        out = bytearray()
        for position, (number, token) in enumerate(tokens):
            token = token.strip(_BLANKS)
            if token == "":
                if position == len(tokens) - 1:
                    raise self.error("the hex data ends with a comma (is a '\\' line continuation missing?)", number)
                raise self.error("a hex byte is missing between two commas", number)
            if not _HEX_BYTE.fullmatch(token):
                raise self.error(f"bad hex byte {_excerpt(token)}: bytes are one or two hex digits, like 1f", number)
            out.append(int(token, 16))
        return bytes(out)

    def expect_end(self, line: str, pos: int) -> None:
        rest = line[pos:].strip(_BLANKS)
        if rest and not rest.startswith(";"):
            raise self.error(f"unexpected text {_excerpt(rest)} after the value")

    def make(self, kind: type[Operation], *args: object) -> Operation:
        try:
            return kind(*args)  # type: ignore[arg-type]
        except RegistryDeltaError as exc:
            raise self.error(exc.message) from None


def _skip_blanks(line: str, pos: int) -> int:
    while pos < len(line) and line[pos] in _BLANKS:
        pos += 1
    return pos


def _excerpt(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "…")


def _check_control_set(name: str) -> None:
    if not name or "\\" in name or name in (".", "..") or fold(name) == "currentcontrolset":
        raise ValueError(f"not a control set key name: {name!r} (expected a name like ControlSet001)")


def parse_reg_text(text: str, *, source: str = "<text>", current_control_set: str = "ControlSet001") -> RegistryDelta:
    """Parse a ``.reg`` document already decoded to text. ``source`` names it in error messages;
    ``HKEY_LOCAL_MACHINE\\SYSTEM\\CurrentControlSet`` becomes ``SYSTEM\\<current_control_set>``."""
    _check_control_set(current_control_set)
    return _Parser(text, source, current_control_set).parse()


def parse_reg_bytes(data: bytes, *, source: str = "<bytes>",
                    current_control_set: str = "ControlSet001") -> RegistryDelta:
    """Parse a ``.reg`` file's bytes (any encoding :func:`decode_reg_bytes` reads)."""
    _check_control_set(current_control_set)
    return parse_reg_text(decode_reg_bytes(data, source=source), source=source,
                          current_control_set=current_control_set)


def parse_reg_file(path: Path, *, current_control_set: str = "ControlSet001") -> RegistryDelta:
    """Parse the ``.reg`` file at ``path`` (errors name the file and the line)."""
    try:
        data = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        raise RegFileError(f"cannot read the file: {exc.strerror}", source=str(path)) from None
    return parse_reg_bytes(data, source=str(path), current_control_set=current_control_set)


# --- writing -----------------------------------------------------------------------------------------

_ROOTS: dict[str, str] = {
    HiveName.SOFTWARE: "HKEY_LOCAL_MACHINE\\SOFTWARE",
    HiveName.SYSTEM: "HKEY_LOCAL_MACHINE\\SYSTEM",
    HiveName.DEFAULT: "HKEY_USERS\\.DEFAULT",
    HiveName.DRIVERS: "HKEY_LOCAL_MACHINE\\DRIVERS",
    HiveName.NTUSER: "HKEY_CURRENT_USER",
}
_LINE_WIDTH = 80
_UNWRITABLE = re.compile(r"[\x00-\x08\x0a-\x1f]")


def _writable(text: str, what: str) -> str:
    if _UNWRITABLE.search(text):
        raise RegFileError(f"{what} {text!r} contains a control character, which a .reg file cannot hold")
    return text


def _section_path(hive: str, key: str) -> str:
    root = _ROOTS[hive]
    return f"{root}\\{_writable(key, 'key path')}" if key else root


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _sz_text(data: bytes) -> str | None:
    """The text a REG_SZ value's data can be written as ``"..."`` with, or ``None`` (then it is hex(1))."""
    if len(data) < 2 or len(data) % 2 or data[-2:] != b"\0\0":
        return None
    try:
        text = data[:-2].decode("utf-16-le")
    except UnicodeDecodeError:
        return None
    if _UNWRITABLE.search(text):
        return None
    return text


def _hex_lines(prefix: str, data: bytes) -> list[str]:
    """``prefix`` followed by the bytes as regedit writes them: lines of at most 80 columns (the ``\\``
    continuation included), continuation lines indented by two blanks, at least one byte a line."""
    text = data.hex(",")  # every byte takes 3 columns with its comma, the last one 2
    lines: list[str] = []
    line, position = prefix, 0
    while True:
        rest = len(data) - position
        count = max(1, (_LINE_WIDTH - 1 - len(line)) // 3)
        if len(line) + 3 * rest - 1 <= _LINE_WIDTH or count >= rest:
            lines.append(line + text[3 * position:])
            return lines
        lines.append(line + text[3 * position:3 * (position + count)] + "\\")
        line, position = "  ", position + count


def _value_lines(op: SetValue | DeleteValue) -> list[str]:
    name = "@" if op.name == "" else _quote(_writable(op.name, "value name"))
    if isinstance(op, DeleteValue):
        return [f"{name}=-"]
    if op.type == ValueType.SZ:
        text = _sz_text(op.data)
        if text is not None:
            return [f"{name}={_quote(text)}"]
    if op.type == ValueType.DWORD and len(op.data) == 4:
        return [f"{name}=dword:{int.from_bytes(op.data, 'little'):08x}"]
    kind = "hex" if op.type == ValueType.BINARY else f"hex({op.type:x})"
    return _hex_lines(f"{name}={kind}:", op.data)


def write_reg_text(delta: RegistryDelta) -> str:
    """The delta as a ``Windows Registry Editor Version 5.00`` document (CRLF line ends) that
    :func:`parse_reg_text` reads back to an equal delta.

    Consecutive value operations on the same key share a section; a :class:`CreateKey` is a section of its
    own with no values and a :class:`DeleteKey` a ``[-key]`` section. REG_SZ data that is a NUL-terminated
    UTF-16LE string is written as ``"text"``, 4-byte REG_DWORD as ``dword:``, everything else as hex.
    Names with control characters (line breaks…) cannot be written: :class:`RegFileError`.
    """
    blocks: list[list[str]] = []
    current: tuple[str, str] | None = None
    for op in delta:
        if isinstance(op, SetValue | DeleteValue):
            if current != (op.hive, op.key):
                blocks.append([f"[{_section_path(op.hive, op.key)}]"])
                current = (op.hive, op.key)
            blocks[-1].extend(_value_lines(op))
        else:
            prefix = "-" if isinstance(op, DeleteKey) else ""
            blocks.append([f"[{prefix}{_section_path(op.hive, op.key)}]"])
            current = None
    lines = [HEADER_V5, ""]
    for block in blocks:
        lines.extend(block)
        lines.append("")
    return "\r\n".join(lines) + "\r\n"


def encode_reg_text(text: str) -> bytes:
    """``.reg`` text as regedit writes files: UTF-16LE with a byte order mark."""
    return b"\xff\xfe" + text.encode("utf-16-le")


def write_reg_file(delta: RegistryDelta, path: Path) -> None:
    """Write the delta to ``path`` as regedit would (UTF-16LE with BOM, CRLF)."""
    path.write_bytes(encode_reg_text(write_reg_text(delta)))

