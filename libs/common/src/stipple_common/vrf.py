"""A verifiable random function for secret sampled validation (issue 13).

The construction is ECVRF-EDWARDS25519-SHA512-TAI, suite 0x03 of RFC 9381
("Verifiable Random Functions (VRFs)", August 2023), with `validate_key` always on.
It reproduces the RFC's test vectors (Appendix B.3, Examples 16-18) byte for byte.

No well-kept Python package implements RFC 9381 (the ones on PyPI are single-author
releases without the RFC's vectors, or implement earlier drafts whose proofs differ), so
this module follows the RFC directly. The group arithmetic is libsodium's, through
PyNaCl's low-level bindings, so the secret scalar only ever meets libsodium's
constant-time code. One step is Python, on public data only: deciding whether 32 bytes
decode to a point (RFC 8032 §5.1.3), because libsodium's own check also demands the
prime-order subgroup, which a hash-to-curve candidate rarely is.

The steps, each named after the RFC section it follows (suite parameters §5.5: edwards25519,
cofactor 8, q = 2^252 + 27742317777372353535851937790883648493, ptLen = qLen = 32,
cLen = 16, Hash = SHA-512, integers are little-endian, points encoded as in RFC 8032):

- Keys (§5.5, RFC 8032 §5.1.5): SK is a 32-byte seed; x is the clamped first half of
  SHA-512(SK); the public key is Y = x*B, encoded in 32 bytes.
- ECVRF_encode_to_curve_try_and_increment (§5.4.1.1): for ctr = 0, 1, ...:
  SHA-512(0x03 || 0x01 || PK || alpha || ctr || 0x00), first 32 bytes decoded as a point;
  the first that decodes, times the cofactor, is H. The salt is the public key (§5.5).
- ECVRF_nonce_generation_RFC8032 (§5.4.2.2): k = SHA-512(second half of SHA-512(SK) || H) mod q.
- ECVRF_challenge_generation (§5.4.3): c = first 16 bytes of
  SHA-512(0x03 || 0x02 || Y || H || Gamma || U || V || 0x00).
- Proving (§5.1): Gamma = x*H, U = k*B, V = k*H, s = (k + c*x) mod q;
  pi = Gamma (32) || c (16) || s (32), 80 bytes.
- ECVRF_decode_proof (§5.4.4): Gamma must decode, s must be below q.
- Proof to hash (§5.2): beta = SHA-512(0x03 || 0x03 || 8*Gamma || 0x00), 64 bytes.
- Verifying (§5.3, with ECVRF_validate_key §5.4.5): Y must decode and not be of low order;
  U = s*B - c*Y, V = s*H - c*Gamma; valid iff c equals the challenge of (Y, H, Gamma, U, V).

One deliberate strictness beyond the RFC: libsodium's scalar multiplication refuses points
outside the prime-order subgroup, so a public key or a Gamma with a torsion component is
refused. Every honest key (x*B) and proof (Gamma = x*H, with H cofactor-cleared) lies in that
subgroup, so no proof this module makes, and no RFC vector, is refused; and beta is computed
from 8*Gamma, so accepting such a proof could never have changed the output.

Sampling. The control plane holds one VRF key and publishes its public key. For a task it
computes pi = prove(SK, alpha_for_task(task_id)) and beta = proof_to_hash(pi); the task is
sampled for validation iff `sampled(beta, rate)`. The VRF makes beta unique for (key, task id)
and unpredictable without SK, so nobody (a node included) can tell in advance which tasks are
checked, and the control plane cannot pick them: it has exactly one valid pi per task.

How an auditor checks one task, from its outcome's `SamplingProof` (every task has one,
selected or not) and the control plane's published public key, with any RFC 9381
implementation:

1. alpha = b"stipple/sample/v1:" + the task id in UTF-8.
2. beta = ECVRF_verify(public key, pi, alpha) with suite 0x03 and validate_key on; an
   invalid proof, or a public key other than the published one, fails the audit.
3. n = the first 8 bytes of beta read as an unsigned big-endian integer, u = n / 2^64 in [0, 1).
4. The task is selected iff u < rate, compared exactly (n < rate * 2^64 with no rounding;
   rate is the IEEE-754 double recorded in the proof). `selected` must equal that.
"""

from __future__ import annotations

import hashlib
import math
import secrets

import msgspec
from nacl import bindings as sodium
from nacl.exceptions import CryptoError

SUITE = b"\x03"  # ECVRF-EDWARDS25519-SHA512-TAI
PUBLIC_KEY_BYTES = 32
SEED_BYTES = 32
PROOF_BYTES = 80  # ptLen + cLen + qLen
BETA_BYTES = 64
SAMPLE_DOMAIN = b"stipple/sample/v1:"

_P = 2**255 - 19  # the field of edwards25519
_Q = 2**252 + 27742317777372353535851937790883648493  # the prime order of its main subgroup
_C_LEN = 16
_IDENTITY = (1).to_bytes(32, "little")  # (0, 1)


def _is_point(s: bytes) -> bool:
    """string_to_point succeeds: RFC 8032 §5.1.3 decoding, non-canonical encodings refused.

    The canonical checks are here (y < p; x = 0, which is y = 1 or -1, with the sign bit
    set is INVALID); whether the point lies on the curve is libsodium's decoding (its
    point addition decodes both points and checks them on the curve, and nothing more),
    about ten times faster than the square root in Python (the RFC's decoding, which
    tests/test_vrf.py keeps as the reference it compares this with)."""
    if len(s) != 32:
        return False
    n = int.from_bytes(s, "little")
    y = n & ((1 << 255) - 1)
    if y >= _P:
        return False
    if y in (1, _P - 1):  # x = 0: valid only with the sign bit clear
        return n >> 255 == 0
    try:
        sodium.crypto_core_ed25519_add(s, _IDENTITY)
    except CryptoError:
        return False
    return True


def _times_cofactor(point: bytes) -> bytes:
    """8*P for a valid encoding (libsodium's addition needs only a point on the curve)."""
    for _ in range(3):
        point = sodium.crypto_core_ed25519_add(point, point)
    return point


def _mul(k: bytes, point: bytes) -> bytes:
    """k*P for a point of the prime-order subgroup; raises CryptoError for any other point."""
    if not any(k):
        return _IDENTITY
    return sodium.crypto_scalarmult_ed25519_noclamp(k, point)


def _mul_base(k: bytes) -> bytes:
    if not any(k):
        return _IDENTITY
    return sodium.crypto_scalarmult_ed25519_base_noclamp(k)


def _encode_to_curve(public: bytes, alpha: bytes) -> bytes:
    """ECVRF_encode_to_curve_try_and_increment (§5.4.1.1), salt = PK_string: H, encoded."""
    for ctr in range(256):
        digest = hashlib.sha512(SUITE + b"\x01" + public + alpha + bytes([ctr]) + b"\x00").digest()
        if _is_point(digest[:32]):
            return _times_cofactor(digest[:32])
    raise ValueError("encode_to_curve found no point in 256 tries")  # probability 2^-256


def _challenge(*points: bytes) -> bytes:
    """ECVRF_challenge_generation (§5.4.3): c as 16 little-endian bytes."""
    return hashlib.sha512(SUITE + b"\x02" + b"".join(points) + b"\x00").digest()[:_C_LEN]


def _decode_proof(pi: bytes) -> tuple[bytes, bytes, bytes] | None:
    """ECVRF_decode_proof (§5.4.4): (Gamma, c as a 32-byte scalar, s), or None."""
    if len(pi) != PROOF_BYTES:
        return None
    gamma = pi[:32]
    s = pi[32 + _C_LEN :]
    if not _is_point(gamma) or int.from_bytes(s, "little") >= _Q:
        return None
    return gamma, pi[32 : 32 + _C_LEN] + bytes(32 - _C_LEN), s


def _beta(gamma: bytes) -> bytes:
    """ECVRF_proof_to_hash (§5.2) from a valid Gamma."""
    return hashlib.sha512(SUITE + b"\x03" + _times_cofactor(gamma) + b"\x00").digest()


class VrfKey:
    """A VRF secret key: a 32-byte seed, as an Ed25519 secret key (RFC 8032 §5.1.5)."""

    __slots__ = ("_nonce_key", "_seed", "_x", "public")

    def __init__(self, seed: bytes) -> None:
        if len(seed) != SEED_BYTES:
            raise ValueError(f"a VRF seed is {SEED_BYTES} bytes, not {len(seed)}")
        digest = bytearray(hashlib.sha512(seed).digest())
        digest[0] &= 248
        digest[31] &= 127
        digest[31] |= 64
        self._seed = bytes(seed)
        self._x = sodium.crypto_core_ed25519_scalar_reduce(bytes(digest[:32]) + bytes(32))  # x mod q
        self._nonce_key = bytes(digest[32:])
        self.public: bytes = _mul_base(self._x)

    @classmethod
    def generate(cls) -> VrfKey:
        return cls(secrets.token_bytes(SEED_BYTES))

    @property
    def seed(self) -> bytes:
        return self._seed

    def __repr__(self) -> str:
        return f"VrfKey(public={self.public.hex()})"

    def prove(self, alpha: bytes) -> bytes:
        """ECVRF_prove (§5.1): the 80-byte proof pi for `alpha`."""
        h = _encode_to_curve(self.public, alpha)
        gamma = _mul(self._x, h)
        k = sodium.crypto_core_ed25519_scalar_reduce(hashlib.sha512(self._nonce_key + h).digest())  # §5.4.2.2
        c = _challenge(self.public, h, gamma, _mul_base(k), _mul(k, h))
        s = sodium.crypto_core_ed25519_scalar_add(
            k, sodium.crypto_core_ed25519_scalar_mul(c + bytes(32 - _C_LEN), self._x)
        )
        return gamma + c + s


def prove(secret_seed: bytes, alpha: bytes) -> bytes:
    """ECVRF_prove (§5.1) with the key of `secret_seed`: pi, 80 bytes."""
    return VrfKey(secret_seed).prove(alpha)


def proof_to_hash(pi: bytes) -> bytes:
    """ECVRF_proof_to_hash (§5.2): beta, 64 bytes. It does not verify pi: use `verify`.

    Raises ValueError when pi does not decode (§5.4.4)."""
    decoded = _decode_proof(pi)
    if decoded is None:
        raise ValueError("not an ECVRF proof")
    return _beta(decoded[0])


def verify(public: bytes, pi: bytes, alpha: bytes) -> bytes | None:
    """ECVRF_verify (§5.3, validate_key on): beta (64 bytes) when pi proves alpha under `public`, else None."""
    if len(public) != PUBLIC_KEY_BYTES:
        return None
    if not _is_point(public) or _times_cofactor(public) == _IDENTITY:  # ECVRF_validate_key (§5.4.5)
        return None
    decoded = _decode_proof(pi)
    if decoded is None:
        return None
    gamma, c, s = decoded
    h = _encode_to_curve(public, alpha)
    try:
        u = sodium.crypto_core_ed25519_sub(_mul_base(s), _mul(c, public))
        v = sodium.crypto_core_ed25519_sub(_mul(s, h), _mul(c, gamma))
    except CryptoError:  # a point outside the prime-order subgroup (see the module's docstring)
        return None
    if not secrets.compare_digest(_challenge(public, h, gamma, u, v), pi[32 : 32 + _C_LEN]):
        return None
    return _beta(gamma)


def alpha_for_task(task_id: str) -> bytes:
    """The VRF input of a task's sampling: b"stipple/sample/v1:" + the task id in UTF-8."""
    return SAMPLE_DOMAIN + task_id.encode("utf-8")


def sampled(beta: bytes, rate: float) -> bool:
    """Whether a VRF output selects its task at sampling rate `rate` (in [0, 1]).

    n = int.from_bytes(beta[:8], "big") and u = n / 2^64, uniform in [0, 1); selected iff
    u < rate, compared exactly: n < rate * 2^64 without rounding (rate * 2^64 is exact in
    binary floating point and Python compares int with float exactly). So rate 0 selects
    nothing and rate 1 everything."""
    if len(beta) < 8:
        raise ValueError("beta is shorter than 8 bytes")
    if not (math.isfinite(rate) and 0.0 <= rate <= 1.0):
        raise ValueError(f"a sampling rate is in [0, 1], not {rate}")
    return int.from_bytes(beta[:8], "big") < rate * 2.0**64


class SamplingProof(msgspec.Struct, frozen=True, kw_only=True):
    """The sampling record every task outcome carries, selected or not.

    `public_key` is the control plane's VRF public key (64 hex digits), `proof` the 80-byte
    proof for `alpha_for_task(task_id)` (160 hex digits), `rate` the sampling rate in force
    and `selected` whether the task was sampled."""

    public_key: str
    proof: str
    rate: float
    selected: bool

    @classmethod
    def make(cls, key: VrfKey, task_id: str, rate: float) -> SamplingProof:
        pi = key.prove(alpha_for_task(task_id))
        beta = _beta(pi[:32])  # Gamma as just computed: a valid point, no need to decode the proof again
        return cls(public_key=key.public.hex(), proof=pi.hex(), rate=rate, selected=sampled(beta, rate))

    def check(self, task_id: str, public_key: bytes | None = None) -> bool:
        """The proof is valid for `task_id` and `selected` is what it implies.

        Pass the control plane's published key as `public_key`: without it this only checks
        that the record is consistent with the key it names, which anyone can forge."""
        try:
            public, pi = bytes.fromhex(self.public_key), bytes.fromhex(self.proof)
        except ValueError:
            return False
        if public_key is not None and public != public_key:
            return False
        beta = verify(public, pi, alpha_for_task(task_id))
        if beta is None or not (math.isfinite(self.rate) and 0.0 <= self.rate <= 1.0):
            return False
        return self.selected == sampled(beta, self.rate)
