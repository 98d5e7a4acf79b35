"""Whether cheating pays (DESIGN.md): the network refuses to start when it would.

A node that returns a result without computing it gains `k`, at most the largest fee a
task may carry (`STIPPLE_MAX_FEE`). A task is compared (run on three nodes) with
probability `r` (`STIPPLE_VALIDATION_RATE`, 0.1 by default: the dispatcher's secret VRF
sample, docs/validation.md); a compared wrong result goes unnoticed with probability `p`
(`STIPPLE_UNDETECTED_RATE`, 0.01 by default: with checkpoints the matrix accepted 0 of
600 cheats of one class, a 95 % bound of 0.5 %, bench/RESULTS.md "false accept") and is
otherwise slashed `s` (`STIPPLE_SLASH_AMOUNT`, by default the minimum stake). A
cheater's expected gain per task is

    E = (1 - r)·k + r·(p·k - (1 - p)·s)

and the network runs only with E < 0, that is with s > k·((1 - r) + r·p) / (r·(1 - p)).
With the embedded defaults (k = 10 tokens, s = 100, r = 0.1, p = 0.01), E = -0.89 tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from .settings import InvalidSettings


@dataclass(frozen=True)
class Economics:
    max_fee: int  # k
    slash: int  # s
    validation_rate: float  # r
    undetected_rate: float  # p

    def expected_gain(self) -> float:
        """E: what cheating on one task is worth on average (smallest token unit)."""
        k, s, r, p = self.max_fee, self.slash, self.validation_rate, self.undetected_rate
        return (1 - r) * k + r * (p * k - (1 - p) * s)

    def smallest_safe_slash(self) -> float | None:
        """The slash above which cheating does not pay; None when no slash is enough."""
        r, p = self.validation_rate, self.undetected_rate
        if r <= 0 or p >= 1:
            return None
        return self.max_fee * ((1 - r) + r * p) / (r * (1 - p))


def check(economics: Economics) -> None:
    """Raise InvalidSettings, naming the numbers to change, when cheating pays."""
    e = economics
    for name, value in (("STIPPLE_VALIDATION_RATE", e.validation_rate), ("STIPPLE_UNDETECTED_RATE", e.undetected_rate)):
        if not 0 <= value <= 1:
            raise InvalidSettings(f"{name}={value}: must be a probability from 0 to 1")
    if e.max_fee < 0 or e.slash < 0:
        raise InvalidSettings(f"STIPPLE_MAX_FEE={e.max_fee}, slash={e.slash}: must not be negative")
    gain = e.expected_gain()
    if gain < 0 or (e.max_fee == 0 and gain <= 0):
        return
    floor = e.smallest_safe_slash()
    fix = (
        f"raise the slash (STIPPLE_SLASH_AMOUNT, or the minimum stake) above {floor:.0f}, "
        f"or lower STIPPLE_MAX_FEE below {e.max_fee * e.slash / floor:.0f}"
        if floor
        else "raise STIPPLE_VALIDATION_RATE above 0 and keep STIPPLE_UNDETECTED_RATE below 1"
    )
    raise InvalidSettings(
        f"cheating pays: with a task fee up to k={e.max_fee} (STIPPLE_MAX_FEE), validation rate "
        f"r={e.validation_rate} (STIPPLE_VALIDATION_RATE), undetected rate p={e.undetected_rate} "
        f"(STIPPLE_UNDETECTED_RATE) and slash s={e.slash}, a cheater gains E={gain:.0f} per task on "
        f"average; {fix}"
    )
