"""The static source: a fixed list of replica URLs."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from router.discovery.base import (
    Changes,
    DiscoveryStats,
    Publish,
)
from router.types import ReplicaSpec

log = logging.getLogger("kvrouter.discovery")


class StaticSource:
    """A fixed list: published once, then idle until cancelled."""

    name = "static"

    def __init__(self, specs: Sequence[ReplicaSpec]) -> None:
        self.specs = list(specs)
        self.stats = DiscoveryStats()

    async def run(self, publish: Publish) -> None:
        Changes(publish, self.stats).offer(self.specs)
        await asyncio.Event().wait()
