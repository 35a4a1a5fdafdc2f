"""The broker a device hosts in a secure mesh serves only the mesh (`mesh.accounts`): on
Mosquitto (the configuration a device writes) and on the embedded broker alike."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from mesh import privacy
from mesh.accounts import Accounts
from mesh.broker import EmbeddedBroker
from mesh.errors import BrokerError
from mesh.mosquitto import HostedMosquitto
from mesh.mqtt import BrokerAddress, Connection, Message
from mesh.privacy import Keyring
from mesh.tls import MeshCA
from tests.conftest import require_tool
from tests.harness import free_port

KEYRING = Keyring({1: bytes(range(32))})
ACCOUNTS = Accounts.of(KEYRING, "mesh")
MESH_CA = MeshCA.of(KEYRING)


@asynccontextmanager
async def hosted(kind: str, tmp_path: Path,
                 authority: MeshCA = MESH_CA) -> AsyncIterator[BrokerAddress]:
    """The broker as a device hosts it: the mesh's accounts, and TLS with a certificate
    `authority` issued."""
    port, tls = free_port(), (free_port(), authority.issue("kitchen", ["127.0.0.1"]))
    broker: HostedMosquitto | EmbeddedBroker = (
        HostedMosquitto("127.0.0.1", port, tmp_path, ACCOUNTS, tls) if kind == "mosquitto"
        else EmbeddedBroker("127.0.0.1", port, accounts=ACCOUNTS, tls=tls))
    async with broker:
        yield broker.address


@pytest.fixture(params=["mosquitto", "embedded"])
def kind(request: pytest.FixtureRequest) -> str:
    if request.param == "mosquitto":
        require_tool("mosquitto")
    return str(request.param)


def test_a_stranger_reads_and_writes_nothing_but_a_pending_record(kind: str,
                                                                   tmp_path: Path) -> None:
    """Without credentials a client may only announce a device waiting to be admitted: it gets
    no app's outputs or the mesh's records, and its inputs reach no app."""

    async def scenario() -> tuple[list[str], list[str]]:
        stranger_got: asyncio.Queue[Message] = asyncio.Queue()
        mesh_got: asyncio.Queue[Message] = asyncio.Queue()
        async with hosted(kind, tmp_path) as address, \
                Connection(ACCOUNTS.sign_in(address), "a-node",
                           on_message=mesh_got.put_nowait) as node, \
                Connection(address, "a-stranger", on_message=stranger_got.put_nowait) as stranger:
            await node.publish("mesh/nodes/kitchen", b"a node record", retain=True)
            await node.subscribe("mesh/apps/+/in", "mesh/pending/#")
            with contextlib.suppress(BrokerError):  # amqtt refuses it; Mosquitto sends nothing
                await stranger.subscribe("mesh/apps/+/out/#", "mesh/nodes/+")
            await stranger.subscribe("mesh/pending/#")
            await node.publish("mesh/apps/ledger/out/total", b"42")
            await stranger.publish("mesh/apps/ledger/in", b"forged input")
            await stranger.publish("mesh/pending/stranger", b"let me in")  # last, to both
            await node.publish("mesh/pending/stranger/welcome", b"not yet")
            stranger_topics = [(await asyncio.wait_for(stranger_got.get(), 10)).topic
                               for _ in range(2)]
            mesh_topics = [(await asyncio.wait_for(mesh_got.get(), 10)).topic
                           for _ in range(2)]
            return stranger_topics, mesh_topics

    stranger_topics, mesh_topics = asyncio.run(scenario())
    assert stranger_topics == ["mesh/pending/stranger", "mesh/pending/stranger/welcome"]
    assert mesh_topics == ["mesh/pending/stranger", "mesh/pending/stranger/welcome"]


def test_a_wrong_password_is_refused(kind: str, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with hosted(kind, tmp_path) as address:
            guess = privacy.broker_password(Keyring({1: bytes(32)}))
            with pytest.raises(BrokerError, match="refused"):
                async with Connection(Accounts("mesh", guess, MESH_CA).sign_in(address),
                                      "an-impostor"):
                    pass
            async with Connection(ACCOUNTS.sign_in(address), "a-node"):
                pass

    asyncio.run(scenario())


def test_the_password_is_the_mesh_s_and_only_its() -> None:
    assert privacy.broker_password(KEYRING) == privacy.broker_password(
        Keyring({1: bytes(range(32)), 2: bytes(32)}))  # a revoke keeps it (see the module)
    assert privacy.broker_password(KEYRING) != privacy.broker_password(Keyring({1: bytes(32)}))


def test_the_account_goes_over_tls_to_a_broker_with_the_mesh_s_ca_only(kind: str,
                                                                       tmp_path: Path) -> None:
    """A broker that announces TLS gets the mesh's password over TLS only, and only if its
    certificate is the mesh's: one of another mesh (or a stranger's) gets nothing."""
    address = BrokerAddress("127.0.0.1", 1883, tls_port=8883)
    signed = ACCOUNTS.sign_in(address)
    assert (signed.port, signed.tls, signed.ca) == (8883, True, MESH_CA.pem)
    local = ACCOUNTS.sign_in(BrokerAddress("127.0.0.1", 1883))  # none announced, but local
    assert (local.tls, local.password) == (False, ACCOUNTS.password)
    assert ACCOUNTS.sign_in(BrokerAddress("10.0.0.5", 1883)).password is None  # in the clear
    given = ACCOUNTS.sign_in(BrokerAddress.parse("mqtts://10.0.0.5"))
    assert (given.port, given.ca, given.password) == (8883, MESH_CA.pem, ACCOUNTS.password)

    async def scenario() -> None:
        async with hosted(kind, tmp_path) as ours, Connection(ACCOUNTS.sign_in(ours), "a-node"):
            pass
        impostor = MeshCA.of(Keyring({1: bytes(32)}))
        async with hosted(kind, tmp_path, impostor) as theirs:
            with pytest.raises(BrokerError, match="not from the mesh's CA"):
                async with Connection(ACCOUNTS.sign_in(theirs), "a-node"):
                    pass

    asyncio.run(scenario())


def test_a_plain_mqtt_tool_reads_an_app_s_outputs_with_the_ca_and_the_account(
        kind: str, tmp_path: Path) -> None:
    """mosquitto_sub, given the CA file and the account, checks the broker's certificate
    (its name too: the address it was given) and reads what the mesh publishes."""
    require_tool("mosquitto_sub")
    cafile = tmp_path / "ca.crt"
    cafile.write_text(MESH_CA.pem)

    async def scenario() -> str:
        async with hosted(kind, tmp_path) as address:
            assert address.tls_port is not None
            sub = await asyncio.create_subprocess_exec(
                "mosquitto_sub", "-h", "127.0.0.1", "-p", str(address.tls_port), "--cafile",
                str(cafile), "-u", "mesh", "-P", ACCOUNTS.password, "-t", "mesh/apps/+/out/#",
                "-C", "1", "-W", "20", "-i", "a-dashboard", stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE)
            async with Connection(ACCOUNTS.sign_in(address), "a-node") as node:
                while sub.returncode is None:  # until it has subscribed
                    await node.publish("mesh/apps/ledger/out/total", b"42")
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(sub.wait(), 0.2)
            out, err = await sub.communicate()
            assert sub.returncode == 0, err.decode()
            return out.decode().strip()

    assert asyncio.run(scenario()) == "42"
