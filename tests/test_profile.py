"""Device profiles, sensor sources and lasting identity: pure code, no broker."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pytest

from mesh import profile
from mesh.errors import ConfigError

DEVICES = Path(__file__).resolve().parent.parent / "devices"


@pytest.mark.parametrize("path", sorted(DEVICES.glob("*.toml")), ids=lambda p: p.name)
def test_every_example_profile_loads(path: Path) -> None:
    data = tomllib.loads(path.read_text())
    kit = profile.load(path)
    assert kit.caps == tuple(data["caps"])
    assert set(kit.sensors) == set(data["sensors"])
    for name, spec in data["sensors"].items():
        if spec["source"] == "simulated":
            assert spec["min"] <= float(kit.sensors[name]()) <= spec["max"]


def test_a_full_profile(tmp_path: Path) -> None:
    (tmp_path / "reading").write_text("21.5\n")
    path = tmp_path / "board.toml"
    path.write_text(f'''
id = "greenhouse-1"
caps = ["temperature", "relay"]
broker = "mqtt://10.0.0.2:1883"
keepalive = 3
token = "lmt1.abc"
insecure = true
[labels]
room = "greenhouse"
[limits]
app_memory_mb = 32
call_timeout_ms = 250
[sensors.temperature]
source = "simulated"
min = 18
max = 24
[sensors.probe]
source = "file"
path = "reading"
[sensors.echo]
source = "command"
command = ["{sys.executable}", "-c", "print('hello')"]
''')
    kit = profile.load(path)
    assert kit.id == "greenhouse-1"
    assert kit.caps == ("temperature", "relay")
    assert kit.labels == {"room": "greenhouse"}
    assert (kit.broker, kit.keepalive) == ("mqtt://10.0.0.2:1883", 3)
    assert (kit.token, kit.insecure) == ("lmt1.abc", True)
    assert not profile.parse({}).insecure  # secure unless asked
    assert (kit.app_memory_bytes, kit.call_timeout_ms) == (32 << 20, 250)
    assert 18 <= float(kit.sensors["temperature"]()) <= 24
    assert kit.sensors["probe"]() == b"21.5"
    assert kit.sensors["echo"]() == b"hello"


@pytest.mark.parametrize(("text", "message"), [
    ("id = 'two words'", "id 'two words' must be"),
    ("colour = 'red'", "unknown key colour"),
    ("caps = 'relay'", "caps must be a list"),
    ("keepalive = -1", "keepalive must be positive"),
    ("insecure = 'yes'", "insecure must be true or false"),
    ("[limits]\nram = 1", "unknown key limits.ram"),
    ("[labels]\nroom = 3", "labels must map names to strings"),
    ("[sensors.t]\nsource = 'radio'", "source must be simulated, file or command"),
    ("[sensors.t]\nsource = 'file'", "path is required"),
    ("[sensors.t]\nsource = 'command'\ncommand = 'ls'", "command must be a list"),
    ("[sensors.t]\nsource = 'simulated'\nmin = 5\nmax = 1", "min must not exceed max"),
    ("id = ", "not valid TOML"),
])
def test_bad_profiles_say_what_is_wrong(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as caught:
        profile.load(path)
    assert str(path) in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_failing_sensor_raises_for_the_runtime_to_report(tmp_path: Path) -> None:
    gone = profile.from_file(tmp_path / "missing")
    with pytest.raises(FileNotFoundError):
        gone()


def test_a_device_keeps_the_id_it_chose(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = profile.identity(state, None)
    assert profile.NODE_ID.fullmatch(first)
    assert profile.identity(state, None) == first  # after a reboot: the same device
    assert profile.identity(tmp_path / "other", None) != first
    assert profile.identity(state, "kitchen") == "kitchen"
    with pytest.raises(ConfigError, match="node id 'a/b'"):
        profile.identity(state, "a/b")


def test_the_default_state_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MESH_STATE_DIR", str(tmp_path))
    assert profile.default_state_dir(None) == tmp_path / "device"
    assert profile.default_state_dir("hall") == tmp_path / "hall"
