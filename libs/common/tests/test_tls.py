"""NATS over TLS: a service connects to a real nats-server that requires TLS, with the CA
of STIPPLE_NATS_CA_FILE; a certificate that does not verify fails the first connection at
once with an error that names the setting (it used to retry forever); a missing or bad CA
file is an invalid setting; and no log line carries the NATS password."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from stipple_common import bus, subjects
from stipple_common.logs import redact
from stipple_common.natsserver import NatsServer
from stipple_common.service import open_service
from stipple_common.settings import CommonSettings, InvalidSettings, load_settings

PASSWORD = "hunter2-not-in-logs"


@pytest.fixture
def tls_server(pki: Any, tmp_path: Path):
    config = (
        f'tls {{\n  cert_file: "{pki.cert}"\n  key_file: "{pki.key}"\n}}\n'
        f'authorization {{\n  user: svc\n  password: "{PASSWORD}"\n}}\n'
    )
    with NatsServer.start(tmp_path / "nats", config=config) as server:
        yield server


def _url(server: NatsServer, scheme: str = "tls") -> str:
    return f"{scheme}://svc:{PASSWORD}@127.0.0.1:{server.port}"


@pytest.mark.integration
async def test_a_service_works_over_tls_with_the_ca_of_its_settings(tls_server: NatsServer, pki: Any) -> None:
    settings = load_settings(
        CommonSettings, {"STIPPLE_NATS_URL": _url(tls_server), "STIPPLE_NATS_CA_FILE": str(pki.ca)}
    )
    assert settings.nats_ca_file == str(pki.ca)
    async with open_service("tls-test", settings, stop=asyncio.Event()) as ctx:
        assert ctx.nc.connected_url is not None
        assert ctx.nc.connected_url.scheme == "tls"
        # the streams were declared over it, and a message goes round trip
        subject = subjects.node_subject("n1", "heartbeat")
        await ctx.js.publish(subject, b"{}")
        (msg,) = await bus.read_messages(ctx.js, subjects.NODES_STREAM, subject)
        assert msg.data == b"{}"


@pytest.mark.integration
async def test_a_plain_url_upgrades_when_the_server_requires_tls(tls_server: NatsServer, pki: Any) -> None:
    nc = await bus.connect(_url(tls_server, "nats"), "upgrade", ca_file=str(pki.ca))
    try:
        assert nc.is_connected  # the server takes no plain connection: this one is TLS
        sub = await nc.subscribe("probe.echo")
        await nc.publish("probe.echo", b"over tls")
        assert (await sub.next_msg(timeout=2)).data == b"over tls"
    finally:
        await nc.close()


@pytest.mark.integration
@pytest.mark.parametrize("scheme", ["tls", "nats"])
async def test_a_certificate_that_does_not_verify_fails_at_once_naming_the_setting(
    tls_server: NatsServer, pki: Any, scheme: str
) -> None:
    with pytest.raises(bus.NatsTlsError) as untrusted:  # the system's CAs never signed the test CA
        await asyncio.wait_for(bus.connect(_url(tls_server, scheme), "no-ca"), 10)
    message = str(untrusted.value)
    assert "STIPPLE_NATS_CA_FILE is not set" in message
    assert f"{scheme}://svc:***@127.0.0.1:{tls_server.port}" in message
    assert PASSWORD not in message
    assert untrusted.value.code == "nats_tls"

    with pytest.raises(bus.NatsTlsError) as wrong:
        await asyncio.wait_for(bus.connect(_url(tls_server, scheme), "wrong-ca", ca_file=str(pki.other_ca)), 10)
    assert f"STIPPLE_NATS_CA_FILE={str(pki.other_ca)!r}" in str(wrong.value)
    assert "certificate" in str(wrong.value)


async def test_a_missing_or_bad_ca_file_is_an_invalid_setting(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(InvalidSettings, match=r"STIPPLE_NATS_CA_FILE='.*nope\.pem': no such file"):
        await bus.connect("tls://127.0.0.1:1", "missing", ca_file=str(missing))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    with pytest.raises(InvalidSettings, match="STIPPLE_NATS_CA_FILE=.*garbage.pem.*not a PEM CA bundle"):
        bus.tls_context("tls://127.0.0.1:1", str(garbage))


def test_tls_is_on_for_tls_urls_or_a_ca_file_only(pki: Any) -> None:
    assert bus.tls_context("nats://127.0.0.1:4222") is None
    assert bus.tls_context("nats://a:4222, tls://b:4222") is not None
    with_ca = bus.tls_context("nats://a:4222", str(pki.ca))
    assert with_ca is not None
    assert with_ca.check_hostname
    assert len(with_ca.get_ca_certs()) == 1  # only ours: the system's are not added when a file is given


def test_redact_masks_url_passwords_only() -> None:
    assert redact(f"nats://gateway:{PASSWORD}@nats:4222") == "nats://gateway:***@nats:4222"
    assert redact("tls://a:x@h1:1,nats://b:y/z@h2:2") == "tls://a:***@h1:1,nats://b:***@h2:2"
    assert redact("error at nats://n:p@host:4222: refused") == "error at nats://n:***@host:4222: refused"
    for kept in ("nats://nats:4222", "http://user@host/x", "https://rpc.example/v3/path", "a:b@c"):
        assert redact(kept) == kept


def test_no_log_line_carries_the_nats_password() -> None:
    """The configured logging of a service (JSON lines), in a process of its own: values,
    nested values and a logged exception's traceback are all masked."""
    program = f"""
from stipple_common.logs import setup_logging
log = setup_logging("probe", fmt="json")
url = "nats://gateway:{PASSWORD}@nats:4222"
log.info("service_ready", nats=url, servers=[url], nested={{"url": url}})
try:
    raise ConnectionError(f"cannot reach {{url}}")
except ConnectionError:
    log.exception("nats_failed")
"""
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stderr.splitlines()]
    assert [line["event"] for line in lines] == ["service_ready", "nats_failed"]
    assert PASSWORD not in done.stderr
    ready, failed = lines
    assert ready["nats"] == "nats://gateway:***@nats:4222"
    assert ready["servers"] == [ready["nats"]]
    assert ready["nested"] == {"url": ready["nats"]}
    assert "cannot reach nats://gateway:***@nats:4222" in failed["exception"]
