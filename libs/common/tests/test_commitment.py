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


def test_sign_and_signer_answer_what_eth_account_answers():
    """`sign` and `signer` call libsecp256k1 directly; they must agree with eth_account's
    `sign_message` / `recover_message` (EIP-191) on good signatures and refuse the malformed
    ones it refuses. Where eth_account is looser (v of 35 and above, an EIP-155 habit of
    transactions), `signer` refuses: no honest node signs a message that way."""
    from eth_account import Account
    from eth_account.messages import encode_defunct

    order = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141

    def theirs(value: str, signature: str) -> str | None:
        try:
            return Account.recover_message(encode_defunct(hexstr=value), signature=signature)
        except Exception:
            return None

    for _ in range(5):
        account = new_account()
        value = make_commitment("t", account.address, IMAGES, new_nonce())
        signature = sign(account, value)
        assert signature == "0x" + account.sign_message(encode_defunct(hexstr=value)).signature.hex().removeprefix("0x")
        raw = bytes.fromhex(signature[2:])
        r, s, v = raw[:32], int.from_bytes(raw[32:64], "big"), raw[64]
        variants = {
            "as made": raw,
            "v as 0/1": raw[:64] + bytes([v - 27]),
            "v flipped": raw[:64] + bytes([55 - v]),  # another key recovers
            "high s": r + (order - s).to_bytes(32, "big") + bytes([55 - v]),  # the same key (malleable, as ECDSA is)
            "r zero": bytes(32) + raw[32:],
            "r the order": order.to_bytes(32, "big") + raw[32:],
            "s zero": r + bytes(32) + raw[64:],
            "v 29": raw[:64] + b"\x1d",
            "64 bytes": raw[:64],
            "66 bytes": raw + b"\x00",
            "a bit flipped": raw[:5] + bytes([raw[5] ^ 1]) + raw[6:],
        }
        for name, candidate in variants.items():
            assert signer(value, "0x" + candidate.hex()) == theirs(value, "0x" + candidate.hex()), name
        assert signer(value, signature) == account.address
        assert signer(value, "0x" + variants["high s"].hex()) == account.address
        assert signer(value, "0x" + variants["v flipped"].hex()) not in (None, account.address)
        assert signer(value, "0x" + raw[:64].hex() + "25") is None  # eth_account takes v = 37 as 0; we do not
        assert signer(value[:-2], signature) is None  # a commitment is 32 bytes
        assert signer("0xzz", signature) is None
