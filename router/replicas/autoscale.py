"""Autoscaling signals, per model, from what the router already tracks (docs/autoscaling.md).

Exported on ``/metrics`` (gauges, label ``model``; replicas that have not reported models count
under ``model=""``):

* ``kvrouter_autoscale_replicas``: routable replicas serving the model.
* ``kvrouter_autoscale_waiting_requests``: engine-reported waiting requests, summed.
* ``kvrouter_autoscale_prefill_backlog_tokens``: uncached prompt tokens dispatched whose first
  token has not come back (router-tracked, exact for this router, no scrape lag).
* ``kvrouter_autoscale_queue_wait_seconds``: backlog tokens / the fleet's measured prefill rate:
  how long a new request waits for the prefill already queued ahead of it.
* ``kvrouter_autoscale_kv_pressure``: mean KV-cache usage (0-1) of the replicas.
* ``kvrouter_autoscale_saturation``: demand over capacity, by the tightest resource::

      saturation = max(waiting_per_replica / 5, kv_pressure / 0.8, queue_wait_seconds / 1.0)

  1.0 means the fleet is exactly at capacity on one of: 5 queued requests per replica and 80% KV
  (llm-d's saturation detector thresholds), or one second of prefill queued (a TTFT SLO breaks
  soon after). Above 1: add replicas (``desired = ceil(current * saturation)`` is the HPA rule);
  well under 1 for a while: remove one, draining it through the router first.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from router.replicas.registry import ReplicaRegistry

QUEUE_PER_REPLICA = 5.0
KV_TARGET = 0.8
QUEUE_WAIT_TARGET_S = 1.0
DEFAULT_PREFILL_TPS = 20_000.0  # until a replica measured its rate (scoring/ttft.py's default)


@dataclass(slots=True)
class ModelLoad:
    model: str
    replicas: int
    waiting: float
    backlog_tokens: int
    queue_wait_s: float
    kv_pressure: float

    @property
    def saturation(self) -> float:
        if self.replicas == 0:
            return 0.0 if self.backlog_tokens == 0 and self.waiting == 0 else float("inf")
        return max(
            self.waiting / self.replicas / QUEUE_PER_REPLICA,
            self.kv_pressure / KV_TARGET,
            self.queue_wait_s / QUEUE_WAIT_TARGET_S,
        )


def model_loads(registry: ReplicaRegistry) -> list[ModelLoad]:
    groups: dict[str, list[Any]] = {}
    for r in registry:
        for m in sorted(r.models) or [""]:
            groups.setdefault(m, []).append(r)
    out = []
    for model, reps in sorted(groups.items()):
        live = [r for r in reps if r.routable]
        backlog = sum(r.pending_prefill_tokens for r in live)
        rate = sum(r.prefill_tps or DEFAULT_PREFILL_TPS for r in live)
        kv = [r.kv_usage for r in live if r.kv_usage is not None]
        out.append(
            ModelLoad(
                model=model,
                replicas=len(live),
                waiting=sum(r.engine_waiting or 0.0 for r in live),
                backlog_tokens=backlog,
                queue_wait_s=backlog / rate if rate > 0 else 0.0,
                kv_pressure=sum(kv) / len(kv) if kv else 0.0,
            )
        )
    return out


class AutoscaleCollector(Collector):
    def __init__(self, registry: ReplicaRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Any]:
        fams = {
            "replicas": GaugeMetricFamily(
                "kvrouter_autoscale_replicas", "Routable replicas", labels=["model"]
            ),
            "waiting": GaugeMetricFamily(
                "kvrouter_autoscale_waiting_requests", "Engine-reported waiting requests", labels=["model"]
            ),
            "backlog": GaugeMetricFamily(
                "kvrouter_autoscale_prefill_backlog_tokens",
                "Uncached prompt tokens awaiting prefill",
                labels=["model"],
            ),
            "wait": GaugeMetricFamily(
                "kvrouter_autoscale_queue_wait_seconds",
                "Queued prefill / measured prefill rate",
                labels=["model"],
            ),
            "kv": GaugeMetricFamily(
                "kvrouter_autoscale_kv_pressure", "Mean KV-cache usage (0-1)", labels=["model"]
            ),
            "sat": GaugeMetricFamily(
                "kvrouter_autoscale_saturation",
                "Demand over capacity (1 = at capacity; docs/autoscaling.md)",
                labels=["model"],
            ),
        }
        for m in model_loads(self.registry):
            fams["replicas"].add_metric([m.model], float(m.replicas))
            fams["waiting"].add_metric([m.model], m.waiting)
            fams["backlog"].add_metric([m.model], float(m.backlog_tokens))
            fams["wait"].add_metric([m.model], m.queue_wait_s)
            fams["kv"].add_metric([m.model], m.kv_pressure)
            fams["sat"].add_metric([m.model], m.saturation)
        yield from fams.values()
