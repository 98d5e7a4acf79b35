"""Commitments bind a result, a nonce, a task and a node; signatures name the signer."""

import msgspec

from stipple_common.commitment import make_commitment, new_account, new_nonce, sign, signer
from stipple_common.messages import ImageResult

IMAGES = [ImageResult(index=i, key=f"k{i}", phash="0123456789abcdef", seed=5 + i, width=64, height=64) for i in (0, 1)]


def test_commitment_changes_with_every_bound_part():
    nonce = new_nonce()
    base = make_commitment("t", "n", IMAGES, nonce)
    assert base.startswith("0x")
    assert len(base) == 66
    assert make_commitment("t", "n", list(reversed(IMAGES)), nonce) == base  # order of listing does not matter
    other_image = [IMAGES[0], ImageResult(index=1, key="k1", phash="0" * 16, seed=6, width=64, height=64)]
    for changed in (
        make_commitment("t2", "n", IMAGES, nonce),
        make_commitment("t", "n2", IMAGES, nonce),
        make_commitment("t", "n", other_image, nonce),
        make_commitment("t", "n", IMAGES, new_nonce()),
    ):
        assert changed != base


def test_signature_recovers_the_signer_and_only_it():
    account, other = new_account(), new_account()
    value = make_commitment("t", "n", IMAGES, new_nonce())
    signature = sign(account, value)
    assert signer(value, signature) == account.address
    assert signer(value, sign(other, value)) == other.address
    assert signer(make_commitment("t", "n", IMAGES, new_nonce()), signature) != account.address
    assert signer(value, "0xdeadbeef") is None
    assert signer(value, "not hex") is None


def test_the_checkpoints_and_the_determinism_class_are_committed():
    nonce = new_nonce()
    base = make_commitment("t", "n", IMAGES, nonce, "class")
    changed = [msgspec.structs.replace(image, checkpoints=["0" * 32] * 3) for image in IMAGES]
    assert make_commitment("t", "n", changed, nonce, "class") != base
    assert make_commitment("t", "n", IMAGES, nonce, "another class") != base
