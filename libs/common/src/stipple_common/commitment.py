"""Commit-reveal: a node binds itself to its result before it can see anyone else's.

The commitment is keccak-256 over a canonical encoding of what the node will reveal
(task id, node id, per image: index, seed, pHash, blob key, SHA-256 of the PNG and the
checkpoint digests of its latents; and the node's determinism class) and a random 32-byte
nonce. Binding the task and node ids means a commitment cannot be replayed for another
task or claimed by another node. The node signs the commitment with its Ethereum key
(EIP-191 "personal message", as wallets and contracts verify it), so the validator can
check who committed without trusting the message bus.
"""

from __future__ import annotations

import functools
import secrets
from collections.abc import Sequence

import coincurve
import msgspec
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils import keccak, to_checksum_address

from .messages import ImageResult


def new_nonce() -> str:
    return "0x" + secrets.token_hex(32)


def make_commitment(
    task_id: str, node_id: str, images: Sequence[ImageResult], nonce: str, determinism: str = ""
) -> str:
    """keccak-256 (0x hex) of the canonical reveal and the nonce."""
    ordered = sorted(images, key=lambda i: i.index)
    body = msgspec.json.encode(
        [
            task_id,
            node_id,
            [[i.index, i.seed, i.phash, i.key, i.sha256, i.checkpoints, i.summaries] for i in ordered],
            determinism,
        ]
    )
    return "0x" + keccak(body + bytes.fromhex(nonce.removeprefix("0x"))).hex()


def sign(account: LocalAccount, commitment: str) -> str:
    """The node's signature of `commitment` as ``personal_sign`` makes it (EIP-191: the
    keccak of ``"\\x19Ethereum Signed Message:\\n32"`` and the 32 bytes; r, s, v with v 27 or 28).
    Made with libsecp256k1 (coincurve) directly: eth_account's `sign_message` gives the same
    bytes at six times the cost."""
    recoverable = _secp256k1_key(bytes(account.key)).sign_recoverable(_digest(commitment), hasher=None)
    return "0x" + recoverable[:64].hex() + format(recoverable[64] + 27, "02x")


def signer(commitment: str, signature: str) -> str | None:
    """The address that signed `commitment` (checksummed), or None when the signature is
    malformed: not 65 bytes of hex, v not 27, 28 (or 0, 1), r or s out of range, or no point.
    What eth_account's `recover_message` answers for these signatures, at a third of its cost
    (tests/test_commitment.py compares the two)."""
    try:
        raw = bytes.fromhex(signature.removeprefix("0x"))
        digest = _digest(commitment)
    except ValueError:
        return None
    if len(raw) != SIGNATURE_BYTES or raw[64] not in _RECOVERY_IDS:
        return None
    try:
        public = coincurve.PublicKey.from_signature_and_message(
            raw[:64] + bytes([_RECOVERY_IDS[raw[64]]]), digest, hasher=None
        )
    except Exception:  # r or s zero or not below the order, no point recovers: all mean "not signed"
        return None
    return to_checksum_address(keccak(public.format(compressed=False)[1:])[-20:])


SIGNATURE_BYTES = 65
_RECOVERY_IDS = {27: 0, 28: 1, 0: 0, 1: 1}
_PERSONAL_PREFIX = b"\x19Ethereum Signed Message:\n32"


@functools.lru_cache(maxsize=8)
def _secp256k1_key(secret: bytes) -> coincurve.PrivateKey:
    """A node's key, made once (making one derives its public key: half the cost of a signature)."""
    return coincurve.PrivateKey(secret)


def _digest(commitment: str) -> bytes:
    """What is signed: EIP-191's personal message hash of the commitment's 32 bytes."""
    value = bytes.fromhex(commitment.removeprefix("0x"))
    if len(value) != 32:
        raise ValueError(f"a commitment is 32 bytes, not {len(value)}")
    return keccak(_PERSONAL_PREFIX + value)


def account_from_key(private_key: str) -> LocalAccount:
    account: LocalAccount = Account.from_key(private_key)
    return account


def new_account() -> LocalAccount:
    account: LocalAccount = Account.create()
    return account
