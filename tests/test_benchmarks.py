"""The benchmark scripts still run and print their tables (figures are not judged here)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT, require_tool


@pytest.mark.parametrize(("script", "tool", "headings"), [
    ("runtime_bench.py", "clang",
     ("cached load + instantiate", "ratio host / bare", "| 16 MiB | dense |")),
    ("mesh_bench.py", "mosquitto",
     ("migration downtime ms", "kill -9 of the owner", "ratio node / bare",
      "apps moved by a join")),
])
def test_benchmark_prints_its_tables(script: str, tool: str, headings: tuple[str, ...]) -> None:
    require_tool(tool)
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick"],
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr
    for heading in headings:
        assert heading in result.stdout
