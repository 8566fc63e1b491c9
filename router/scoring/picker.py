"""max-score picker with a random tie-break (llm-d picker/maxscore), rng injected."""

from __future__ import annotations

import random
from collections.abc import Sequence

from ..replicas.registry import Replica

TIE_EPSILON = 1e-9


class MaxScorePicker:
    def pick(self, scores: Sequence[float], replicas: Sequence[Replica], rng: random.Random) -> int:
        best = max(scores)
        ties = [i for i, s in enumerate(scores) if s >= best - TIE_EPSILON]
        if not ties:  # a NaN total (an input no scorer expected): any replica, never an error
            return rng.randrange(len(scores))
        return ties[0] if len(ties) == 1 else rng.choice(ties)
