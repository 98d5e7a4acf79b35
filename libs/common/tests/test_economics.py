"""The start-up check that cheating does not pay (DESIGN.md's formula)."""

import pytest

from stipple_common.economics import Economics, check
from stipple_common.settings import InvalidSettings

TOKEN = 10**18


def test_the_formula():
    e = Economics(max_fee=10, slash=100, validation_rate=0.5, undetected_rate=0.1)
    assert e.expected_gain() == pytest.approx(0.5 * 10 + 0.5 * (0.1 * 10 - 0.9 * 100))
    assert e.smallest_safe_slash() == pytest.approx(10 * (0.5 + 0.05) / (0.5 * 0.9))
    at_floor = Economics(max_fee=10, slash=round(e.smallest_safe_slash()) + 1, validation_rate=0.5, undetected_rate=0.1)
    assert at_floor.expected_gain() < 0


def test_the_defaults_of_the_embedded_network_pass():
    check(Economics(max_fee=10 * TOKEN, slash=100 * TOKEN, validation_rate=1.0, undetected_rate=0.1))


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
