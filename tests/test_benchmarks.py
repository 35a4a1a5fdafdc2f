"""The benchmark scripts still run and print their tables (figures are not judged here)."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT, require_tool


def test_runtime_benchmark_prints_its_tables() -> None:
    require_tool("clang")
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "runtime_bench.py"),
                             "--quick"], capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stderr
    for heading in ("cached load + instantiate", "ratio host / bare", "| 16 MiB | dense |"):
        assert heading in result.stdout


def test_mesh_benchmark_prints_its_tables() -> None:
    require_tool("mosquitto")
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "mesh_bench.py"),
                             "--quick"], capture_output=True, text=True, timeout=600,
                            check=False)
    assert result.returncode == 0, result.stderr
    for heading in ("migration downtime ms", "kill -9 of the owner", "ratio node / bare",
                    "apps moved by a join"):
        assert heading in result.stdout
