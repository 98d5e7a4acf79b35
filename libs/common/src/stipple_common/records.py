"""Every record that services keep in a JetStream KV bucket, as msgspec Structs.

A bucket is a contract between the service that writes it and the ones that read it,
like a subject: its values are typed here once, with decoders built once, and read and
written through `get` and `put`. The rules of messages.py hold (docs/protocol.md): new
fields get defaults, an existing field never changes type, and decoding is lenient about
unknown fields, so that the records a running network already holds still decode.

- `stakes` (the chain-indexer's projection of NodeStaking): node id -> `IndexedStake`.
- `bans` (the validator's sentinel): node id -> `Ban`.
- `chain` (the chain-indexer's): `deployment` -> `ChainDeployment` (the contracts, the
  chain and the minimum stake), `cursor` -> `ChainCursor` (how far its events are published).
- `qos` (the validator's): node id -> its window, a list of `QosSample` (oldest first).
- `sampling` (the dispatcher's): its VRF public key (64 hex digits) -> `SamplingKey`, one
  entry per key it ever sampled with: what an auditor checks the outcomes' proofs against.
"""

from __future__ import annotations

import asyncio
from typing import TypeVar

import msgspec
from nats.js.errors import KeyNotFoundError, NoKeysError
from nats.js.kv import KeyValue

R = TypeVar("R")

DEPLOYMENT_KEY = "deployment"  # in the `chain` bucket
CURSOR_KEY = "cursor"  # in the `chain` bucket


# --------------------------------------------------------------------------- stakes, bans


class IndexedStake(msgspec.Struct, frozen=True, kw_only=True):
    """A node's stake as the chain says it, in the `stakes` KV bucket under its node id
    (the chain-indexer's projection of NodeStaking's events)."""

    stake: int = 0  # tokens staked (still counted while leaving)
    leaving: bool = False  # asked to unstake: no longer active
    owner: str = ""  # who staked for the node: its operator (node id form); "" = the node itself
    block: int = 0  # the block of the event that set it


class Ban(msgspec.Struct, frozen=True, kw_only=True):
    """The `bans` KV bucket's value under a node id (NodeBanned, kept for the gatekeeper)."""

    reason: str
    detail: str
    until: float
    at: float
    # the node's bans in a row (each begun within the sentinel's memory of the last one's
    # end): the n-th lasts 2**(n-1) times the first; 1 in a record from before the field
    count: int = 1


# --------------------------------------------------------------------------- sampling


class SamplingKey(msgspec.Struct, frozen=True, kw_only=True):
    """The `sampling` bucket's value under a VRF public key: the dispatcher published it
    when it started sampling with the key (vrf.py; `stipple audit` reads it)."""

    public_key: str  # 64 hex digits, the bucket key too
    rate: float  # the sampling rate (STIPPLE_VALIDATION_RATE) it started with
    since: float  # epoch seconds


# --------------------------------------------------------------------------- chain


class ChainDeployment(msgspec.Struct, frozen=True, kw_only=True):
    """The `chain` bucket's `deployment`: where the contracts are and which chain they are
    on, written by the chain-indexer at start. Its presence says the network has a chain
    (the gateway charges fees only then); the gatekeeper admits nodes by `min_stake`."""

    token: str  # the contracts' addresses, checksummed
    staking: str
    payment: str
    chain_id: int = 0
    url: str = ""  # the chain's JSON-RPC URL as the indexer reaches it (eth-tester:// when embedded)
    account: str = ""  # the indexer's account
    custodial: str = ""  # whose deposit pays the apps' fees (custodial mode)
    min_stake: int | None = None  # NodeStaking's minimum; None: a record from before it was kept

    def addresses(self) -> dict[str, str]:
        """The contracts' addresses by name (what `chain.Deployment.from_dict` reads)."""
        return {"token": self.token, "staking": self.staking, "payment": self.payment}


class ChainCursor(msgspec.Struct, frozen=True, kw_only=True):
    """The `chain` bucket's `cursor`: the last block whose events the chain-indexer has
    published, and the hashes of the blocks before it (to find where a reorg forked)."""

    number: int = -1  # the last block whose events are published; -1: none yet
    hashes: dict[int, str] = {}  # number -> hash of the last blocks published (the follower keeps 128)

    @property
    def hash(self) -> str:
        return self.hashes.get(self.number, "")


# --------------------------------------------------------------------------- qos


class QosSample(msgspec.Struct, frozen=True, kw_only=True, array_like=True):
    """One scored task in a node's window in the `qos` bucket (a JSON array
    ``[task_id, score, verdict]``; a new field goes at the end, with a default)."""

    task_id: str
    score: int
    verdict: str  # a Verdict, or "cleared": the marker of a passed check (no score)


QosWindow = list[QosSample]


# --------------------------------------------------------------------------- coding

encoder = msgspec.json.Encoder()
indexed_stake_decoder = msgspec.json.Decoder(IndexedStake)
ban_decoder = msgspec.json.Decoder(Ban)
deployment_decoder = msgspec.json.Decoder(ChainDeployment)
cursor_decoder = msgspec.json.Decoder(ChainCursor)
qos_window_decoder = msgspec.json.Decoder(QosWindow)
sampling_key_decoder = msgspec.json.Decoder(SamplingKey)


def encode(record: msgspec.Struct | QosWindow) -> bytes:
    return encoder.encode(record)


async def get(kv: KeyValue, key: str, decoder: msgspec.json.Decoder[R]) -> R | None:
    """The record under `key`, or None when there is none (never written, deleted, empty).
    A value that does not decode raises msgspec.DecodeError (ValidationError included)."""
    try:
        entry = await kv.get(key)
    except KeyNotFoundError:  # KeyDeletedError too
        return None
    return decoder.decode(entry.value) if entry.value else None


async def keys(kv: KeyValue, attempts: int = 10, pause_s: float = 0.05) -> list[str]:
    """The bucket's keys; [] when it has none. nats-py's `KeyValue.keys` raises NoKeysError
    for an empty bucket, and now and then for one whose entry a `get` has just read (its
    watcher can end before the first entry arrives: seen once on a loaded 2-core machine;
    other projects report keys() missing keys too), so an empty answer is asked again
    `attempts` times before it is believed."""
    for attempt in range(attempts):
        try:
            return list(await kv.keys())
        except NoKeysError:
            if attempt + 1 < attempts:
                await asyncio.sleep(pause_s)
    return []


async def put(kv: KeyValue, key: str, record: msgspec.Struct | QosWindow) -> int:
    """Write `record` under `key`; returns the new revision."""
    return await kv.put(key, encode(record))
