"""Which steps a node hashes, and what a well-formed set of checkpoints is."""

import base64
import math

import pytest

from stipple_common import checkpoints


@pytest.mark.parametrize(
    ("num_steps", "expected"),
    [
        (1, [0, 0, 0]),
        (2, [0, 0, 1]),
        (4, [0, 1, 2]),
        (8, [1, 3, 5]),
        (10, [2, 4, 7]),
        (20, [4, 9, 14]),
        (30, [7, 14, 22]),
    ],
)
def test_the_latents_are_hashed_after_a_quarter_a_half_and_three_quarters_of_the_steps(num_steps, expected):
    assert checkpoints.steps(num_steps) == expected
    assert all(0 <= step < num_steps for step in expected)


def test_fewer_steps_hash_other_steps_of_another_schedule():
    """A node that runs 30 steps instead of 40 hashes after other steps (and other latents)."""
    assert checkpoints.steps(40) != checkpoints.steps(30)


def test_no_steps_is_refused():
    with pytest.raises(ValueError, match="at least 1"):
        checkpoints.steps(0)


def test_a_digest_is_128_bits_of_sha256_and_well_formed():
    digest = checkpoints.digest(b"latents")
    assert digest == "b72be11e807c142f6a328afc05112252"  # sha256(b"latents"), its first 16 bytes
    assert checkpoints.DIGEST.fullmatch(digest)
    assert checkpoints.well_formed([digest] * 3) is None
    assert checkpoints.well_formed([digest] * 2) == "2 checkpoints, expected 3 (after 0.25, 0.5, 0.75)"
    assert "not 32 lower-case hex digits" in (checkpoints.well_formed([digest, digest, digest.upper()]) or "")


def test_a_summary_pools_each_channel_to_at_most_8x8_in_float16():
    import numpy as np

    latents = np.arange(4 * 64 * 64, dtype=np.float32).reshape(1, 4, 64, 64)
    values = checkpoints.decode_summary(checkpoints.summary(latents))
    assert values is not None
    assert values.shape == (4 * 8 * 8,)
    pooled = latents[0].reshape(4, 8, 8, 8, 8).mean(axis=(2, 4)).astype(np.float16).astype(np.float32)
    assert np.array_equal(values, pooled.ravel())
    small = np.ones((4, 5, 3), dtype=np.float32)  # smaller than 8 a side: kept as is
    assert checkpoints.decode_summary(checkpoints.summary(small)).shape == (4 * 5 * 3,)
    with pytest.raises(ValueError, match="expected"):
        checkpoints.summary(np.ones((2, 4, 8, 8), dtype=np.float32))


def test_the_summary_distance_is_relative_l2_and_infinite_for_what_is_not_a_summary():
    import numpy as np

    a = np.random.default_rng(1).standard_normal((4, 8, 8)).astype(np.float32)
    x, y = checkpoints.summary(a), checkpoints.summary(a * 1.02)
    assert checkpoints.summary_distance(x, x) == 0.0
    assert checkpoints.summary_distance(x, y) == pytest.approx(0.02, rel=0.05)
    assert checkpoints.summary_distance(x, "not base64!") == math.inf
    assert checkpoints.summary_distance(x, checkpoints.summary(a[:, :4, :4])) == math.inf  # another shape
    assert checkpoints.summary_distance(x, base64.b64encode(np.float16([np.nan] * 256).tobytes()).decode()) == math.inf
