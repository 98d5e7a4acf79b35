"""The KV records: each one round-trips, and the JSON a running network already holds (written
before a field existed, or by a newer service) still decodes."""

from __future__ import annotations

import uuid

import msgspec
import pytest
from nats.js.api import KeyValueConfig

from stipple_common import records
from stipple_common.records import Ban, ChainCursor, ChainDeployment, IndexedStake, QosSample

TOKEN, STAKING, PAYMENT = ("0x" + f"{i:040x}" for i in (1, 2, 3))

RECORDS = [
    (IndexedStake(stake=150, leaving=True, owner="0x" + "ab" * 20, block=7), records.indexed_stake_decoder),
    (Ban(reason="not_assigned", detail="flooded", until=2.5, at=1.5), records.ban_decoder),
    (
        ChainDeployment(
            token=TOKEN,
            staking=STAKING,
            payment=PAYMENT,
            chain_id=31337,
            url="http://anvil:8545",
            account=TOKEN,
            custodial=PAYMENT,
            min_stake=100,
        ),
        records.deployment_decoder,
    ),
    (ChainCursor(number=12, hashes={11: "0x11", 12: "0x12"}), records.cursor_decoder),
    (
        [QosSample(task_id="t1", score=10, verdict="agree"), QosSample(task_id="p", score=0, verdict="cleared")],
        records.qos_window_decoder,
    ),
]


@pytest.mark.parametrize(("record", "decoder"), RECORDS, ids=lambda r: type(r).__name__)
def test_records_round_trip(record, decoder):
    assert decoder.decode(records.encode(record)) == record


def test_the_records_an_older_chain_indexer_wrote_still_decode():
    # a deployment from before the minimum stake, the accounts and the URL were kept
    old = b'{"chain_id": 1, "token": "%s", "staking": "%s", "payment": "%s"}' % (
        TOKEN.encode(),
        STAKING.encode(),
        PAYMENT.encode(),
    )
    deployment = records.deployment_decoder.decode(old)
    assert (deployment.chain_id, deployment.url, deployment.min_stake) == (1, "", None)
    assert deployment.addresses() == {"token": TOKEN, "staking": STAKING, "payment": PAYMENT}
    # the follower's cursor as msgspec wrote it (integer keys as JSON strings)
    cursor = records.cursor_decoder.decode(b'{"number": 5, "hashes": {"4": "0x04", "5": "0x05"}}')
    assert (cursor.number, cursor.hash, cursor.hashes) == (5, "0x05", {4: "0x04", 5: "0x05"})
    assert records.cursor_decoder.decode(b"{}") == ChainCursor(number=-1, hashes={})
    # a stake entry without `block` or `owner`
    assert records.indexed_stake_decoder.decode(b'{"stake": 10, "leaving": false}') == IndexedStake(stake=10)


def test_a_newer_writers_fields_are_ignored_and_the_qos_window_stays_an_array():
    newer = b'{"stake": 3, "leaving": false, "owner": "", "block": 1, "slashed": 9}'
    assert records.indexed_stake_decoder.decode(newer) == IndexedStake(stake=3, block=1)
    window = [QosSample(task_id="t", score=5, verdict="agree")]
    assert records.encode(window) == b'[["t",5,"agree"]]'  # what the validator has always stored
    assert records.qos_window_decoder.decode(b'[["t",5,"agree"]]') == window


def test_a_deployment_without_its_contracts_is_refused():
    with pytest.raises(msgspec.ValidationError, match="token"):
        records.deployment_decoder.decode(b'{"chain_id": 1, "min_stake": 5}')


@pytest.mark.integration
async def test_get_and_put_through_a_bucket(nc):
    kv = await nc.jetstream().create_key_value(KeyValueConfig(bucket=f"records{uuid.uuid4().hex[:8]}"))
    assert await records.get(kv, records.CURSOR_KEY, records.cursor_decoder) is None
    cursor = ChainCursor(number=3, hashes={3: "0x03"})
    await records.put(kv, records.CURSOR_KEY, cursor)
    assert await records.get(kv, records.CURSOR_KEY, records.cursor_decoder) == cursor
    await kv.delete(records.CURSOR_KEY)
    assert await records.get(kv, records.CURSOR_KEY, records.cursor_decoder) is None


async def test_keys_of_a_bucket_and_of_an_empty_one(nc):
    """`records.keys` lists a bucket's keys, and gives [] (not NoKeysError) for an empty
    one, after asking again: nats-py's keys() can end before the first entry arrives."""
    js = nc.jetstream()
    bucket = f"keys-{uuid.uuid4().hex[:8]}"
    kv = await js.create_key_value(KeyValueConfig(bucket=bucket))
    assert await records.keys(kv, attempts=2, pause_s=0.01) == []
    await kv.put("a", b"1")
    await kv.put("b", b"2")
    assert sorted(await records.keys(kv)) == ["a", "b"]
    await js.delete_key_value(bucket)
