"""The start-up check that cheating does not pay (DESIGN.md's formula)."""

import pytest

from stipple_common.economics import Economics, check
from stipple_common.settings import CommonSettings, InvalidSettings

TOKEN = 10**18


def test_the_formula():
    e = Economics(max_fee=10, slash=100, validation_rate=0.5, undetected_rate=0.1)
    assert e.expected_gain() == pytest.approx(0.5 * 10 + 0.5 * (0.1 * 10 - 0.9 * 100))
    assert e.smallest_safe_slash() == pytest.approx(10 * (0.5 + 0.05) / (0.5 * 0.9))
    at_floor = Economics(max_fee=10, slash=round(e.smallest_safe_slash()) + 1, validation_rate=0.5, undetected_rate=0.1)
    assert at_floor.expected_gain() < 0


def test_the_defaults_of_the_embedded_network_pass_with_the_real_sampling_rate():
    """The defaults (CommonSettings) and the embedded chain's minimum stake, which is the
    slash: one task in ten compared, 1 % of compared cheats missed, a fee of at most 10
    tokens against a stake of 100. Cheating loses about 0.89 tokens per task."""
    defaults = CommonSettings()
    e = Economics(
        max_fee=defaults.max_fee,
        slash=100 * TOKEN,
        validation_rate=defaults.validation_rate,
        undetected_rate=defaults.undetected_rate,
    )
    assert (defaults.validation_rate, defaults.undetected_rate, defaults.max_fee) == (0.1, 0.01, 10 * TOKEN)
    check(e)
    assert e.expected_gain() == pytest.approx(-0.89 * TOKEN)
    # at the old all-three rate's p (a pHash check without checkpoints), the same numbers would not hold
    with pytest.raises(InvalidSettings, match="cheating pays"):
        check(Economics(max_fee=10 * TOKEN, slash=100 * TOKEN, validation_rate=0.1, undetected_rate=0.1))


@pytest.mark.parametrize(
    ("economics", "words"),
    [
        (Economics(max_fee=10 * TOKEN, slash=0, validation_rate=1.0, undetected_rate=0.1), "above 1111111111111111"),
        (Economics(max_fee=10 * TOKEN, slash=TOKEN, validation_rate=1.0, undetected_rate=0.1), "STIPPLE_MAX_FEE below"),
        (Economics(max_fee=100, slash=10**6, validation_rate=0.0, undetected_rate=0.1), "VALIDATION_RATE above 0"),
        (Economics(max_fee=100, slash=10**6, validation_rate=1.0, undetected_rate=1.0), "UNDETECTED_RATE below 1"),
    ],
)
def test_cheating_that_pays_is_refused_naming_what_to_change(economics, words):
    with pytest.raises(InvalidSettings, match="cheating pays") as caught:
        check(economics)
    assert words in str(caught.value)
    assert f"k={economics.max_fee}" in str(caught.value)


def test_a_free_network_with_nothing_at_stake_is_allowed():
    check(Economics(max_fee=0, slash=0, validation_rate=1.0, undetected_rate=0.1))  # nothing to gain


@pytest.mark.parametrize("rate", [-0.1, 1.5])
def test_probabilities_out_of_range_are_named(rate):
    with pytest.raises(InvalidSettings, match="STIPPLE_VALIDATION_RATE"):
        check(Economics(max_fee=1, slash=1, validation_rate=rate, undetected_rate=0.1))
