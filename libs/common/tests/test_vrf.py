"""ECVRF-EDWARDS25519-SHA512-TAI (RFC 9381) and the sampling built on it."""

import hashlib
import math
import random

import msgspec
import pytest
from nacl import bindings as sodium

from stipple_common import vrf
from stipple_common.vrf import (
    _P,
    SamplingProof,
    VrfKey,
    _is_point,
    alpha_for_task,
    proof_to_hash,
    prove,
    sampled,
    verify,
)

# RFC 9381 Appendix B.3, Examples 16, 17 and 18: SK, PK, alpha, H (the encode_to_curve
# output, an intermediate value the RFC lists), pi, beta.
RFC9381_B3 = [
    (
        "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
        "",
        "91bbed02a99461df1ad4c6564a5f5d829d0b90cfc7903e7a5797bd658abf3318",
        "8657106690b5526245a92b003bb079ccd1a92130477671f6fc01ad16f26f723f"
        "26f8a57ccaed74ee1b190bed1f479d9727d2d0f9b005a6e456a35d4fb0daab12"
        "68a1b0db10836d9826a528ca76567805",
        "90cf1df3b703cce59e2a35b925d411164068269d7b2d29f3301c03dd757876ff"
        "66b71dda49d2de59d03450451af026798e8f81cd2e333de5cdf4f3e140fdd8ae",
    ),
    (
        "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
        "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
        "72",
        "5b659fc3d4e9263fd9a4ed1d022d75eaacc20df5e09f9ea937502396598dc551",  # found at ctr = 1
        "f3141cd382dc42909d19ec5110469e4feae18300e94f304590abdced48aed593"
        "3bf0864a62558b3ed7f2fea45c92a465301b3bbf5e3e54ddf2d935be3b67926d"
        "a3ef39226bbc355bdc9850112c8f4b02",
        "eb4440665d3891d668e7e0fcaf587f1b4bd7fbfe99d0eb2211ccec90496310eb"
        "5e33821bc613efb94db5e5b54c70a848a0bef4553a41befc57663b56373a5031",
    ),
    (
        "c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
        "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025",
        "af82",
        "bf4339376f5542811de615e3313d2b36f6f53c0acfebb482159711201192576a",
        "9bc0f79119cc5604bf02d23b4caede71393cedfbb191434dd016d30177ccbf80"
        "96bb474e53895c362d8628ee9f9ea3c0e52c7a5c691b6c18c9979866568add7a"
        "2d41b00b05081ed0f58ee5e31b3a970e",
        "645427e5d00c62a23fb703732fa5d892940935942101e456ecca7bb217c61c45"
        "2118fec1219202a0edcf038bb6373241578be7217ba85a2687f7a0310b2df19f",
    ),
]

P = 2**255 - 19
Q = 2**252 + 27742317777372353535851937790883648493
IDENTITY = bytes.fromhex("01" + "00" * 31)
# The points of small order on edwards25519 (orders 1, 2, 4, 4, 8, 8, 8, 8).
LOW_ORDER = [
    IDENTITY,
    bytes.fromhex("ec" + "ff" * 30 + "7f"),  # (0, -1)
    bytes(32),  # (sqrt(-1), 0)
    bytes(31) + b"\x80",  # (-sqrt(-1), 0)
    bytes.fromhex("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a"),
    bytes.fromhex("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa"),
    bytes.fromhex("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05"),
    bytes.fromhex("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85"),
]
ORDER_8 = LOW_ORDER[4]
# Example 17's first try_and_increment candidate (ctr = 0) is not a point: the RFC found H at ctr = 1.
_PK17 = bytes.fromhex(RFC9381_B3[1][1])
NOT_A_POINT = hashlib.sha512(b"\x03\x01" + _PK17 + b"\x72" + b"\x00" + b"\x00").digest()[:32]

KEY = VrfKey(bytes(range(32)))
ALPHA = b"an input"
PI = KEY.prove(ALPHA)


@pytest.mark.parametrize(("sk", "pk", "alpha", "h", "pi", "beta"), RFC9381_B3, ids=["ex16", "ex17", "ex18"])
def test_rfc9381_vectors(sk: str, pk: str, alpha: str, h: str, pi: str, beta: str) -> None:
    key = VrfKey(bytes.fromhex(sk))
    assert key.public.hex() == pk
    assert vrf._encode_to_curve(key.public, bytes.fromhex(alpha)).hex() == h
    assert key.prove(bytes.fromhex(alpha)).hex() == pi
    assert prove(bytes.fromhex(sk), bytes.fromhex(alpha)).hex() == pi
    assert proof_to_hash(bytes.fromhex(pi)).hex() == beta
    assert verify(bytes.fromhex(pk), bytes.fromhex(pi), bytes.fromhex(alpha)) == bytes.fromhex(beta)


def test_proofs_are_deterministic_and_verify() -> None:
    assert len(PI) == vrf.PROOF_BYTES == 80
    assert KEY.prove(ALPHA) == PI
    beta = verify(KEY.public, PI, ALPHA)
    assert beta is not None
    assert len(beta) == vrf.BETA_BYTES == 64
    assert beta == proof_to_hash(PI)
    assert verify(KEY.public, KEY.prove(b""), b"") is not None
    assert verify(KEY.public, KEY.prove(b"x" * 10_000), b"x" * 10_000) is not None


def test_the_key_takes_a_32_byte_seed_and_keeps_it_out_of_its_repr() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        VrfKey(bytes(31))
    generated = VrfKey.generate()
    assert VrfKey(generated.seed).public == generated.public
    assert generated.seed.hex() not in repr(generated)
    assert generated.public.hex() in repr(generated)


def test_a_proof_for_another_input_fails() -> None:
    assert verify(KEY.public, KEY.prove(b"another input"), ALPHA) is None


def test_a_wrong_input_fails() -> None:
    assert verify(KEY.public, PI, ALPHA + b"!") is None
    assert verify(KEY.public, PI, b"") is None


def test_a_wrong_public_key_fails() -> None:
    assert verify(VrfKey(bytes(32)).public, PI, ALPHA) is None
    assert verify(bytes.fromhex(RFC9381_B3[0][1]), PI, ALPHA) is None


def test_a_proof_by_another_key_fails_even_with_its_own_beta() -> None:
    """Another key's proof for the same input gives another beta and verifies only under that key."""
    other = VrfKey(bytes(32))
    pi = other.prove(ALPHA)
    assert verify(other.public, pi, ALPHA) != verify(KEY.public, PI, ALPHA)
    assert verify(KEY.public, pi, ALPHA) is None


@pytest.mark.parametrize("index", range(vrf.PROOF_BYTES))
def test_any_tampered_byte_of_the_proof_fails(index: int) -> None:
    for bit in (0, 7):
        tampered = bytearray(PI)
        tampered[index] ^= 1 << bit
        assert verify(KEY.public, bytes(tampered), ALPHA) is None


def test_malformed_lengths_fail() -> None:
    assert verify(KEY.public, PI[:-1], ALPHA) is None
    assert verify(KEY.public, PI + b"\x00", ALPHA) is None
    assert verify(KEY.public[:-1], PI, ALPHA) is None
    assert verify(KEY.public + b"\x00", PI, ALPHA) is None
    assert verify(b"", b"", ALPHA) is None


def test_the_low_order_points_are_what_the_tests_say() -> None:
    """Independent of vrf.py: each is a point (libsodium adds it) and 8 times it is the identity."""
    for point in LOW_ORDER:
        eight = point
        for _ in range(3):
            eight = sodium.crypto_core_ed25519_add(eight, eight)
        assert eight == IDENTITY


def test_invalid_public_keys_are_refused() -> None:
    y_is_p = P.to_bytes(32, "little")  # y = p: not canonical (it would be y = 0)
    y_is_p_plus_1 = (P + 1).to_bytes(32, "little")  # not canonical (it would be the identity)
    x_zero_negative = bytes.fromhex("01" + "00" * 30 + "80")  # the identity with x's sign set
    for public in [NOT_A_POINT, y_is_p, y_is_p_plus_1, x_zero_negative, b"\xff" * 32, *LOW_ORDER]:
        assert verify(public, PI, ALPHA) is None, public.hex()


def test_a_public_key_with_a_torsion_component_is_refused() -> None:
    """Stricter than RFC 9381 (see vrf.py): Y + T for T of order 8 is a valid point, not of low order,
    but outside the prime-order subgroup; no honest key is."""
    public = sodium.crypto_core_ed25519_add(KEY.public, ORDER_8)
    assert verify(public, PI, ALPHA) is None


def test_an_invalid_gamma_is_refused() -> None:
    torsion = sodium.crypto_core_ed25519_add(PI[:32], ORDER_8)  # Gamma + T: same beta, not in the subgroup
    for gamma in [NOT_A_POINT, P.to_bytes(32, "little"), bytes.fromhex("01" + "00" * 30 + "80"), torsion, *LOW_ORDER]:
        assert verify(KEY.public, gamma + PI[32:], ALPHA) is None, gamma.hex()
    with pytest.raises(ValueError, match="not an ECVRF proof"):
        proof_to_hash(NOT_A_POINT + PI[32:])


def test_an_unreduced_s_is_refused() -> None:
    """ECVRF_decode_proof: s >= q is INVALID, which stops s + q standing in for s."""
    s = int.from_bytes(PI[48:], "little")
    for bad in (s + Q, Q, 2**256 - 1):
        pi = PI[:48] + bad.to_bytes(32, "little")
        assert verify(KEY.public, pi, ALPHA) is None
        with pytest.raises(ValueError, match="not an ECVRF proof"):
            proof_to_hash(pi)


def test_alpha_is_domain_separated_utf8() -> None:
    assert alpha_for_task("t-1") == b"stipple/sample/v1:t-1"
    assert alpha_for_task("é") == b"stipple/sample/v1:\xc3\xa9"


def test_sampled_compares_the_first_8_bytes_big_endian_exactly() -> None:
    half = 2**63
    assert sampled((half - 1).to_bytes(8, "big") + b"\xff" * 56, 0.5)
    assert not sampled(half.to_bytes(8, "big") + bytes(56), 0.5)
    assert not sampled(bytes(64), 0.0)  # rate 0 selects nothing, not even u = 0
    assert sampled(b"\xff" * 64, 1.0)  # rate 1 selects everything
    rate = 0.1
    threshold = math.ceil(rate * 2**64)  # the smallest n with n / 2^64 >= rate (rate * 2^64 is not an integer)
    assert sampled((threshold - 1).to_bytes(8, "big") + bytes(56), rate)
    assert not sampled(threshold.to_bytes(8, "big") + bytes(56), rate)


@pytest.mark.parametrize("rate", [-0.1, 1.1, math.nan, math.inf])
def test_sampled_refuses_a_rate_outside_0_1(rate: float) -> None:
    with pytest.raises(ValueError, match="rate"):
        sampled(bytes(64), rate)


def test_sampled_refuses_a_short_beta() -> None:
    with pytest.raises(ValueError, match="8 bytes"):
        sampled(bytes(7), 0.5)


def _task_ids(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.getrandbits(64):016x}-{rng.getrandbits(32):08x}" for _ in range(n)]


def _within(count: int, n: int, rate: float, sigmas: float = 5.0) -> bool:
    return abs(count - n * rate) <= sigmas * math.sqrt(n * rate * (1 - rate))


@pytest.mark.parametrize("rate", [0.01, 0.1, 0.5, 0.9])
def test_sampled_hits_the_rate_over_20000_task_ids(rate: float) -> None:
    """The mapping alone, over 20,000 random task ids, with SHA-512 of each id's alpha standing in
    for beta (both are SHA-512 outputs; proving 20,000 times takes seconds: see the slow test)."""
    ids = _task_ids(20_000, seed=13)
    count = sum(sampled(hashlib.sha512(alpha_for_task(t)).digest(), rate) for t in ids)
    assert _within(count, len(ids), rate)


def test_vrf_sampling_hits_the_rate() -> None:
    ids = _task_ids(1_000, seed=7)
    key = VrfKey(b"\x07" * 32)
    count = sum(SamplingProof.make(key, t, 0.3).selected for t in ids)
    assert _within(count, len(ids), 0.3)


def _proofs(key: VrfKey, rate: float) -> tuple[tuple[str, SamplingProof], tuple[str, SamplingProof]]:
    """A selected task and one not selected."""
    made = [(t, SamplingProof.make(key, t, rate)) for t in _task_ids(64, seed=1)]
    return next(m for m in made if m[1].selected), next(m for m in made if not m[1].selected)


def test_sampling_proof_round_trips_and_checks() -> None:
    for task_id, proof in _proofs(KEY, 0.5):
        back = msgspec.json.decode(msgspec.json.encode(proof), type=SamplingProof)
        assert back == proof
        assert back.check(task_id)
        assert back.check(task_id, public_key=KEY.public)
        assert proof.public_key == KEY.public.hex()
        assert bytes.fromhex(proof.proof) == KEY.prove(alpha_for_task(task_id))


def test_a_lie_about_selected_is_caught() -> None:
    for task_id, proof in _proofs(KEY, 0.5):
        assert not msgspec.structs.replace(proof, selected=not proof.selected).check(task_id)


def test_a_changed_rate_that_flips_the_selection_is_caught() -> None:
    (chosen_id, chosen), (skipped_id, skipped) = _proofs(KEY, 0.5)
    assert not msgspec.structs.replace(chosen, rate=0.0).check(chosen_id)
    assert not msgspec.structs.replace(skipped, rate=1.0).check(skipped_id)
    for rate in (math.nan, 1.5, -1.0):
        assert not msgspec.structs.replace(chosen, rate=rate).check(chosen_id)


def test_a_sampling_proof_fails_for_another_task_or_key() -> None:
    (task_id, proof), _ = _proofs(KEY, 0.5)
    assert not proof.check(task_id + "x")
    other = VrfKey(bytes(32))
    forged = SamplingProof.make(other, task_id, 0.5)
    assert forged.check(task_id)  # consistent with the key it names...
    assert not forged.check(task_id, public_key=KEY.public)  # ...but not the published one
    assert not msgspec.structs.replace(proof, public_key=other.public.hex()).check(task_id)


def test_a_malformed_sampling_proof_fails() -> None:
    (task_id, proof), _ = _proofs(KEY, 0.5)
    assert not msgspec.structs.replace(proof, proof="zz" + proof.proof[2:]).check(task_id)
    assert not msgspec.structs.replace(proof, proof=proof.proof[:-2]).check(task_id)
    assert not msgspec.structs.replace(proof, public_key="").check(task_id)


_D = (-121665 * pow(121666, _P - 2, _P)) % _P  # the curve's d


def rfc8032_is_point(s: bytes) -> bool:
    """string_to_point succeeds, computed as RFC 8032 §5.1.3 says (the reference for vrf._is_point)."""
    if len(s) != 32:
        return False
    n = int.from_bytes(s, "little")
    x_0 = n >> 255
    y = n & ((1 << 255) - 1)
    if y >= _P:
        return False
    u = (y * y - 1) % _P
    v = (_D * y * y + 1) % _P
    x = (u * pow(v, 3, _P) * pow(u * pow(v, 7, _P), (_P - 5) // 8, _P)) % _P
    vxx = (v * x * x) % _P
    if vxx != u and vxx != (-u) % _P:  # u/v is not a square: no x
        return False
    return not (x == 0 and x_0 == 1)  # x = 0 (y = 1 or -1) with the sign bit set is INVALID


def test_the_fast_point_check_is_the_rfcs_on_random_strings_and_every_edge() -> None:
    """`_is_point` (libsodium's decoding plus the canonical checks) against the RFC 8032
    decoding computed in Python: about half of random strings are points, and the edges
    (y = 1 and -1 with either sign, y = p and above, non-canonical y + p) agree too."""
    rng = random.Random(9381)
    strings = [rng.randbytes(32) for _ in range(4000)]
    edges = []
    for y in (0, 1, 2, _P - 2, _P - 1, _P, _P + 1, _P + 2, 2**255 - 1):
        for sign in (0, 1):
            edges.append((y | (sign << 255)).to_bytes(32, "little"))
    points = 0
    for s in strings + edges:
        assert _is_point(s) == rfc8032_is_point(s), s.hex()
        points += _is_point(s)
    assert 1500 < points < 2500  # both outcomes are exercised
    assert _is_point(b"\x01" * 31) is False
