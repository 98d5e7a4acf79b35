"""Which nodes run a task: eligibility and weights (DESIGN.md, Dispatch), vectorized.

`NodeIndex` keeps the node directory as columns (numpy arrays) that node events update in
place, so one decision over 10,000 registered nodes is a handful of vector operations.

Eligible: live (a heartbeat within the TTL, not quit: `NodeIndex.live`, the one
definition of liveness the dispatcher has), not paused (2 timeouts in its last
3 tasks, until it passes the validator's check: a probe task answered in time), not
banned, stake at least the minimum, memory at least what the task's model needs, a
compatible version, serving the base model (by name or on disk), and a free slot (fewer
tasks in flight than `slots`).

Stake and operator come from the chain (the chain-indexer's `stakes` bucket, `set_stake`),
never from what a node announces: a node the chain knows nothing of has stake 0, and its
operator is the stake's owner, or the node itself when it staked for itself. Nodes of one
operator never share a task.

Weight: S·Q/(S+Q) with S = sqrt(stake / the largest eligible stake) (1 when nobody
stakes) and Q = qos/10 (0.5 for a node without a score yet), times a locality boost: 2
when every model the task needs is loaded, else 1 + 0.7·(share on disk) + 0.3·(share
loaded). Sampling is weighted without replacement (Efraimidis-Spirakis: the largest
u^(1/w) win), at most one node per operator. Warm first (`Requirements.warm_first`, the
default): the eligible nodes that have every model of the task loaded are drawn before the
others (weighted among themselves), which come in only when too few warm ones are free;
a node that says it has more than `warm_max_loaded` models loaded is never warm (what
it says is not checked: one that claimed everything would come first for everything). For
a sampled task's other copies the first node's determinism class still comes first. A
2x boost alone leaves most runs to load their model: at 1,000 nodes, Zipf demand over 200
models and two pipelines in VRAM, 18 % of runs found it loaded against 98 % warm first, and
99 % with the queue's warm wait (bench/warm_models.py, issue 16).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from stipple_common.errors import StippleError
from stipple_common.messages import NodeJoined, NodeQos
from stipple_common.taskspec import TaskSpec

NEW_NODE_QOS = 5.0  # Q = 0.5 until the validator has scored the node


class NotEnoughNodes(StippleError):
    code = "no_nodes"
    retryable = True  # nodes come and go (or free up); the dispatcher waits, then gives up


def task_models(spec: TaskSpec) -> dict[str, str]:
    """Every model reference the task needs, the base model first, with the model store's
    kind for it (what a node would download it as)."""
    models: dict[str, str] = {spec.model_name: "model"}
    if spec.refiner is not None:
        models.setdefault(spec.refiner.model, "model")
    if spec.controlnet is not None:
        models.setdefault(spec.controlnet.model, "controlnet")
    for ref in (spec.vae, spec.unet):
        if ref:
            models.setdefault(ref, "model")
    if spec.lora is not None:
        models.setdefault(spec.lora.model, "lora")
    for lora in spec.loras:
        models.setdefault(lora.model, "lora")
    if spec.textual_inversion:
        models.setdefault(spec.textual_inversion, "embedding")
    models.pop("", None)
    return models


def compatible(node_version: str, ours: str) -> bool:
    """Same major version (same major.minor before 1.0, where minors may break)."""

    def key(version: str) -> tuple[str, ...]:
        parts = version.split(".")
        return tuple(parts[:2]) if parts[0] == "0" else tuple(parts[:1])

    return key(node_version) == key(ours)


@dataclass(frozen=True)
class Requirements:
    min_stake: int = 0
    memory_bytes: int = 0
    slots: int = 1  # tasks a node runs at once (one GPU, one diffusion)
    version: str = ""  # ours; empty: any
    # copies come from the first node's class only when this many operators of it are eligible:
    # a class a few operators made up must not get to check only itself (collusion)
    class_operators: int = 5
    # nodes with every model of the task loaded are drawn before the others (weighted among themselves)
    warm_first: bool = True
    # only such nodes: the task waits for one to free up rather than have a node load its models
    warm_only: bool = False
    # a node that says it has more models loaded than this is never warm: claiming everything gains nothing
    warm_max_loaded: int = 4


class NodeIndex:
    """The node directory as columns. Rows are never removed (a node that quits is
    marked); a node that joins again keeps its row."""

    def __init__(self, capacity: int = 64) -> None:
        self.indexed: dict[str, tuple[int, str]] = {}  # node id -> (stake, operator) as the chain says
        # what the NODES stream says of a node before its announcement (a replay keeps only
        # the last message per subject, in any order): applied when it joins
        self._bans: dict[str, float] = {}
        self._scores: dict[str, NodeQos] = {}
        self.row: dict[str, int] = {}
        self.ids: list[str] = []
        self.joined: list[NodeJoined] = []
        self._operators: dict[str, int] = {}
        self.size = 0
        self.operator = np.zeros(capacity, dtype=np.int64)
        self.stake = np.zeros(capacity, dtype=np.float64)
        self.qos = np.full(capacity, NEW_NODE_QOS, dtype=np.float64)
        self.memory = np.zeros(capacity, dtype=np.float64)
        self.last_seen = np.zeros(capacity, dtype=np.float64)
        self.quit = np.zeros(capacity, dtype=bool)
        self.paused = np.zeros(capacity, dtype=bool)
        self.banned_until = np.zeros(capacity, dtype=np.float64)
        self.inflight = np.zeros(capacity, dtype=np.int64)
        self.loaded_count = np.zeros(capacity, dtype=np.int64)  # models a node says it has loaded
        self.version_ok = np.ones(capacity, dtype=bool)
        self.serves: dict[str, np.ndarray] = {}  # model -> bool column (by name or on disk)
        self.on_disk: dict[str, np.ndarray] = {}
        self.loaded: dict[str, np.ndarray] = {}

    # ------------------------------------------------------------------ updates

    def _grow(self) -> None:
        capacity = len(self.operator) * 2
        columns = (
            "operator",
            "stake",
            "qos",
            "memory",
            "last_seen",
            "quit",
            "paused",
            "banned_until",
            "inflight",
            "loaded_count",
        )
        for name in (*columns, "version_ok"):
            old = getattr(self, name)
            new = np.zeros(capacity, dtype=old.dtype)
            if name == "qos":
                new[:] = NEW_NODE_QOS
            if name == "version_ok":
                new[:] = True
            new[: len(old)] = old
            setattr(self, name, new)
        for models in (self.serves, self.on_disk, self.loaded):
            for model, old in models.items():
                new = np.zeros(capacity, dtype=bool)
                new[: len(old)] = old
                models[model] = new

    def _column(self, columns: dict[str, np.ndarray], model: str) -> np.ndarray:
        if model not in columns:
            columns[model] = np.zeros(len(self.operator), dtype=bool)
        return columns[model]

    def _set_models(self, columns: dict[str, np.ndarray], row: int, models: Iterable[str]) -> None:
        wanted = set(models)
        emptied = []
        for model, column in columns.items():
            had = column[row]
            column[row] = model in wanted
            if had and not column[row] and not column[: self.size].any():
                emptied.append(model)
        for model in emptied:  # no node has it any more: names a node made up do not pile up
            del columns[model]
        for model in wanted - columns.keys():
            self._column(columns, model)[row] = True

    def join(self, node: NodeJoined, seen_at: float, version: str = "") -> None:
        row = self.row.get(node.node_id)
        if row is None:
            if self.size == len(self.operator):
                self._grow()
            row = self.size
            self.size += 1
            self.row[node.node_id] = row
            self.ids.append(node.node_id)
            self.joined.append(node)
        else:
            self.joined[row] = node  # a restart alone does not lift a pause: the check does
        if node.node_id in self._bans:
            self.banned_until[row] = self._bans[node.node_id]
        if node.node_id in self._scores:
            self._apply_score(row, self._scores[node.node_id])
        stake, operator = self.indexed.get(node.node_id, (0, node.node_id))
        self.operator[row] = self._operators.setdefault(operator, len(self._operators))
        self.stake[row] = stake
        self.memory[row] = node.memory_bytes
        self.last_seen[row] = max(seen_at, self.last_seen[row])
        self.quit[row] = False
        self.version_ok[row] = not version or compatible(node.version, version)
        self._set_models(self.serves, row, (*node.models, *node.models_on_disk))
        self._set_models(self.on_disk, row, (*node.models, *node.models_on_disk))
        self._set_models(self.loaded, row, node.models_loaded)
        self.loaded_count[row] = len(set(node.models_loaded))

    def set_stake(self, node_id: str, stake: int, owner: str = "") -> None:
        """A node's stake as the chain-indexer indexed it (0 while it is leaving), and its
        operator: the stake's owner ("" or the node itself: a node that staked alone)."""
        operator = (owner or node_id).lower()
        self.indexed[node_id] = (stake, operator)
        row = self.row.get(node_id)
        if row is not None:
            self.stake[row] = stake
            self.operator[row] = self._operators.setdefault(operator, len(self._operators))

    def ban(self, node_id: str, until: float) -> None:
        self._bans[node_id] = until
        row = self.row.get(node_id)
        if row is not None:
            self.banned_until[row] = until

    def heartbeat(self, node_id: str, seen_at: float, models_loaded: Sequence[str] | None = None) -> None:
        row = self.row.get(node_id)
        if row is None:
            return
        if seen_at >= self.last_seen[row]:
            self.last_seen[row] = seen_at
            self.quit[row] = False
        if models_loaded is not None:
            self._set_models(self.loaded, row, models_loaded)
            self.loaded_count[row] = len(set(models_loaded))

    def leave(self, node_id: str) -> None:
        row = self.row.get(node_id)
        if row is not None:
            self.quit[row] = True

    def score(self, event: NodeQos) -> None:
        self._scores[event.node_id] = event
        row = self.row.get(event.node_id)
        if row is not None:
            self._apply_score(row, event)

    def _apply_score(self, row: int, event: NodeQos) -> None:
        self.qos[row] = event.qos
        self.paused[row] = event.recent_timeouts >= 2  # a passed check publishes 0

    def assigned(self, nodes: Iterable[str], delta: int = 1) -> None:
        for node_id in nodes:
            row = self.row.get(node_id)
            if row is not None:
                self.inflight[row] = max(0, self.inflight[row] + delta)

    # ------------------------------------------------------------------ decisions

    def live(self, now: float, ttl_s: float) -> np.ndarray:
        """Which of the rows are live nodes (a mask over `size` rows): a heartbeat within
        `ttl_s` of `now`, and not quit. The one definition of liveness: every other
        question about live nodes (eligibility, holders, the queue's ETA, the node
        gauges) starts from it."""
        n = self.size
        return ~self.quit[:n] & (now - self.last_seen[:n] <= ttl_s)

    def holders(self, model: str, now: float, ttl_s: float) -> np.ndarray:
        """Rows of the live nodes that have `model` (served by name or on disk)."""
        column = self.on_disk.get(model)
        if column is None or self.size == 0:
            return np.empty(0, dtype=np.int64)
        return np.flatnonzero(column[: self.size] & self.live(now, ttl_s))

    def live_rows(self, now: float, ttl_s: float) -> np.ndarray:
        """Rows of the live nodes of a compatible version."""
        return np.flatnonzero(self.live(now, ttl_s) & self.version_ok[: self.size])

    def serving_live(self, model: str, now: float, ttl_s: float) -> int:
        """Live nodes that serve `model` (by name or on disk), free or not."""
        column = self.serves.get(model)
        if column is None:
            return 0
        return int(np.count_nonzero(column[: self.size] & self.live(now, ttl_s)))

    def registered_serving(self, model: str) -> int:
        """Nodes that ever announced `model` (live or not): zero means it can never run."""
        column = self.serves.get(model)
        return int(column[: self.size].sum()) if column is not None else 0

    def eligible(self, spec: TaskSpec, now: float, ttl_s: float, req: Requirements) -> np.ndarray:
        """Row numbers of the nodes that may take `spec` now."""
        n = self.size
        serves = self.serves.get(spec.model_name)
        if serves is None or n == 0:
            return np.empty(0, dtype=np.int64)
        mask = serves[:n] & self.live(now, ttl_s) & ~self.paused[:n] & self.version_ok[:n]
        mask &= self.banned_until[:n] <= now
        mask &= self.inflight[:n] < req.slots
        if req.min_stake:
            mask &= self.stake[:n] >= req.min_stake
        if req.memory_bytes:
            mask &= self.memory[:n] >= req.memory_bytes
        return np.flatnonzero(mask)

    def weights(self, rows: np.ndarray, models: Sequence[str]) -> np.ndarray:
        stake = self.stake[rows]
        top = stake.max() if len(stake) else 0.0
        s = np.sqrt(stake / top) if top > 0 else np.ones(len(rows))
        q = self.qos[rows] / 10.0
        with np.errstate(invalid="ignore", divide="ignore"):
            weight = np.where(s + q > 0, s * q / (s + q), 0.0)
        on_disk = np.zeros(len(rows))
        loaded = np.zeros(len(rows))
        for model in models:
            if model in self.on_disk:
                on_disk += self.on_disk[model][rows]
            if model in self.loaded:
                loaded += self.loaded[model][rows]
        on_disk /= len(models)
        loaded /= len(models)
        boost = np.where(loaded >= 1.0, 2.0, 1.0 + 0.7 * on_disk + 0.3 * loaded)
        # a floor, so a node with a score of 0 can still earn one back now and then
        floored: np.ndarray = np.maximum(weight * boost, 1e-3)
        return floored

    def warm(self, rows: np.ndarray, models: Sequence[str], max_loaded: int) -> np.ndarray:
        """Which of `rows` have every one of `models` loaded (by their last heartbeat), of the
        nodes that say they have at most `max_loaded` models loaded: what a node says it
        has loaded is not checked, and a node that said it had everything loaded would
        otherwise come first for every task."""
        warm: np.ndarray = self.loaded_count[rows] <= max_loaded
        for model in models:
            column = self.loaded.get(model)
            if column is None:
                return np.zeros(len(rows), dtype=bool)
            warm &= column[rows]
        return warm

    def warm_live(self, models: Sequence[str], now: float, ttl_s: float, max_loaded: int) -> int:
        """Live nodes, free or not, that have every one of `models` loaded (`warm`)."""
        rows = self.live_rows(now, ttl_s)
        return int(np.count_nonzero(self.warm(rows, models, max_loaded))) if len(rows) else 0

    def pick(
        self,
        spec: TaskSpec,
        count: int,
        rng: np.random.Generator,
        *,
        now: float,
        ttl_s: float,
        req: Requirements,
        exclude: Iterable[str] = (),
    ) -> list[str]:
        """`count` nodes of distinct operators, weighted, or NotEnoughNodes saying why.
        Nodes in `exclude`, and every node of their operators, are left out (a replacement
        must not share an operator with the task's other nodes). The first node is drawn
        from every eligible one; the others from its determinism class first (the class it
        joined with), so that copies compare bit for bit, when at least `req.class_operators`
        operators of that class are eligible now; else from any class (compared by their
        latent summaries). Drawing the first from all keeps a node of a rare class in the
        sample; the operator floor keeps a class that a few colluding operators made up
        from being checked only by itself."""
        rows = self.eligible(spec, now, ttl_s, req)
        models = list(task_models(spec))
        if req.warm_only and len(rows):
            rows = rows[self.warm(rows, models, req.warm_max_loaded)]
        excluded = [self.row[node] for node in exclude if node in self.row]
        if excluded and len(rows):
            rows = rows[~np.isin(self.operator[rows], self.operator[excluded])]
        if len(rows):
            keys = rng.random(len(rows)) ** (1.0 / self.weights(rows, models))  # in [0, 1)
            if req.warm_first:
                keys += self.warm(rows, models, req.warm_max_loaded)  # every warm node ahead of the others
            order = [int(rows[i]) for i in np.argsort(-keys)]
            first_class = self.joined[order[0]].determinism
            same = [row for row in order[1:] if first_class and self.joined[row].determinism == first_class]
            if len({int(self.operator[row]) for row in [order[0], *same]}) < req.class_operators:
                same = []
            chosen: dict[int, str] = {}  # operator -> node id
            for row in [order[0], *same, *order[1:]]:
                chosen.setdefault(int(self.operator[row]), self.ids[row])
                if len(chosen) == count:
                    return list(chosen.values())
        operators = len({int(self.operator[row]) for row in rows})
        raise NotEnoughNodes(
            f"task needs {count} nodes of distinct operators serving model {spec.model_name!r}; "
            f"{len(rows)} eligible nodes of {operators} operators are free now"
            + (" with its models loaded" if req.warm_only else "")
        )
