"""`mesh run` as a user runs it: each step its own process; state carries across processes."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh import snapshot, wire
from tests.conftest import COUNTER_WAT, mesh

payloads = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=0x2FF), min_size=1,
                   max_size=12).filter(lambda text: text != "reset") | st.just("reset")


def feed(messages: list[str]) -> list[str]:
    return [f"--in={message}" for message in messages]


def state_of(path: Path) -> tuple[bytes, tuple[wire.GlobalValue, ...], wire.HostState]:
    snap = wire.decode(wire.Snapshot, path.read_bytes())
    memory = bytearray(snap.memory.size)
    snapshot.restore_into(snap.memory, memory, snap.memory.size)
    return bytes(memory), snap.globals, snap.host


def check_resume_matches_straight_run(app: Path, messages: list[str], cut: int,
                                      work: Path) -> None:
    cut = min(cut, len(messages))
    straight = mesh("run", app, *feed(messages), "--snapshot-out", work / "straight",
                    cache_dir=work / "cache")
    first = mesh("run", app, *feed(messages[:cut]), "--snapshot-out", work / "half",
                 cache_dir=work / "cache")
    second = mesh("run", app, "--restore", work / "half", *feed(messages[cut:]),
                  "--snapshot-out", work / "resumed", cache_dir=work / "cache")
    for result in (straight, first, second):
        assert result.returncode == 0, result.stderr
    assert first.stdout + second.stdout == straight.stdout
    assert len(straight.stdout.splitlines()) == len(messages)
    assert state_of(work / "resumed") == state_of(work / "straight")


@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=st.lists(payloads, min_size=1, max_size=12), cut=st.integers(0, 12))
def test_c_heap_app_resumed_in_a_new_process_matches_a_straight_run(
        examples: dict[str, Path], tmp_path_factory: pytest.TempPathFactory,
        messages: list[str], cut: int) -> None:
    check_resume_matches_straight_run(examples["counter"], messages, cut,
                                      tmp_path_factory.mktemp("c"))


@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=st.lists(payloads, min_size=1, max_size=12), cut=st.integers(0, 12))
def test_hidden_global_app_resumed_in_a_new_process_matches_a_straight_run(
        tmp_path_factory: pytest.TempPathFactory, messages: list[str], cut: int) -> None:
    check_resume_matches_straight_run(COUNTER_WAT, messages, cut,
                                      tmp_path_factory.mktemp("wat"))


def test_run_prints_publications_and_logs(examples: dict[str, Path], tmp_path: Path) -> None:
    result = mesh("run", examples["thermostat"], "--sensor", "temperature=18.25",
                  "--topic", "setpoint", "--in", "20", "--ticks", "2", cache_dir=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["temperature 18.2", "heater on", "temperature 18.2"]


def test_payloads_that_are_not_text_are_escaped(tmp_path: Path) -> None:
    result = mesh("run", COUNTER_WAT, "--in", "a\nb", cache_dir=tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 1


def test_run_reports_errors_in_one_line(examples: dict[str, Path], tmp_path: Path) -> None:
    not_wasm = tmp_path / "x.wasm"
    not_wasm.write_bytes(b"hello")
    mesh("run", COUNTER_WAT, "--in", "x", "--snapshot-out", tmp_path / "wat.snap",
         cache_dir=tmp_path)
    (tmp_path / "cut.snap").write_bytes((tmp_path / "wat.snap").read_bytes()[:-7])
    cases = [
        (("run", not_wasm), "not a WebAssembly module"),
        (("run", tmp_path / "missing.wasm"), "cannot read"),
        (("run", examples["counter"], "--restore", tmp_path / "wat.snap"),
         "snapshot is of module"),
        (("run", COUNTER_WAT, "--restore", tmp_path / "cut.snap"), "is not a valid snapshot"),
        (("run", COUNTER_WAT, "--restore", not_wasm), "is not a valid snapshot"),
    ]
    for args, message in cases:
        result = mesh(*args, cache_dir=tmp_path)
        assert result.returncode == 1, args
        assert result.stderr.count("\n") == 1, result.stderr
        assert result.stderr.startswith("mesh: error: ")
        assert message in result.stderr


# Parses every client command and runs one against a closed port; none may load wasmtime or
# amqtt, while `from mesh import App` still works (on demand) afterwards.
CLIENT_IMPORTS = textwrap.dedent("""
    import socket, sys
    from mesh import cli, cli_mesh, client
    parser = cli.build_parser()
    for argv in (["apps"], ["nodes"], ["events"], ["deploy", "a", "a.wasm"], ["send", "a", "x"],
                 ["stop", "a"], ["migrate", "a", "n"]):
        assert parser.parse_args(argv).func is not None, argv
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert cli.main(["-q", "apps", "--broker", f"mqtt://127.0.0.1:{port}"]) == 1
    from mesh import Limits, LocalIO, MeshError
    heavy = sorted(m for m in sys.modules if m.partition(".")[0] in ("wasmtime", "amqtt"))
    assert not heavy, heavy
    from mesh import App
    assert App.__module__ == "mesh.runtime" and "wasmtime" in sys.modules
""")


def test_client_commands_do_not_load_wasmtime_or_amqtt() -> None:
    result = subprocess.run([sys.executable, "-c", CLIENT_IMPORTS], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith("mesh: error: cannot reach the broker"), result.stderr


def test_client_command_help() -> None:
    result = mesh("apps", "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: mesh apps")
    assert "--json" in result.stdout
    assert "--broker" in result.stdout


def test_demo_tells_the_whole_story() -> None:
    result = mesh("demo", timeout=180)
    assert result.returncode == 0, result.stderr
    for step in ("Creating a mesh (m", "joined: garage, hall, kitchen", "counter published: 5 ",
                 "handed it over",
                 "restored the last checkpoint", "counter published: 10 ",
                 "never moved: yes"):
        assert step in result.stdout
    assert result.stderr == ""
