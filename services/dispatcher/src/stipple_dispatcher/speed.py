"""How fast each node is, learned from what the dispatcher itself sees: honest ETAs (issue 16).

A task's cost on a node is modelled as a line in its *work*, the step-megapixels it asks
for (steps, refiner steps included, x images x megapixels):

    seconds = overhead + per_work * work

fitted per node and model by exponentially weighted least squares (`Fit`: decayed sums,
the newest observation weighs `alpha`), so a node that gets faster or slower (a new GPU,
a neighbour on the same card) is followed within a few tasks. Until a node has run a
model at sizes far enough apart for a line (`SPREAD`), its cost is the prior's shape
scaled to what it showed (seconds per step-megapixel); a model it never ran takes its
speed on other models relative to the prior; a node never seen takes the prior,
``STIPPLE_SECONDS_PER_STEP`` at 512x512 (`estimate_seconds`, what the queue's order uses).

What is timed is the dispatcher's own view: from the assignment (its clock when it decided)
to the node's `committed` as the TASKS stream stored it (the server's clock). The
`elapsed_s` a node writes into its commitment is never read: a node that claims to be fast
to get more work moves nothing. Timing from the assignment, not from the node's `started`,
leaves a node nothing to shorten (a late `started` would make a run look short; a
commitment cannot come before the work is done), and counts what an app waits for: the
pick-up and a model load too. Observations that cannot be right (not positive, not
finite, longer than `max_s`, the task timeout) are dropped.

`Forecast` turns the speeds into ETAs: list scheduling over the eligible nodes, each free
when its running tasks' predicted remainder ends, the queued tasks ahead taking the
earliest free nodes in queue order, then the task itself; its ETA is when its slowest
copy is predicted to commit, plus the validator's usual time from the last commitment to
the outcome (`finish_s`, learned the same way).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from stipple_common.taskspec import TaskSpec

SPREAD = 0.25
"""A line is fitted once the observed works' standard deviation is this share of their mean
(sizes far enough apart to tell overhead from per-step cost); below it, the prior's shape."""

MIN_LINE = 3  # observations before a line is trusted


def work_of(spec: TaskSpec) -> float:
    """Step-megapixels a task asks of one node (steps with the refiner's, x images x megapixels)."""
    config = spec.task_config
    steps = config.steps + (spec.refiner.steps if spec.refiner else 0)
    return float(steps * config.num_images * config.image_width * config.image_height) / 1e6


@dataclass
class Fit:
    """Exponentially weighted sums of one node's (work, seconds) observations for one model."""

    w: float = 0.0
    x: float = 0.0
    y: float = 0.0
    xx: float = 0.0
    xy: float = 0.0
    n: int = 0
    fitted: tuple[float, float] | None = None  # `line()`, until the next observation

    def add(self, x: float, y: float, alpha: float) -> None:
        self.fitted = None
        keep = 1.0 - alpha if self.n else 0.0
        self.w = self.w * keep + 1.0
        self.x = self.x * keep + x
        self.y = self.y * keep + y
        self.xx = self.xx * keep + x * x
        self.xy = self.xy * keep + x * y
        self.n += 1

    def line(self) -> tuple[float, float]:
        """(overhead, per_work): a fitted line when the works are spread and the fit is sane,
        else through the origin and the weighted means (the prior's shape, scaled)."""
        if self.fitted is None:
            self.fitted = self._line()
        return self.fitted

    def _line(self) -> tuple[float, float]:
        mx, my = self.x / self.w, self.y / self.w
        var = self.xx / self.w - mx * mx
        if self.n >= MIN_LINE and var > (SPREAD * mx) ** 2:
            slope = (self.xy / self.w - mx * my) / var
            overhead = my - slope * mx
            if slope > 0 and overhead >= 0:
                return overhead, slope
        return 0.0, my / mx


class SpeedModel:
    """Per node and model: seconds a task takes from assignment to commitment (see the module)."""

    def __init__(self, seconds_per_step: float, alpha: float = 0.2, max_s: float = math.inf) -> None:
        self.prior_per_work = seconds_per_step / (512 * 512 / 1e6)  # seconds per step-megapixel
        self.alpha = alpha
        self.max_s = max_s
        self.fits: dict[tuple[str, str], Fit] = {}  # (node, model) -> its observations
        self.factor: dict[str, float] = {}  # node -> its speed over the prior, any model (EWMA)
        self.finish_s = 0.0  # from the last commitment to the outcome (EWMA)
        self.observations = 0  # runs learned from (a forecast made before the last one is stale)
        self._finishes = 0

    def observe(self, node_id: str, spec: TaskSpec, seconds: float) -> bool:
        """One run of `spec` on `node_id` took `seconds` as the dispatcher saw it; False
        (and nothing learned) when that cannot be a real run."""
        work = work_of(spec)
        if not (math.isfinite(seconds) and 0 < seconds <= self.max_s) or work <= 0:
            return False
        key = (node_id, spec.model_name)
        fit = self.fits.get(key)
        if fit is None:
            if len(self.fits) > 100_000:  # nodes and models come and go: start over rather than grow
                self.fits.clear()
                self.factor.clear()
            fit = self.fits[key] = Fit()
        fit.add(work, seconds, self.alpha)
        self.observations += 1
        ratio = seconds / (self.prior_per_work * work)
        previous = self.factor.get(node_id)
        self.factor[node_id] = ratio if previous is None else previous + self.alpha * (ratio - previous)
        return True

    def observe_finish(self, seconds: float) -> bool:
        """The validator took `seconds` from a task's last commitment to its outcome."""
        if not (math.isfinite(seconds) and 0 <= seconds <= self.max_s):
            return False
        self._finishes += 1
        self.finish_s = seconds if self._finishes == 1 else self.finish_s + self.alpha * (seconds - self.finish_s)
        return True

    def line(self, node_id: str, model: str) -> tuple[float, float]:
        """(overhead, per_work) for `model` on `node_id`: its own fit, else its speed on other
        models times the prior, else the prior."""
        fit = self.fits.get((node_id, model))
        if fit is not None:
            return fit.line()
        return 0.0, self.prior_per_work * self.factor.get(node_id, 1.0)

    def predict(self, node_id: str, spec: TaskSpec) -> float:
        overhead, per_work = self.line(node_id, spec.model_name)
        return overhead + per_work * work_of(spec)

    def prior(self, spec: TaskSpec) -> float:
        return self.prior_per_work * work_of(spec)


@dataclass(frozen=True)
class Job:
    """A queued task as the forecast sees it: its work and how many nodes it takes."""

    work: float
    copies: int


class Forecast:
    """List scheduling of queued jobs over nodes whose slots free up at known times.

    `slots`: (free_at, node) for every slot of every eligible node; `lines[node]` its
    (overhead, per_work) for the model; `weights[node]` how likely the picker takes it
    among free nodes. Slots free already (at or before `now`) are one pool: a job that
    takes one is expected to run at the pool's weighted mean speed (the picker draws at
    random among free nodes), and the likeliest node leaves the pool. A job starts when
    its `copies` slots are free, and never before the job ahead of it: `pump` does not
    pass a task that waits for nodes (its model is blocked for the pass)."""

    def __init__(
        self,
        slots: Sequence[tuple[float, int]],
        lines: np.ndarray,
        weights: np.ndarray,
        now: float,
    ) -> None:
        self.now = now
        self.lines = lines
        self.weights = weights
        self.free = sorted((node for at, node in slots if at <= now), key=lambda node: -weights[node])
        self.busy = [(at, node) for at, node in slots if at > now]
        heapq.heapify(self.busy)
        self.floor = now  # no job starts before the one ahead of it (`pump` blocks a model that must wait)

    def _pool_line(self) -> tuple[float, float]:
        nodes = np.asarray(self.free)
        w = self.weights[nodes]
        mean = (self.lines[nodes] * w[:, None]).sum(axis=0) / w.sum()
        return float(mean[0]), float(mean[1])

    def place(self, job: Job) -> float | None:
        """Run `job` on the earliest free slots: when its slowest copy ends (None: too few nodes)."""
        copies = max(1, job.copies)
        if copies > len(self.free) + len(self.busy):
            return None
        taken: list[tuple[float, int, tuple[float, float]]] = []
        for _ in range(copies):
            if self.free:
                line = self._pool_line()
                taken.append((self.now, self.free.pop(0), line))
            else:
                at, node = heapq.heappop(self.busy)
                overhead, per_work = self.lines[node]
                taken.append((at, node, (float(overhead), float(per_work))))
        start = self.floor = max(self.floor, *(at for at, _, _ in taken))
        end = start
        for _, node, (overhead, per_work) in taken:
            done = start + overhead + per_work * job.work
            heapq.heappush(self.busy, (done, node))
            end = max(end, done)
        return end
