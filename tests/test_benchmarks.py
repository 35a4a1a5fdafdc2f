"""The benchmark scripts still run and print their tables (figures are not judged here)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT, require_tool
from tests.lan import can_build_lans


@pytest.mark.parametrize(("script", "tool", "headings"), [
    ("runtime_bench.py", "clang",
     ("cached load + instantiate", "ratio host / bare", "| 16 MiB | dense |")),
    ("mesh_bench.py", "mosquitto",
     ("migration downtime ms", "kill -9 of the owner", "ratio node / bare",
      "apps moved by a join", "| embedded amqtt |")),
    ("broker_bench.py", "mosquitto",
     ("checkpoints stored per s", "autosave_on_changes, every change")),
    ("lan_bench.py", "ip",
     ("boots on a LAN with a mesh", "its mDNS goodbye", "cable pulled",
      "the lost device's app")),
])
def test_benchmark_prints_its_tables(script: str, tool: str, headings: tuple[str, ...]) -> None:
    require_tool(tool)
    if script == "lan_bench.py" and can_build_lans():
        pytest.skip(f"lan_bench.py {can_build_lans()}")
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick"],
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr
    for heading in headings:
        assert heading in result.stdout
