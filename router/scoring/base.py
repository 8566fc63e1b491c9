"""Contracts of the routing pipeline (shaped after llm-d's scheduler plugins, made pure).

* A **Scorer** maps (request, candidates) to one number per candidate in [0, 1], 1 best, and
  returns all 1.0 when its input is the same for every candidate (neutral: it must not tip the
  balance when it has nothing to say). No I/O, no awaits, no clock, no globals.
* A **Filter** narrows the candidates (never to nothing: it returns its input instead).
* A **Picker** turns weighted totals into one choice, breaking ties at random with an injected rng.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import ClassVar, Protocol

from ..replicas.registry import Replica
from ..types import RequestInfo


class Scorer(Protocol):
    type_name: ClassVar[str]  # registry key == file name, e.g. "queue-depth"

    def score(self, req: RequestInfo, replicas: Sequence[Replica]) -> list[float]: ...


class Filter(Protocol):
    type_name: ClassVar[str]

    def filter(self, req: RequestInfo, replicas: Sequence[Replica]) -> Sequence[Replica]: ...


class Picker(Protocol):
    def pick(self, scores: Sequence[float], replicas: Sequence[Replica], rng: random.Random) -> int: ...


def min_max_inverted(values: Sequence[float]) -> list[float]:
    """Lower is better: (max - v) / (max - min); all 1.0 when every value is equal."""
    lo = min(values)
    hi = max(values)
    if hi - lo <= 1e-12:
        return [1.0] * len(values)
    span = hi - lo
    return [(hi - v) / span for v in values]
