"""Who a node is: its Ethereum address, proven by a signature, never by what it says.

A node's id is its staking address in lower case (``0x`` and 40 hex digits). It is the
node's token in every subject (``tasks.<task>.committed.<node_id>``, ``nodes.<node_id>.>``,
``work.<node_id>.task``), its NATS user name and its blob prefix. An id of that one shape
cannot collide with another node's consumer names or subject tokens (an id such as
``x-control`` could), and it cannot be chosen: only the holder of the key can prove it.

Joining (services/gatekeeper, the NATS auth callout): the server sends a fresh nonce in
its INFO; the node connects with its address as the token and an EIP-191 signature of
the nonce (`sign_nonce`); the gatekeeper recovers the signer (`nonce_signer`) and admits
the connection as that address only. The nonce is new for every connection, so a
signature cannot be replayed.
"""

from __future__ import annotations

import re

from eth_account import Account
from eth_account.messages import encode_defunct
from eth_account.signers.local import LocalAccount
from eth_utils import keccak

from .errors import StippleError

NODE_ID = re.compile(r"^0x[0-9a-f]{40}$")


class InvalidNodeId(StippleError):
    code = "invalid_node_id"


def node_id_of(address: str) -> str:
    """The node id of an Ethereum address (any case, with 0x)."""
    node_id = address.lower()
    if not NODE_ID.match(node_id):
        raise InvalidNodeId(f"node id: not an Ethereum address (got {address!r})")
    return node_id


def is_node_id(value: object) -> bool:
    return isinstance(value, str) and NODE_ID.match(value) is not None


def sign_nonce(account: LocalAccount, nonce: str | bytes) -> bytes:
    """The proof a node sends at connect: the EIP-191 signature of the server's nonce,
    as 0x hex (ASCII bytes, which is what nats-py's `signature_cb` must return)."""
    text = nonce.decode() if isinstance(nonce, bytes) else nonce
    return ("0x" + account.sign_message(encode_defunct(text=text)).signature.hex().removeprefix("0x")).encode()


def nonce_signer(nonce: str, signature: str) -> str | None:
    """The node id that signed `nonce`, or None when the signature is malformed."""
    try:
        return node_id_of(Account.recover_message(encode_defunct(text=nonce), signature=signature))
    except Exception:  # eth_account raises several types for bad input; all mean "not signed"
        return None


def key_for(name: str) -> str:
    """A private key derived from `name` (keccak of it): the same node every time.
    For tests, benchmarks and the local development network only: anyone who knows
    the name holds the key."""
    return "0x" + keccak(text=f"stipple-dev-key:{name}").hex()


def dev_node_id(name: str) -> str:
    """The node id of `key_for(name)`."""
    return node_id_of(Account.from_key(key_for(name)).address)
