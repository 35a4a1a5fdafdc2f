"""Module rewriting: hidden mutable globals become reachable; uncapturable modules are refused."""

from __future__ import annotations

import contextlib

import pytest
import wasmtime
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh import wasmbin
from mesh.engine import make_engine
from mesh.errors import ModuleError
from tests.conftest import wat

ENGINE = make_engine()


def exports_of(wasm: bytes) -> dict[str, object]:
    module = wasmtime.Module(ENGINE, wasm)
    return {exp.name: exp.type for exp in module.exports}


def test_hidden_mutable_globals_are_exported_under_reserved_names() -> None:
    wasm = wat("""(module (memory (export "memory") 1)
        (global $a (mut i32) (i32.const 7)) (global $k i64 (i64.const 1))
        (global $b (mut f64) (f64.const 2.5)) (global (export "shown") (mut i64) (i64.const 3)))""")
    result = wasmbin.instrument(wasm)
    assert [(g.index, g.valtype, g.export) for g in result.globals] == [
        (0, "i32", "__mesh_global_0"), (2, "f64", "__mesh_global_2"), (3, "i64", "shown")]
    exports = exports_of(result.wasm)
    assert set(exports) == {"memory", "shown", "__mesh_global_0", "__mesh_global_2"}
    assert result.exports == ("memory", "shown")


def test_export_section_is_inserted_in_order_when_the_module_has_none() -> None:
    wasm = wat("""(module (memory 1) (global $g (mut i32) (i32.const 5))
        (func $f (global.set $g (i32.const 6))) (start $f) (data (i32.const 0) "x"))""")
    rewritten = wasmbin.instrument(wasm).wasm
    store = wasmtime.Store(ENGINE)
    store.set_epoch_deadline(1_000_000)
    instance = wasmtime.Instance(store, wasmtime.Module(ENGINE, rewritten), [])
    hidden = instance.exports(store)["__mesh_global_0"]
    assert isinstance(hidden, wasmtime.Global)
    assert hidden.value(store) == 6


def test_module_without_mutable_globals_is_left_alone() -> None:
    wasm = wat('(module (memory (export "memory") 1) (global i32 (i32.const 1)))')
    assert wasmbin.instrument(wasm).wasm == wasm


@pytest.mark.parametrize(("body", "name"), [
    ("(func (table.set 0 (i32.const 0) (ref.null func)))", "table.set"),
    ("(func (drop (table.grow 0 (ref.null func) (i32.const 1))))", "table.grow"),
    ("(func (table.fill 0 (i32.const 0) (ref.null func) (i32.const 1)))", "table.fill"),
    ("(func (table.copy (i32.const 0) (i32.const 0) (i32.const 0)))", "table.copy"),
    ("(elem $e func $f0) (func $f0) (func (elem.drop $e))", "elem.drop"),
    ('(data $d "x") (func (data.drop $d))', "data.drop"),
    ("(elem $e func $f0) (func $f0) (func (table.init $e (i32.const 0) (i32.const 0) "
     "(i32.const 1)))", "table.init"),
])
def test_modules_that_mutate_tables_or_segments_are_refused(body: str, name: str) -> None:
    wasm = wat(f'(module (memory (export "memory") 1) (table 2 funcref) {body})')
    with pytest.raises(ModuleError, match=f"uses {name}: table and segment state cannot"):
        wasmbin.instrument(wasm)


@pytest.mark.parametrize(("module", "message"), [
    ('(module (import "env" "g" (global (mut i32))) (memory 1))', "imports a global"),
    ('(module (import "env" "memory" (memory 1)))', "imports a memory"),
    ('(module (memory 1) (global (mut v128) (v128.const i64x2 0 0)))', "mutable v128"),
    ('(module (memory 1) (global (mut funcref) (ref.null func)))', "mutable funcref"),
    ('(module (func))', "defines 0 memories"),
    ('(module (memory 1) (func (export "__mesh_global_0")))', "reserved"),
])
def test_uncapturable_modules_are_refused(module: str, message: str) -> None:
    with pytest.raises(ModuleError, match=message):
        wasmbin.instrument(wat(module))


def test_simd_and_bulk_memory_code_is_understood() -> None:
    wasm = wat("""(module (memory (export "memory") 1) (global $g (mut i32) (i32.const 0))
        (func (export "f") (param i32)
          (v128.store (i32.const 16) (i8x16.shuffle 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15
              (v128.load offset=4 (local.get 0)) (v128.const i32x4 1 2 3 4)))
          (drop (i32x4.extract_lane 2 (v128.load32_zero (i32.const 0))))
          (v128.store8_lane 3 (i32.const 0) (v128.const i64x2 5 6))
          (memory.fill (i32.const 0) (i32.const 1) (i32.const 2))
          (memory.copy (i32.const 0) (i32.const 1) (i32.const 2))
          (block $out (br_table 0 0 $out (local.get 0)))
          (global.set $g (i32.extend8_s (i32.trunc_sat_f32_s (f32.const 1.5))))))""")
    assert [g.export for g in wasmbin.instrument(wasm).globals] == ["__mesh_global_0"]


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_random_bytes_after_the_header_raise_only_module_error(tail: bytes) -> None:
    with contextlib.suppress(ModuleError):
        wasmbin.instrument(wasmbin.MAGIC + tail)


@given(st.binary(max_size=64))
def test_random_bytes_raise_only_module_error(data: bytes) -> None:
    with pytest.raises(ModuleError):
        wasmbin.instrument(data if data[:8] != wasmbin.MAGIC else b"")
