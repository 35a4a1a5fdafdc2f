"""Shared fixtures: the example apps built from source, a runtime, and the `mesh` command."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import wasmtime

from mesh.home import OperatorHome
from mesh.runtime import Runtime
from tests.harness import Cluster, embedded_broker, mosquitto

ROOT = Path(__file__).resolve().parent.parent
COUNTER_WAT = ROOT / "mesh" / "apps" / "counter.wat"


def require_tool(name: str) -> None:
    """Skip when a system tool is missing, except in CI, where that is a failure."""
    if shutil.which(name) is None:
        message = f"{name} is not installed (run `make test`, which installs it as root)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="session")
def examples(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The C example apps, built from source with clang for wasm32 as the README says."""
    require_tool("clang")
    build = tmp_path_factory.mktemp("examples")
    subprocess.run(["make", "-s", "-C", str(ROOT / "examples"), f"BUILD={build}"], check=True)
    return {path.stem: path for path in build.glob("*.wasm")}


@pytest.fixture(scope="session")
def counter_wat_wasm() -> bytes:
    return wat(COUNTER_WAT.read_text())


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[Runtime]:
    with Runtime(cache_dir=tmp_path / "cache") as rt:
        yield rt


def wat(text: str) -> bytes:
    return bytes(wasmtime.wat2wasm(text))


def mesh(*args: str | Path, cache_dir: Path | None = None,
         timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the `mesh` command in a new process, as a user would."""
    env = dict(os.environ)
    if cache_dir is not None:
        env["MESH_CACHE_DIR"] = str(cache_dir)
    return subprocess.run([sys.executable, "-m", "mesh", "-q", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env, check=False)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[str]:
    """Mosquitto: the broker on which the no-loss guarantees hold."""
    require_tool("mosquitto")
    with mosquitto(tmp_path) as url:
        yield url


@pytest.fixture(params=["mosquitto", "embedded"])
def any_broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Mosquitto, then the embedded broker (amqtt): what must hold on either."""
    if request.param == "mosquitto":
        require_tool("mosquitto")
        with mosquitto(tmp_path) as url:
            yield url
    else:
        with embedded_broker(tmp_path) as url:
            yield url


@pytest.fixture
def operator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> OperatorHome:
    """This test's mesh, at `<tmp_path>/operator` (made when a node first joins it, unless the
    test makes it itself); `mesh` commands run by the test sign with its key."""
    monkeypatch.setenv("MESH_HOME", str(tmp_path / "operator"))
    return OperatorHome(tmp_path / "operator")


@pytest.fixture
def cluster(tmp_path: Path, operator: OperatorHome) -> Iterator[Cluster]:
    """Node processes, each joined to the test's mesh with a join token."""
    nodes = Cluster(tmp_path, operator)
    yield nodes
    nodes.stop_all()
    print(nodes.logs())  # shown when the test failed


_exit_status = 0


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    global _exit_status  # noqa: PLW0603 - handed from one pytest hook to the next
    _exit_status = int(exitstatus)


def pytest_unconfigure(config: pytest.Config) -> None:
    """Leave without the interpreter's teardown, every result written by now: a wasmtime WASI
    worker thread can abort the process while Python finalizes ("non-unwinding panic" after
    every test had passed), which would turn a green run red. Apps close themselves at exit
    in real use (mesh.runtime); the test process runs hundreds of stores in one interpreter."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_exit_status)
