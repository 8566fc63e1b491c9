"""The hot path: filters -> scorers -> clamp, weight, sum -> picker. Synchronous, never awaits.

Allocation-light on purpose: one list per scorer and one for the totals; the explanation (for
``/debug/route`` and debug logs) is only built when asked for. cache_aware's plugin set runs
fused (fused.py: the same totals in two passes) unless a decision is explained or timed.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..replicas.registry import Replica
from ..types import RequestInfo
from .base import Filter, Picker, Scorer
from .fused import kernel_for
from .picker import MaxScorePicker

PluginTimer = Callable[[str, float], None]
# Time the plugins on one request in 64: a timed decision runs plugin by plugin (not fused),
# ~30 us with its eight observations, so one in 16 cost ~2 us on every request.
TIMING_SAMPLE = 64


@dataclass(slots=True)
class ReplicaExplanation:
    replica: str
    gpu_blocks: int
    any_tier_blocks: int
    filtered_out: bool
    scores: dict[str, float] = field(default_factory=dict)
    total: float = 0.0


@dataclass(slots=True)
class Explanation:
    policy: str
    total_blocks: int
    block_size: int
    key_mode: str
    chosen: str = ""
    replicas: list[ReplicaExplanation] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {
            "policy": self.policy,
            "chosen": self.chosen,
            "total_blocks": self.total_blocks,
            "block_size": self.block_size,
            "key_mode": self.key_mode,
            "replicas": [
                {
                    "replica": r.replica,
                    "gpu_blocks": r.gpu_blocks,
                    "cpu_blocks": r.any_tier_blocks,  # the /debug/route key, kept for its readers
                    "filtered_out": r.filtered_out,
                    "scores": r.scores,
                    "total": r.total,
                }
                for r in self.replicas
            ],
        }

    def log_line(self) -> str:
        parts = [f"policy={self.policy} chosen={self.chosen} blocks={self.total_blocks}"]
        for r in self.replicas:
            sc = " ".join(f"{k}={v:.3f}" for k, v in r.scores.items())
            mark = " filtered" if r.filtered_out else ""
            parts.append(
                f"[{r.replica} gpu={r.gpu_blocks} cpu={r.any_tier_blocks} {sc} total={r.total:.3f}{mark}]"
            )
        return " ".join(parts)


class Pipeline:
    def __init__(
        self,
        name: str,
        scorers: Sequence[tuple[Scorer, float]],
        filters: Sequence[Filter] = (),
        picker: Picker | None = None,
        rng: random.Random | None = None,
        plugin_timer: PluginTimer | None = None,
        max_candidates: int = 16,
    ) -> None:
        self.name = name
        self.scorers = [(s, w) for s, w in scorers if w > 0]
        self.filters = list(filters)
        self.picker = picker or MaxScorePicker()
        self.rng = rng or random.Random()
        self.plugin_timer = plugin_timer
        self._count = 0
        self.needs_match = True
        self.max_candidates = max_candidates
        # Explained and timed decisions run the plugins one by one (per-plugin scores and times).
        self.kernel = kernel_for(self.filters, self.scorers, self.picker)

    def select(
        self, req: RequestInfo, candidates: Sequence[Replica], explain: Explanation | None = None
    ) -> Replica:
        if len(candidates) == 1 and explain is None:
            return candidates[0]
        self._count += 1
        timer = self.plugin_timer if self._count % TIMING_SAMPLE == 0 else None
        kept: Sequence[Replica] = candidates
        # Sample under explain too: a debug-logged decision must be the decision that is taken.
        if self.max_candidates and len(candidates) > self.max_candidates:
            kept = self._sample(req, candidates)
        if self.kernel is not None and timer is None and explain is None:
            return self.kernel.select(req, kept, self.rng)
        for f in self.filters:
            t0 = time.perf_counter() if timer else 0.0
            kept = f.filter(req, kept)
            if timer:
                timer(f.type_name, time.perf_counter() - t0)
        totals = [0.0] * len(kept)
        per_scorer: list[tuple[str, list[float]]] = []
        for scorer, weight in self.scorers:
            t0 = time.perf_counter() if timer else 0.0
            values = scorer.score(req, kept)
            if timer:
                timer(scorer.type_name, time.perf_counter() - t0)
            if explain is not None:
                per_scorer.append((scorer.type_name, values))  # raw: shows a misbehaving scorer
            if len(values) != len(totals):
                raise ValueError(
                    f"scorer {scorer.type_name} returned {len(values)} scores for {len(totals)} replicas"
                )
            # Clamp to the [0, 1] contract here, once, rather than trusting every scorer. One
            # comprehension: this runs per scorer per request.
            totals = [
                t + weight * (0.0 if v < 0.0 else 1.0 if v > 1.0 else v)
                for t, v in zip(totals, values, strict=True)
            ]
        choice = kept[self.picker.pick(totals, kept, self.rng)]
        if explain is not None:
            self._explain(explain, req, candidates, kept, per_scorer, totals, choice)
        return choice

    def _sample(self, req: RequestInfo, candidates: Sequence[Replica]) -> list[Replica]:
        """Power-of-k: the replicas holding the longest parts of the prefix (at most k/2) plus a
        uniform sample of the rest, k in all. Scoring
        cost stays O(k) at any fleet size; affinity is never sampled away, and the random rest
        brings in the idle replicas that load balancing needs (Mitzenmacher's power of d choices).
        """
        k = self.max_candidates
        anyt = req.any_tier_blocks
        n = len(anyt)
        matched = [r for r in candidates if r.slot < n and anyt[r.slot] > 0]
        if len(matched) > k // 2:
            rnd = self.rng.random  # equal matches (a prefix every replica holds) break at random
            matched.sort(key=lambda r: (-anyt[r.slot], rnd()))
            matched = matched[: k // 2]
        chosen = {id(r) for r in matched}
        rest = [r for r in candidates if id(r) not in chosen]
        return matched + self.rng.sample(rest, min(len(rest), k - len(matched)))

    def _explain(
        self,
        explain: Explanation,
        req: RequestInfo,
        candidates: Sequence[Replica],
        kept: Sequence[Replica],
        per_scorer: list[tuple[str, list[float]]],
        totals: list[float],
        choice: Replica,
    ) -> None:
        explain.chosen = choice.id
        pos = {id(r): i for i, r in enumerate(kept)}
        for r in candidates:
            s = r.slot
            i = pos.get(id(r))
            row = ReplicaExplanation(
                replica=r.id,
                gpu_blocks=req.gpu_blocks[s] if s < len(req.gpu_blocks) else 0,
                any_tier_blocks=req.any_tier_blocks[s] if s < len(req.any_tier_blocks) else 0,
                filtered_out=i is None,
            )
            if i is not None:
                row.scores = {name: round(vals[i], 6) for name, vals in per_scorer}
                row.total = round(totals[i], 6)
            explain.replicas.append(row)
