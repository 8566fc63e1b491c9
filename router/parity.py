"""Parity check: did the engines reuse what the router predicted they would?

Every peer router's users report the same silent failure: the router's prompt keys never equal
the engine's (different tokenizer, chat template, block size, hash seed), overlap is always zero,
and "cache-aware" routing quietly degrades to load balancing with dashboards green. We compare,
per replica and over a sliding window:

* **predicted**: tokens the router expected the engine to reuse (matched GPU blocks at dispatch);
* **actual**: ``usage.prompt_tokens_details.cached_tokens`` when the engine returns it (vLLM
  needs ``--enable-prompt-tokens-details``), else the replica's ``vllm:prefix_cache_hits_total``
  deltas between scrapes.

Both are exported as counters, their window ratio as ``kvrouter_prefix_parity_ratio``, and a
warning is logged (at most once a minute per replica) when predictions are substantial while
actual reuse stays near zero. On a replica with KV events the prediction counts only blocks its
events confirmed: speculation (the router's own keys of the last requests) says nothing about
whether the keys are the engine's.

The second check, **confirmation**, catches keys that are never the engine's even when the engine
does reuse (speculation right by luck, byte mode): on a replica that publishes KV events, the share
of matched blocks its events confirmed (``kvrouter_prefix_confirmed_ratio``). Near zero over a
window with enough matches means the router's tokens are not the engine's (chat template, tokenizer,
block size, base-model name, data-parallel rank): a warning is logged, exported
(``kvrouter_prefix_unconfirmed_warning``) and shown in ``/ready``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import GaugeMetricFamily

from .metrics import RouterMetrics
from .replicas.engine_metrics import EngineMetrics
from .replicas.registry import Replica
from .routing import Ticket
from .types import RequestInfo

log = logging.getLogger("kvrouter.parity")

WINDOW_S = 60.0
MIN_PREDICTED = 4096  # tokens predicted in a window before we judge
ALARM_RATIO = 0.1  # actual < 10% of predicted -> warn
MIN_MATCHED_BLOCKS = 64  # matched blocks in a window before the confirmation check judges
CONFIRM_ALARM_RATIO = 0.05  # confirmed < 5% of matched on a replica with events -> warn


@dataclass(slots=True)
class _Window:
    started: float
    predicted: float = 0.0
    actual: float = 0.0
    last_ratio: float | None = None
    last_warning: float = 0.0
    usage_seen: bool = False  # engine returns cached_tokens: prefer it over metrics deltas
    last_hits: float | None = None
    matched: int = 0  # token-mode blocks matched at dispatch (speculative + confirmed)
    confirmed: int = 0  # of those, confirmed by KV events
    events: bool = False  # the replica published KV events during the window
    last_confirmed_ratio: float | None = None
    last_confirm_warning: float = 0.0


class ParityTracker:
    def __init__(self, metrics: RouterMetrics, clock: Callable[[], float] = time.monotonic) -> None:
        self.metrics = metrics
        self.clock = clock
        self._w: dict[str, _Window] = {}

    def _window(self, rid: str) -> _Window:
        w = self._w.get(rid)
        now = self.clock()
        if w is None:
            w = self._w[rid] = _Window(started=now)
        elif now - w.started >= WINDOW_S:
            self._judge(rid, w, now)
            w.started = now
            w.predicted = 0.0
            w.actual = 0.0
            w.matched = w.confirmed = 0
            w.events = False
        return w

    # RoutingObserver
    def on_decision(self, replica: Replica, seconds: float, req: RequestInfo) -> None:
        self.metrics.decision_seconds.observe(seconds)

    def on_finish(self, ticket: Ticket, ok: bool, cached_tokens: int | None) -> None:
        rid = ticket.replica.id
        w = self._window(rid)
        if ok:
            m = self.metrics
            m.child(m.prompt_tokens, rid).inc(ticket.prompt_tokens)
            if ticket.predicted_cached_tokens:
                m.child(m.predicted_cached, rid).inc(ticket.predicted_cached_tokens)
            events = ticket.replica.has_kv_events
            w.predicted += ticket.confirmed_tokens if events else ticket.predicted_cached_tokens
            w.events |= events
            w.matched += ticket.matched_blocks
            w.confirmed += ticket.confirmed_blocks
        if cached_tokens is not None:
            w.usage_seen = True
            w.actual += cached_tokens
            if cached_tokens:
                self.metrics.child(self.metrics.actual_cached, rid, "usage").inc(cached_tokens)

    def on_engine_metrics(self, rep: Replica, m: EngineMetrics) -> None:
        if m.prefix_hits is None:
            return
        w = self._window(rep.id)
        if w.last_hits is not None and m.prefix_hits >= w.last_hits:
            delta = m.prefix_hits - w.last_hits
            if delta:
                self.metrics.actual_cached.labels(rep.id, "engine_metrics").inc(delta)
            if not w.usage_seen:
                w.actual += delta
        w.last_hits = m.prefix_hits  # a counter reset (restart) just restarts the deltas

    def forget(self, rid: str) -> None:
        self._w.pop(rid, None)

    def _judge(self, rid: str, w: _Window, now: float) -> None:
        self._judge_confirmation(rid, w, now)
        if w.predicted < MIN_PREDICTED:
            return
        w.last_ratio = w.actual / w.predicted
        if w.last_ratio < ALARM_RATIO and now - w.last_warning >= WINDOW_S:
            w.last_warning = now
            log.warning(
                "replica %s: router predicted %d cached prompt tokens in the last %.0fs but the engine "
                "reused %d (%.1f%%). Prefix keys probably do not match the engine's: check --tokenizer "
                "(chat template), block size (vllm:cache_config_info) and that KV events arrive.",
                rid,
                w.predicted,
                WINDOW_S,
                w.actual,
                100 * w.last_ratio,
            )

    def _judge_confirmation(self, rid: str, w: _Window, now: float) -> None:
        if not w.events or w.matched < MIN_MATCHED_BLOCKS:
            return  # no events: nothing can confirm; too few matches: no evidence either way
        w.last_confirmed_ratio = w.confirmed / w.matched
        if w.last_confirmed_ratio < CONFIRM_ALARM_RATIO and now - w.last_confirm_warning >= WINDOW_S:
            w.last_confirm_warning = now
            log.warning(
                "replica %s publishes KV events but confirmed %d of the %d prefix blocks the router "
                "matched in the last %.0fs (%.1f%%): the router's keys are not the engine's. Check "
                "--tokenizer and --chat-template (the engine's), the block size, the model name the "
                "engine serves, and data-parallel ranks (docs/exact-keys.md).",
                rid,
                w.confirmed,
                w.matched,
                WINDOW_S,
                100 * w.last_confirmed_ratio,
            )

    def confirmed_ratio(self, rid: str) -> float | None:
        """Confirmed share of matched blocks: the current window once it has enough matches, else
        the last judged one. None for replicas without KV events."""
        w = self._w.get(rid)
        if w is None:
            return None
        if w.events and w.matched >= MIN_MATCHED_BLOCKS:
            return w.confirmed / w.matched
        return w.last_confirmed_ratio

    def warnings(self) -> dict[str, str]:
        """Replicas whose KV events confirm almost nothing the router predicts (/ready detail)."""
        out: dict[str, str] = {}
        for rid in self._w:
            r = self.confirmed_ratio(rid)
            if r is not None and r < CONFIRM_ALARM_RATIO:
                out[rid] = (
                    f"KV events confirm {100 * r:.1f}% of matched prefix blocks: keys are not the engine's"
                )
        return out

    def ratio(self, rid: str) -> float | None:
        w = self._w.get(rid)
        if w is None:
            return None
        if w.predicted >= MIN_PREDICTED:
            return w.actual / w.predicted
        return w.last_ratio

    def collect(self) -> Iterator[Any]:
        g = GaugeMetricFamily(
            "kvrouter_prefix_parity_ratio",
            "Actual / predicted cached prompt tokens over the current (or last full) window",
            labels=["replica"],
        )
        c = GaugeMetricFamily(
            "kvrouter_prefix_confirmed_ratio",
            "Share of matched prefix blocks that the replica's KV events confirmed (replicas with events)",
            labels=["replica"],
        )
        warn = GaugeMetricFamily(
            "kvrouter_prefix_unconfirmed_warning",
            "1 while a replica with KV events confirms almost none of the blocks the router matches",
            labels=["replica"],
        )
        for rid in self._w:
            r = self.ratio(rid)
            if r is not None:
                g.add_metric([rid], r)
            cr = self.confirmed_ratio(rid)
            if cr is not None:
                c.add_metric([rid], cr)
                warn.add_metric([rid], 1.0 if cr < CONFIRM_ALARM_RATIO else 0.0)
        yield g
        yield c
        yield warn
