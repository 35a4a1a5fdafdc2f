"""Read and rewrite WebAssembly binaries, just enough to make an app's whole state capturable.

An app's state includes every mutable global, exported or not. Wasm gives an embedder no way to
reach a global the module does not export, so before compiling we add an export for each hidden
mutable global under a reserved name. We also refuse modules whose state could not be captured:
ones that mutate tables or drop segments, share or import memory, or hold globals of a type a
snapshot cannot carry.

Pure code: bytes in, bytes out. wasmtime validates the module first, so this decoder only has to
understand the features the engine enables (see `mesh.runtime.make_engine`); anything else is
refused as unsupported.
"""

from __future__ import annotations

from dataclasses import dataclass

from mesh.errors import ModuleError

MAGIC = b"\0asm\x01\0\0\0"
RESERVED_PREFIX = "__mesh_"
GLOBAL_EXPORT_PREFIX = "__mesh_global_"

_SEC_IMPORT, _SEC_MEMORY, _SEC_GLOBAL, _SEC_EXPORT, _SEC_CODE = 2, 5, 6, 7, 10
# Sections that must come after the export section, in the order the spec requires.
_AFTER_EXPORT = {8, 9, 12, 10, 11}

_VALTYPES = {0x7F: "i32", 0x7E: "i64", 0x7D: "f32", 0x7C: "f64", 0x7B: "v128",
             0x70: "funcref", 0x6F: "externref"}
_CAPTURABLE = {"i32", "i64", "f32", "f64"}
_IMPORT_KINDS = {0: "function", 1: "table", 2: "memory", 3: "global", 4: "tag"}

# Immediate layouts of one-byte opcodes. Missing opcodes carry no immediates when they lie in
# the numeric range 0x45..0xC4; any other missing opcode is unsupported.
_U32, _U32X2, _MEMARG, _BLOCK = "u32", "u32x2", "memarg", "block"
_OPS: dict[int, str] = {
    0x00: "", 0x01: "", 0x02: _BLOCK, 0x03: _BLOCK, 0x04: _BLOCK, 0x05: "", 0x0B: "",
    0x0C: _U32, 0x0D: _U32, 0x0E: "br_table", 0x0F: "", 0x10: _U32, 0x11: _U32X2,
    0x12: _U32, 0x13: _U32X2, 0x1A: "", 0x1B: "", 0x1C: "select_t",
    0x20: _U32, 0x21: _U32, 0x22: _U32, 0x23: _U32, 0x24: _U32, 0x25: _U32, 0x26: _U32,
    0x3F: _U32, 0x40: _U32, 0x41: "s32", 0x42: "s64", 0x43: "f32", 0x44: "f64",
    0xD0: "heaptype", 0xD1: "", 0xD2: _U32,
}
_OPS.update(dict.fromkeys(range(0x28, 0x3F), _MEMARG))
_OPS.update(dict.fromkeys(range(0x45, 0xC5), ""))

# 0xFC-prefixed (saturating truncation, bulk memory, reference types) sub-opcodes.
_FC_OPS: dict[int, str] = dict.fromkeys(range(8), "")
_FC_OPS.update({8: _U32X2, 9: _U32, 10: _U32X2, 11: _U32, 12: _U32X2, 13: _U32,
                14: _U32X2, 15: _U32, 16: _U32, 17: _U32})

# Instructions that change state a snapshot cannot hold.
_UNCAPTURABLE = {
    (0x26, None): "table.set",
    (0xFC, 9): "data.drop",
    (0xFC, 12): "table.init",
    (0xFC, 13): "elem.drop",
    (0xFC, 14): "table.copy",
    (0xFC, 15): "table.grow",
    (0xFC, 17): "table.fill",
}


def _simd_immediates(sub: int) -> str:
    if sub <= 11 or sub in (92, 93):
        return _MEMARG
    if sub in (12, 13):
        return "bytes16"
    if 21 <= sub <= 34:
        return "lane"
    if 84 <= sub <= 91:
        return "memarg_lane"
    return ""


@dataclass(frozen=True, slots=True)
class MutableGlobal:
    """A mutable global defined by the module, and the export it can be reached under."""

    index: int
    valtype: str
    export: str


@dataclass(frozen=True, slots=True)
class Instrumented:
    """A module rewritten so that all of its state is reachable from the host."""

    wasm: bytes
    globals: tuple[MutableGlobal, ...]
    exports: tuple[str, ...]


class _Reader:
    __slots__ = ("data", "end", "pos")

    def __init__(self, data: bytes, pos: int = 0, end: int | None = None) -> None:
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else end

    def at_end(self) -> bool:
        return self.pos >= self.end

    def byte(self) -> int:
        if self.pos >= self.end:
            raise ModuleError("truncated module")
        value = self.data[self.pos]
        self.pos += 1
        return value

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > self.end:
            raise ModuleError("truncated module")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def uleb(self, max_bits: int = 32) -> int:
        return self._leb(max_bits, signed=False)

    def sleb(self, max_bits: int) -> int:
        return self._leb(max_bits, signed=True)

    def _leb(self, max_bits: int, signed: bool) -> int:
        result = shift = 0
        while True:
            b = self.byte()
            result |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                if signed and b & 0x40:
                    result -= 1 << shift
                return result
            if shift >= max_bits + 7:
                raise ModuleError("malformed LEB128 integer")

    def name(self) -> str:
        raw = self.take(self.uleb())
        try:
            return raw.decode()
        except UnicodeDecodeError as exc:
            raise ModuleError("malformed UTF-8 name") from exc


def _uleb(value: int) -> bytes:
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _sections(wasm: bytes) -> list[tuple[int, int, int, int]]:
    """(id, start of the section header, start of payload, end) for every section."""
    if wasm[:8] != MAGIC:
        raise ModuleError("not a WebAssembly core module (bad magic or version)")
    reader = _Reader(wasm, 8)
    sections = []
    while not reader.at_end():
        header = reader.pos
        section_id = reader.byte()
        size = reader.uleb()
        start = reader.pos
        reader.take(size)
        sections.append((section_id, header, start, reader.pos))
    return sections


def _valtype(reader: _Reader) -> str:
    code = reader.byte()
    if code not in _VALTYPES:
        raise ModuleError(f"unsupported value type 0x{code:02x}")
    return _VALTYPES[code]


def _limits(reader: _Reader) -> int:
    flags = reader.byte()
    if flags & ~0x07:
        raise ModuleError(f"unsupported limits flags 0x{flags:02x}")
    bits = 64 if flags & 0x04 else 32
    reader.uleb(bits)
    if flags & 0x01:
        reader.uleb(bits)
    return flags


def _scan_instructions(reader: _Reader, where: str) -> None:
    """Decode instructions up to the reader's end; refuse any that change uncapturable state."""
    while not reader.at_end():
        op = reader.byte()
        sub: int | None = None
        if op == 0xFC:
            sub = reader.uleb()
            layout = _FC_OPS.get(sub)
        elif op == 0xFD:
            sub = reader.uleb()
            layout = _simd_immediates(sub)
        else:
            layout = _OPS.get(op)
        if layout is None:
            code = f"0x{op:02x}" if sub is None else f"0x{op:02x} {sub}"
            raise ModuleError(f"unsupported instruction {code} in {where}")
        name = _UNCAPTURABLE.get((op, sub))
        if name:
            raise ModuleError(
                f"{where} uses {name}: table and segment state cannot be captured in a snapshot")
        _skip_immediates(reader, layout)


def _skip_immediates(reader: _Reader, layout: str) -> None:
    if layout in ("", "lane"):
        if layout == "lane":
            reader.byte()
    elif layout == _U32:
        reader.uleb()
    elif layout == _U32X2:
        reader.uleb()
        reader.uleb()
    elif layout in (_MEMARG, "memarg_lane"):
        reader.uleb()
        reader.uleb(64)
        if layout == "memarg_lane":
            reader.byte()
    elif layout in (_BLOCK, "heaptype"):
        code = reader.byte()
        if code != 0x40 and code not in _VALTYPES:
            reader.pos -= 1
            reader.sleb(33)
    elif layout == "br_table":
        for _ in range(reader.uleb() + 1):
            reader.uleb()
    elif layout == "select_t":
        for _ in range(reader.uleb()):
            _valtype(reader)
    elif layout == "s32":
        reader.sleb(32)
    elif layout == "s64":
        reader.sleb(64)
    else:
        reader.take({"f32": 4, "f64": 8, "bytes16": 16}[layout])


def _skip_const_expr(reader: _Reader, where: str) -> None:
    """Skip a constant expression: it holds no blocks, so the first `end` closes it."""
    while (op := reader.byte()) != 0x0B:
        layout = _OPS.get(op) if op != 0xFD else _simd_immediates(reader.uleb())
        if layout is None or layout in (_BLOCK, "br_table"):
            raise ModuleError(f"unsupported constant expression in {where}")
        _skip_immediates(reader, layout)


def _imports(reader: _Reader) -> int:
    """Count imported functions; refuse imports that would hide state."""
    functions = 0
    for _ in range(reader.uleb()):
        module, name = reader.name(), reader.name()
        kind = reader.byte()
        if kind == 0:
            reader.uleb()
            functions += 1
            continue
        label = _IMPORT_KINDS.get(kind, f"kind {kind}")
        raise ModuleError(
            f"imports a {label} ({module}.{name}): an app must define its own memory, "
            "tables and globals so that its state can be captured")
    return functions


def _globals(reader: _Reader, first_index: int) -> list[tuple[int, str]]:
    """(index, value type) of each mutable global defined in the section."""
    mutable = []
    for i in range(reader.uleb()):
        valtype = _valtype(reader)
        is_mutable = reader.byte() == 1
        _skip_const_expr(reader, f"global {first_index + i}")
        if not is_mutable:
            continue
        if valtype not in _CAPTURABLE:
            raise ModuleError(
                f"global {first_index + i} is a mutable {valtype}: it cannot be captured")
        mutable.append((first_index + i, valtype))
    return mutable


def _exports(reader: _Reader) -> list[tuple[str, int, int]]:
    exports = []
    for _ in range(reader.uleb()):
        name = reader.name()
        kind = reader.byte()
        exports.append((name, kind, reader.uleb()))
    return exports


def _scan_code(reader: _Reader, first_function: int) -> None:
    for i in range(reader.uleb()):
        size = reader.uleb()
        body = _Reader(reader.data, reader.pos, reader.pos + size)
        reader.take(size)
        for _ in range(body.uleb()):
            body.uleb()
            _valtype(body)
        _scan_instructions(body, f"function {first_function + i}")


def _memories(reader: _Reader) -> int:
    count = reader.uleb()
    for _ in range(count):
        if _limits(reader) & 0x02:
            raise ModuleError("uses shared memory: shared state cannot be captured")
    return count


def instrument(wasm: bytes) -> Instrumented:
    """Rewrite `wasm` to export every mutable global; refuse it if its state is not capturable.

    The module should already have been validated by wasmtime.
    """
    sections = _sections(wasm)
    imported_functions = 0
    mutable: list[tuple[int, str]] = []
    exports: list[tuple[str, int, int]] = []
    export_section: tuple[int, int] | None = None
    memories = 0
    for section_id, header, start, end in sections:
        reader = _Reader(wasm, start, end)
        if section_id == _SEC_IMPORT:
            imported_functions = _imports(reader)
        elif section_id == _SEC_MEMORY:
            memories += _memories(reader)
        elif section_id == _SEC_GLOBAL:
            mutable = _globals(reader, 0)
        elif section_id == _SEC_EXPORT:
            exports = _exports(reader)
            export_section = (header, end)
        elif section_id == _SEC_CODE:
            _scan_code(reader, imported_functions)
    if memories != 1:
        raise ModuleError(f"defines {memories} memories; an app has exactly one")
    names = [name for name, _, _ in exports]
    reserved = [name for name in names if name.startswith(RESERVED_PREFIX)]
    if reserved:
        raise ModuleError(f"exports {reserved[0]!r}: names starting with "
                          f"{RESERVED_PREFIX!r} are reserved for the host")
    exported_globals = {index: name for name, kind, index in exports if kind == 3}
    captured = []
    added: list[tuple[str, int, int]] = []
    for index, valtype in mutable:
        name = exported_globals.get(index)
        if name is None:
            name = f"{GLOBAL_EXPORT_PREFIX}{index}"
            added.append((name, 3, index))
        captured.append(MutableGlobal(index, valtype, name))
    rewritten = _with_exports(wasm, sections, export_section, exports + added) if added else wasm
    return Instrumented(rewritten, tuple(captured), tuple(names))


def _encode_exports(exports: list[tuple[str, int, int]]) -> bytes:
    payload = bytearray(_uleb(len(exports)))
    for name, kind, index in exports:
        raw = name.encode()
        payload += _uleb(len(raw)) + raw + bytes([kind]) + _uleb(index)
    return bytes([_SEC_EXPORT]) + _uleb(len(payload)) + bytes(payload)


def _with_exports(wasm: bytes, sections: list[tuple[int, int, int, int]],
                  existing: tuple[int, int] | None, exports: list[tuple[str, int, int]]) -> bytes:
    section = _encode_exports(exports)
    if existing is not None:
        header, end = existing
        return wasm[:header] + section + wasm[end:]
    at = next((header for sid, header, _, _ in sections if sid in _AFTER_EXPORT), len(wasm))
    return wasm[:at] + section + wasm[at:]
