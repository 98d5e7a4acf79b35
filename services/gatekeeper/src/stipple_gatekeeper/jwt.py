"""The JWTs of NATS auth callout, signed with nkeys (ed25519).

nats-server sends an authorization request (a JWT it signed with its server nkey) on
``$SYS.REQ.USER.AUTH``; the callout answers with an authorization response (a JWT
signed by the issuer account key named in the server's ``auth_callout`` block) that
carries either an error or a user JWT: the connection's name, target account,
permissions and expiry, signed by the same key.

The encoding is small (base64url JSON, header ``{"typ":"JWT","alg":"ed25519-nkey"}``);
`nats-jwt` on PyPI has no types for the callout's claims, so we write them here
(field names from nats-server's jwt/v2 package).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import Any

import nacl.exceptions
import nacl.signing
import nkeys

from stipple_common.errors import StippleError

HEADER = {"typ": "JWT", "alg": "ed25519-nkey"}


class BadRequest(StippleError):
    code = "bad_authorization_request"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def new_seed(prefix: int) -> str:
    """A fresh nkey seed (``SA...`` for an account, ``SU...`` for a user)."""
    encoded: bytes = nkeys.encode_seed(os.urandom(32), prefix)  # nkeys is untyped
    return encoded.decode()


def new_keys() -> dict[str, str]:
    """What a network needs once: the issuer account key and the callout's user key."""
    issuer = new_seed(nkeys.PREFIX_BYTE_ACCOUNT)
    callout = new_seed(nkeys.PREFIX_BYTE_USER)
    return {
        "STIPPLE_ISSUER_SEED": issuer,
        "STIPPLE_CALLOUT_SEED": callout,
        "ISSUER_PUBLIC": public_key(issuer),
        "CALLOUT_PUBLIC": public_key(callout),
    }


def public_key(seed: str) -> str:
    key: bytes = nkeys.from_seed(seed.encode()).public_key  # nkeys is untyped
    return key.decode()


def encode(claims: dict[str, Any], signer: nkeys.KeyPair) -> str:
    body = dict(claims)
    body.pop("jti", None)
    # like jwt/v2: the id is the hash of the claims without it
    body["jti"] = base64.b32encode(hashlib.sha256(json.dumps(body, sort_keys=True).encode()).digest()).decode()
    head = _b64(json.dumps(HEADER).encode())
    payload = _b64(json.dumps(body).encode())
    signature = signer.sign(f"{head}.{payload}".encode())
    return f"{head}.{payload}.{_b64(signature)}"


def decode(token: str, *, verify: bool = True) -> dict[str, Any]:
    """The claims of a JWT; with `verify`, its signature must be its issuer's (``iss``)."""
    try:
        head, payload, signature = token.split(".")
        claims: dict[str, Any] = json.loads(_unb64(payload))
    except ValueError as exc:
        raise BadRequest(f"not a JWT: {exc}") from None
    if verify:
        try:
            verify_key(str(claims["iss"])).verify(f"{head}.{payload}".encode(), _unb64(signature))
        except (KeyError, ValueError, nacl.exceptions.BadSignatureError) as exc:
            raise BadRequest(f"the JWT's signature is not its issuer's: {exc!r}") from None
    return claims


def verify_key(public: str) -> nacl.signing.VerifyKey:
    """The ed25519 key of an nkey public key (base32: prefix byte, 32 key bytes, CRC-16)."""
    raw = base64.b32decode(public + "=" * (-len(public) % 8))
    if len(raw) != 35 or nkeys.crc16_checksum(raw[:-2]) != raw[-2:]:
        raise ValueError(f"not an nkey public key: {public[:60]!r}")
    return nacl.signing.VerifyKey(raw[1:33])


@dataclass(frozen=True)
class AuthRequest:
    """What the callout needs from nats-server's authorization request."""

    user_nkey: str  # the connection's one-time user key: the user JWT's subject
    server_id: str  # the response's audience
    token: str  # what the client sent as its token: its address
    signature: str  # the client's signature of the nonce
    nonce: str
    name: str  # the client's connection name
    host: str


def parse_request(token: str) -> AuthRequest:
    claims = decode(token)
    nats = claims.get("nats") or {}
    try:
        connect = nats.get("connect_opts") or {}
        client = nats.get("client_info") or {}
        return AuthRequest(
            user_nkey=str(nats["user_nkey"]),
            server_id=str(nats["server_id"]["id"]),
            token=str(connect.get("auth_token") or ""),
            signature=str(connect.get("sig") or ""),
            nonce=str(client.get("nonce") or ""),
            name=str(connect.get("name") or ""),
            host=str(client.get("host") or ""),
        )
    except (KeyError, TypeError) as exc:
        raise BadRequest(f"authorization request without {exc}") from None


def user_jwt(
    request: AuthRequest,
    *,
    name: str,
    account: str,
    permissions: dict[str, Any],
    ttl_s: float,
    issuer: nkeys.KeyPair,
    now: float | None = None,
) -> str:
    now = int(now if now is not None else time.time())
    return encode(
        {
            "iat": now,
            "exp": now + int(ttl_s),
            "iss": issuer.public_key.decode(),
            "name": name,
            "sub": request.user_nkey,
            "aud": account,
            "nats": {**permissions, "subs": -1, "data": -1, "payload": -1, "type": "user", "version": 2},
        },
        issuer,
    )


def response(request: AuthRequest, issuer: nkeys.KeyPair, *, user: str = "", error: str = "") -> bytes:
    """The authorization response: `user` (a user JWT) admits, `error` refuses."""
    nats: dict[str, Any] = {"type": "authorization_response", "version": 2}
    if user:
        nats["jwt"] = user
    else:
        nats["error"] = error or "refused"
    claims = {
        "iat": int(time.time()),
        "iss": issuer.public_key.decode(),
        "sub": request.user_nkey,
        "aud": request.server_id,
        "nats": nats,
    }
    return encode(claims, issuer).encode()
