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

import secrets
from collections.abc import Sequence

import msgspec
from eth_account import Account
from eth_account.messages import encode_defunct
from eth_account.signers.local import LocalAccount
from eth_utils import keccak

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
    signed = account.sign_message(encode_defunct(hexstr=commitment))
    return "0x" + signed.signature.hex().removeprefix("0x")


def signer(commitment: str, signature: str) -> str | None:
    """The address that signed `commitment`, or None when the signature is malformed."""
    try:
        # Account's methods are combomethods, which mypy sees as Any
        address: str = Account.recover_message(encode_defunct(hexstr=commitment), signature=signature)
    except Exception:  # eth_account raises several types for bad input; all mean "not signed"
        return None
    return address


def account_from_key(private_key: str) -> LocalAccount:
    account: LocalAccount = Account.from_key(private_key)
    return account


def new_account() -> LocalAccount:
    account: LocalAccount = Account.create()
    return account
