"""AUTOMATIC1111's `GET /sdapi/v1/loras`: the LoRAs live nodes announce (`loras_on_disk`),
against a real nats-server. No other service runs: the directory gets the announcements
as the gateway's would."""

from __future__ import annotations

import time

import msgspec
import pytest

from stipple_common.identity import dev_node_id
from stipple_common.messages import NodeJoined, NodeQuit
from stipple_testkit.nodes import joined

pytestmark = pytest.mark.integration


def holding(name: str, *loras: str) -> NodeJoined:
    return msgspec.structs.replace(joined(dev_node_id(name)), loras_on_disk=list(loras))


def listed(*refs: str) -> list[dict[str, object]]:
    return [{"name": ref, "alias": ref, "path": ref, "metadata": {}} for ref in refs]


async def test_loras_lists_what_live_nodes_hold_and_nothing_of_nodes_gone(make_gateway, asgi_client):
    gw = await make_gateway()
    async with asgi_client(gw) as http:
        none = await http.get("/sdapi/v1/loras")
        assert none.status_code == 200
        assert none.json() == []  # the three live nodes announced no LoRA

        now = time.time()
        gw.directory.apply(holding("node-a", "acme/fox-lora", "https://civitai.test/api/download/models/7"), now)
        gw.directory.apply(holding("node-b", "acme/fox-lora", "acme/cat-lora"), now)  # fox twice: listed once
        gw.directory.apply(holding("silent", "acme/stale-lora"), now - 3600)  # no heartbeat for an hour (ttl 60 s)
        gw.directory.apply(holding("leaver", "acme/gone-lora"), now)
        gw.directory.apply(NodeQuit(node_id=dev_node_id("leaver"), at=now), now)

        response = await http.get("/sdapi/v1/loras")
    assert response.status_code == 200
    assert response.json() == listed("acme/cat-lora", "acme/fox-lora", "https://civitai.test/api/download/models/7")


async def test_a_lora_on_disk_is_not_listed_as_a_checkpoint(make_gateway, asgi_client):
    """`models_on_disk` holds every kind in a node's store: the ones it also announces as
    LoRAs are left out of the models (sd-models, capacity checks)."""
    gw = await make_gateway()
    node = msgspec.structs.replace(
        holding("node-a", "acme/fox-lora"), models_on_disk=["acme/fox-lora", "acme/other-checkpoint"]
    )
    gw.directory.apply(node, time.time())
    async with asgi_client(gw) as http:
        models = [m["model_name"] for m in (await http.get("/sdapi/v1/sd-models")).json()]
    assert "acme/other-checkpoint" in models
    assert "acme/fox-lora" not in models
