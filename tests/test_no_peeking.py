"""No node can read or list another node's uploads, on either blob-store backend.

A secured network (authentication on, the gatekeeper's callout) runs a task end to end
with the images in the JetStream object store, then in S3 (moto over real HTTP, with
authentication enforced as MinIO does). The nodes hold no blob-store credentials: they
hand their images to the gatekeeper's intake. Then a node tries to read and list what
the others stored, with everything it has: its NATS connection (the object store's
subjects and JetStream API) and, for S3, the endpoint itself (anonymous, or with keys
it made up). Each is refused.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from typing import Any

import pytest
import urllib3

from stipple_common.messages import TaskSucceeded
from stipple_testkit.network import Network

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NODES = ("node-1", "node-2", "node-3")
BUCKET = "no-peeking"


@pytest.fixture(scope="module")
def s3() -> Iterator[dict[str, str]]:
    """moto's S3 on loopback, with authentication enforced (as MinIO does): only the
    services' key, made in moto's IAM, may do anything."""
    import boto3
    import requests
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    endpoint = f"http://127.0.0.1:{port}"
    iam = boto3.client(
        "iam", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x"
    )
    iam.create_user(UserName="stipple-services")
    policy = iam.create_policy(
        PolicyName="s3-all",
        PolicyDocument='{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"s3:*","Resource":"*"}]}',
    )
    iam.attach_user_policy(UserName="stipple-services", PolicyArn=policy["Policy"]["Arn"])
    key = iam.create_access_key(UserName="stipple-services")["AccessKey"]
    requests.post(f"{endpoint}/moto-api/reset-auth", data=b"0", timeout=5)  # every request must be signed from now on
    yield {
        "blob_backend": "s3",
        "s3_endpoint": f"127.0.0.1:{port}",
        "s3_access_key": key["AccessKeyId"],
        "s3_secret_key": key["SecretAccessKey"],
        "blob_bucket": BUCKET,
    }
    requests.post(f"{endpoint}/moto-api/reset-auth", data=b"1000000", timeout=5)
    moto.stop()


async def peek_over_nats(net: Network, node: str, bucket: str) -> dict[str, bool]:
    """Everything a node could try on NATS to see the images, one at a time: whether the
    server refused each (a permissions violation on the node's own connection)."""
    nc = net.nodes[node].ctx.nc
    refused: list[Exception] = []
    original = nc._error_cb

    async def record(exc: Exception) -> None:
        refused.append(exc)

    attempts = {f"subscribe $O.{bucket}.>": lambda: nc.subscribe(f"$O.{bucket}.>")}
    for api in ("STREAM.INFO", "STREAM.MSG.GET", "DIRECT.GET", "CONSUMER.CREATE", "CONSUMER.DURABLE.CREATE"):
        subject = f"$JS.API.{api}.OBJ_{bucket}" + (".peek" if "DURABLE" in api else "")
        attempts[subject] = lambda subject=subject: nc.publish(subject, b"{}", reply=nc.new_inbox())
    attempts["$JS.API.STREAM.LIST"] = lambda: nc.publish("$JS.API.STREAM.LIST", b"{}", reply=nc.new_inbox())
    out = {}
    nc._error_cb = record
    try:
        for name, attempt in attempts.items():
            refused.clear()
            await attempt()
            await nc.flush(timeout=2)
            await asyncio.sleep(0.1)
            out[name] = any("permissions violation" in str(e) for e in refused)
    finally:
        nc._error_cb = original
    return out


def s3_request(endpoint: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    with urllib3.PoolManager() as http:
        answer = http.request("GET", f"http://{endpoint}{path}", headers=headers or {}, retries=False)
        return answer.status, answer.data


@pytest.mark.parametrize("backend", ["jetstream", "s3"])
async def test_nodes_cannot_read_or_list_each_others_uploads(tmp_path, runner, s3, backend: str) -> None:
    blobs: dict[str, Any] = s3 if backend == "s3" else {"blob_bucket": BUCKET.replace("-", "_")}
    async with Network.secured(tmp_path / "nats") as net:
        await net.gatekeeper(**blobs)
        await net.dispatcher()
        await net.validator(phash_threshold=2, **blobs)
        for name in NODES:
            await net.node(runner, name)  # no blob settings at all: a node has none
        await asyncio.sleep(1.0)
        outcome = await net.run_task(seed=7)
        assert isinstance(outcome, TaskSucceeded), outcome
        assert set(outcome.verdicts.values()) == {"agree"}
        keys = [image.key for image in outcome.images]
        owner = keys[0].split("/")[2]
        peeker = next(name for name in NODES if net.nodes[name].node_id != owner)
        bucket = blobs["blob_bucket"]
        refused = await peek_over_nats(net, peeker, bucket)
        assert all(refused.values()), refused
        if backend == "s3":
            endpoint = s3["s3_endpoint"]
            forged = {
                "Authorization": "AWS4-HMAC-SHA256 Credential=AKIANODE/20261206/us-east-1/s3/aws4_request, "
                "SignedHeaders=host, Signature=00"
            }
            for path, headers in (
                (f"/{bucket}/{keys[0]}", {}),  # anonymous read
                (f"/{bucket}/{keys[0]}", forged),  # with a key it made up
                (f"/{bucket}?list-type=2", {}),  # anonymous list (moto answers 500 where MinIO says 403)
                (f"/{bucket}?list-type=2", forged),
            ):
                status, body = s3_request(endpoint, path, headers)
                assert status >= 400, (path, status)
                assert keys[0].encode() not in body
                assert b"\x89PNG" not in body
