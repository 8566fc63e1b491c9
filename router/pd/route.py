"""The PD request path: choose the decode replica, decide per request, run the NIXL handoff.

Active when the fleet has at least one ``prefill`` replica (router/pd/roles.py), or, with
``pd.both_prefill`` (every ``both`` replica runs vLLM's NixlConnector with ``kv_role: kv_both``),
at least two ``both`` replicas: then a ``both`` replica is a remote prefill target for another one's
decode as well as a decode target that prefills locally. Per request:

1. Decode replica first, among ``decode`` and ``both`` replicas: ``decision.pick_decode`` (KV
   headroom, running batch, its cached prefix of this prompt, through the two TTFT estimates).
2. Best prefill replica: lowest (queued prefill + its uncached tokens) / its prefill rate,
   cache-aware through the same index; only one whose vLLM ``/version`` matches D's (NIXL's
   handshake rejects different builds; unknown versions are not held against a pair).
3. ``decision.decide``: split or local, counted once per request in
   ``kvrouter_pd_decisions_total{outcome}`` together with the handoff's fate:
   ``split`` (leg 2 sent with P's params), ``local_<reason>``, or ``fallback_<reason>`` when a
   split could not hand off (prefill error/timeout on every tried P, no or bad params): the
   request then runs decode-only on D with the original body, never a hang, never unseen.
4. Leg 2 leaves as soon as leg 1's answer is parsed: P pins the blocks only for its lease.

A client that disconnects cancels the handler: leg 1's connection is closed (P aborts and frees
the blocks) and leg 2 is never sent; during leg 2 the forwarder closes D's connection.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

from router.config import PDSettings
from router.http.proxy import Forwarder, ResponseSink, response_header_pairs
from router.http.upstream import UpstreamBroken, UpstreamPool
from router.pd.decision import (
    LOCAL_NO_PREFILL,
    SPLIT,
    Decision,
    DecisionParams,
    DecodeView,
    LinkModel,
    PrefillView,
    decide,
    pick_decode,
    prefill_cost,
)
from router.pd.handoff import (
    HandoffError,
    decode_body,
    decode_params,
    parse_body,
    prefill_body,
    returned_params,
    with_request_id,
)
from router.replicas.registry import Replica, ReplicaRegistry
from router.routing import Router
from router.scoring.churn import CHURN_TAU_S
from router.types import RequestInfo

log = logging.getLogger("kvrouter.pd")

LOCAL_VERSION = "local_version_mismatch"
MAX_PREFILL_ANSWER = 16 << 20  # a one-token answer is small; a runaway body is cut here
RETRY_STATUS = frozenset((408, 429, 500, 502, 503, 504))  # another P, then decode-only
PREFILL_ATTEMPTS = 2  # the chosen prefill replica, then one other before decode-only


@dataclass(slots=True)
class Plan:
    decode: Replica
    prefill: Replica | None
    decision: Decision

    def as_dict(self) -> dict[str, Any]:
        out = self.decision.as_dict()
        out["decode"] = self.decode.id
        out["prefill"] = self.prefill.id if self.prefill is not None else None
        return out


class PDMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.decisions = Counter(
            "kvrouter_pd_decisions",
            "PD requests by outcome: split, local_<reason>, fallback_<reason>",
            ["outcome"],
            registry=registry,
        )
        self.prefill_seconds = Histogram(
            "kvrouter_pd_prefill_leg_seconds",
            "Leg 1 (remote prefill) round trip through the router",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=registry,
        )
        self.version_mismatch = Counter(
            "kvrouter_pd_version_mismatch",
            "Prefill/decode pairs refused because their vLLM /version differ",
            registry=registry,
        )


class PDRouter:
    def __init__(
        self,
        settings: PDSettings,
        router: Router,
        registry: ReplicaRegistry,
        forwarder: Forwarder,
        pool: UpstreamPool,
        metrics_registry: CollectorRegistry,
        upstream_key: str | None = None,
    ) -> None:
        self.settings = settings
        self.router = router
        self.registry = registry
        self.forwarder = forwarder
        self.pool = pool
        self.metrics = PDMetrics(metrics_registry)
        self.upstream_key = upstream_key
        self.params = DecisionParams(
            rule=settings.rule,
            step_s=0.0005,
            handoff_overhead_s=settings.handoff_overhead_s,
            stall_weight=settings.stall_weight,
            min_split_tokens=settings.min_split_tokens,
            threshold_tokens=settings.threshold_tokens,
            threshold_max_cached_ratio=settings.threshold_max_cached_ratio,
            min_gain_ratio=settings.min_gain_ratio,
            leg1_drift=settings.leg1_drift,
            occupancy_weight=settings.occupancy_weight,
            rate_z=settings.rate_z,
        )
        self.link = LinkModel(
            settings.link_bandwidth_bytes_s, settings.link_latency_s, settings.kv_bytes_per_token
        )
        self.versions: dict[str, str | None] = {}  # replica id -> GET /version body (None: unknown)
        self._warned: set[tuple[str, str]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._prefill_ids: set[str] = {r.id for r in registry if self._lends_prefill(r)}
        self.recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=64)
        registry.on_change(self._on_replica)

    # ---- replicas' versions ---------------------------------------------------------------

    def _on_replica(self, event: str, rep: Replica) -> None:
        if event == "removed":
            self.versions.pop(rep.id, None)
            self._prefill_ids.discard(rep.id)
            return
        if event == "added" and self._lends_prefill(rep):
            self._prefill_ids.add(rep.id)
        # at start-up the engine may still be loading: ask again when it turns healthy
        refetch = event == "health" and rep.healthy and self.versions.get(rep.id) is None
        if (event == "added" or refetch) and self.settings.check_version:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            task = loop.create_task(self.fetch_version(rep), name=f"pd-version:{rep.id}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def fetch_version(self, rep: Replica) -> None:
        """GET /version once (vLLM: {"version": "0.32.0"}); failures leave it unknown."""
        headers = (
            b"Authorization: Bearer " + self.upstream_key.encode() + b"\r\n" if self.upstream_key else b""
        )
        try:
            async with asyncio.timeout(5.0):
                up = await self.pool.request(rep.url, "GET", b"/version", headers, b"")
                try:
                    body = await _read_all(up.read, 65536)
                finally:
                    up.close()
        except (TimeoutError, OSError, UpstreamBroken, ValueError) as exc:
            log.info("pd: %s GET /version failed (%s): version unknown", rep.id, type(exc).__name__)
            return
        if up.status == 200:
            parsed = parse_body(body)
            ver = parsed.get("version") if parsed else None
            self.versions[rep.id] = str(ver) if ver is not None else body.decode("utf-8", "replace")

    def compatible(self, p: Replica, d: Replica) -> bool:
        if not self.settings.check_version:
            return True
        vp = self.versions.get(p.id)
        vd = self.versions.get(d.id)
        if vp is None or vd is None or vp == vd:
            return True
        if (p.id, d.id) not in self._warned:
            self._warned.add((p.id, d.id))
            log.error(
                "pd: REFUSING to pair prefill %s (vLLM %s) with decode %s (vLLM %s): NixlConnector's "
                "handshake rejects different builds; requests run decode-only until they match",
                p.id,
                vp,
                d.id,
                vd,
            )
        self.metrics.version_mismatch.inc()
        return False

    # ---- planning (sync) ------------------------------------------------------------------

    def _lends_prefill(self, r: Replica) -> bool:
        return r.spec.role == "prefill" or (self.settings.both_prefill and r.spec.role == "both")

    def active(self, model: str | None) -> bool:
        """PD applies when this model has prefill replicas configured (healthy or not), or two
        ``both`` replicas with ``pd.both_prefill`` (one prefills, the other decodes)."""
        if not self._prefill_ids:  # aggregated fleet: one set lookup per request
            return False
        lenders = [
            r
            for r in self.registry
            if self._lends_prefill(r) and (model is None or not r.models or model in r.models)
        ]
        return any(r.spec.role == "prefill" for r in lenders) or len(lenders) >= 2

    def prefill_candidates(self, model: str | None) -> list[Replica]:
        """Routable replicas that take leg 1: ``prefill``, and ``both`` with ``pd.both_prefill``."""
        out = self.registry.prefill_candidates(model)
        if self.settings.both_prefill:
            out += [r for r in self.registry.candidates(model) if r.spec.role == "both"]
        return out

    def _cached(self, req: RequestInfo, rep: Replica) -> int:
        s = rep.slot
        if s >= len(req.gpu_blocks):
            return 0
        return min(req.prompt_tokens, req.gpu_blocks[s] * req.block_size)

    def _decode_view(self, req: RequestInfo, r: Replica) -> DecodeView:
        running = r.engine_running
        busy = float(r.in_flight) if running is None or running < r.in_flight else running
        return DecodeView(
            cached_tokens=self._cached(req, r),
            running=busy,
            pending_prefill_tokens=r.pending_prefill_tokens,
            kv_free=None if r.kv_usage is None else 1.0 - r.kv_usage,
            prefill_tps=_compute_rate(r),
            rate_log=r.prefill_compute_log_tps,
            rate_log_se2=r.prefill_compute_log_se2,
        )

    def _prefill_view(self, req: RequestInfo, r: Replica) -> PrefillView:
        running = 0.0
        both = r.spec.role == "both"
        if both:  # its own decode batch shares the steps leg 1 would take
            running = max(float(r.in_flight), r.engine_running or 0.0)
        return PrefillView(
            self._cached(req, r),
            r.pending_prefill_tokens,
            _compute_rate(r),
            running,
            arrival_rate=r.arrival_rate(req.now or self.router.clock(), CHURN_TAU_S),
            rate_log=r.prefill_compute_log_tps,
            rate_log_se2=r.prefill_compute_log_se2,
            decodes=both,
        )

    def _ranked_prefills(self, req: RequestInfo, prefills: Sequence[Replica]) -> list[Replica]:
        """Cheapest first by ``decision.prefill_cost`` (queue, compute, own decode batch)."""
        costs = [
            (prefill_cost(req.prompt_tokens, self._prefill_view(req, p), self.params), p) for p in prefills
        ]
        return [p for _, p in sorted(costs, key=lambda c: c[0])]

    def _best_prefill(
        self, req: RequestInfo, prefills: Sequence[Replica], exclude: Replica | None = None
    ) -> Replica | None:
        for p in self._ranked_prefills(req, prefills):
            if p is not exclude:
                return p
        return None

    def plan(self, req: RequestInfo, n: int = 1, exclude_prefill: Sequence[str] = ()) -> Plan:
        """Decode replica, prefill replica and the decision (raises NoReplicaAvailable etc.)."""
        decodes = self.router.candidates(req.model)
        if req.block_hashes and not req.gpu_blocks:
            req.gpu_blocks, req.any_tier_blocks = self.router.index.match(req.block_hashes)
        prefills = [p for p in self.prefill_candidates(req.model) if p.id not in exclude_prefill]
        ranked = self._ranked_prefills(req, prefills)
        p = ranked[0] if ranked else None
        pv = self._prefill_view(req, p) if p is not None else None
        views = [self._decode_view(req, d) for d in decodes]
        # A `both` decode candidate cannot prefill remotely for itself: its split option is the
        # next cheapest prefill replica.
        per: list[PrefillView | None] | None = None
        if p is not None and p.spec.role == "both":
            second = ranked[1] if len(ranked) > 1 else None
            sv = self._prefill_view(req, second) if second is not None else None
            per = [sv if d is p else pv for d in decodes]
        choice = pick_decode(req.prompt_tokens, views, pv, self.link, self.params, n, prefill_for=per)
        d = decodes[choice.index]
        dec = choice.decision
        if p is d:
            p = ranked[1] if len(ranked) > 1 else None
        if p is not None and not self.compatible(p, d):
            p = self._best_prefill(req, [q for q in prefills if self.compatible(q, d)], exclude=d)
            if p is None:
                loc = decide(req.prompt_tokens, views[choice.index], None, self.link, self.params, n)
                dec = Decision(
                    False,
                    LOCAL_VERSION,
                    "no prefill replica runs the decode replica's vLLM build",
                    loc.local_ttft_s,
                    None,
                    loc.stall_s,
                    loc.uncached_decode,
                    0,
                    0.0,
                )
                return Plan(d, None, dec)
            dec = decide(
                req.prompt_tokens, views[choice.index], self._prefill_view(req, p), self.link, self.params, n
            )
        return Plan(d, p, dec)

    def explain(self, req: RequestInfo, body: bytes) -> dict[str, Any]:
        obj = parse_body(body) or {}
        out = self.plan(req, _n_of(obj)).as_dict()
        out["recent"] = list(self.recent)[-8:]
        return out

    # ---- the request ----------------------------------------------------------------------

    def _count(self, outcome: str, plan: Plan, rid: str | None = None) -> None:
        self.metrics.decisions.labels(outcome).inc()
        row = plan.as_dict()
        row["final"] = outcome
        if rid is not None:
            row["request_id"] = rid
        self.recent.append(row)

    async def handle(
        self, sink: ResponseSink, target: bytes, headers: bytes, body: bytes, req: RequestInfo
    ) -> None:
        obj = parse_body(body)
        if obj is None:  # the engine answers the 400, as without PD
            await self.forwarder.forward(sink, "POST", target, headers, body, req)
            return
        plan = self.plan(req, _n_of(obj))
        if not plan.decision.split or plan.prefill is None:
            self._count(plan.decision.outcome if not plan.decision.split else LOCAL_NO_PREFILL, plan)
            await self.forwarder.forward(sink, "POST", target, headers, body, req, pinned=plan.decode)
            return
        headers, rid = with_request_id(headers)
        leg1 = prefill_body(obj)
        tried: list[str] = []
        prefill: Replica | None = plan.prefill
        reason = "prefill_error"
        while prefill is not None and len(tried) < PREFILL_ATTEMPTS:
            tried.append(prefill.id)
            try:
                status, resp_headers, answer = await self._leg1(prefill, target, headers, leg1, req)
            except _LegFailed as fail:
                reason = fail.reason
                if fail.reason == "prefill_error":  # connect/reset: the passive health's business
                    self.forwarder.hooks.on_failure(prefill, fail.reason)
                log.warning("pd %s: prefill leg on %s failed (%s)", rid, prefill.id, fail.reason)
                prefill = self._best_prefill(
                    req,
                    [
                        p
                        for p in self.prefill_candidates(req.model)
                        if p.id not in tried and self.compatible(p, plan.decode)
                    ],
                    exclude=plan.decode,
                )
                continue
            if status != 200:
                # The request's own fault (validation): D would refuse it too. Relay P's answer.
                self._count("rejected_prefill_4xx", plan, rid)
                await sink.start(status, b"", response_header_pairs(resp_headers, prefill), len(answer))
                await sink.write(answer)
                await sink.finish()
                return
            try:
                params = decode_params(returned_params(answer), prefill.url)
            except HandoffError as err:
                reason = err.reason
                log.warning("pd %s: %s answered without a usable handoff (%s)", rid, prefill.id, err)
                break
            # Leg 2 now: P holds the blocks only for its lease.
            self._count(SPLIT, plan, rid)
            plan.prefill = prefill
            req.remote_prefill = True  # D queues no prefill for it and learns no prefill rate from it
            await self.forwarder.forward(
                sink, "POST", target, headers, decode_body(obj, params), req, pinned=plan.decode
            )
            return
        self._count(f"fallback_{reason}", plan, rid)
        await self.forwarder.forward(sink, "POST", target, headers, body, req, pinned=plan.decode)

    async def _leg1(
        self, rep: Replica, target: bytes, headers: bytes, body: bytes, req: RequestInfo
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        ticket = self.router.dispatch(req, rep)
        t0 = time.perf_counter()
        ok = False
        try:
            async with asyncio.timeout(self.settings.prefill_timeout_s):
                up = await self.pool.request(rep.url, "POST", target, headers, body)
                try:
                    answer = await _read_all(up.read, MAX_PREFILL_ANSWER)
                finally:
                    up.close()  # on cancellation (client gone) this closes it: P aborts
            ok = up.status == 200
            if up.status in RETRY_STATUS:
                raise _LegFailed(f"prefill_status_{up.status}")
            return up.status, up.headers, answer
        except TimeoutError:
            raise _LegFailed("prefill_timeout") from None
        except (UpstreamBroken, OSError):
            raise _LegFailed("prefill_error") from None
        except ValueError:
            raise _LegFailed("bad_answer") from None
        finally:
            dt = time.perf_counter() - t0
            self.metrics.prefill_seconds.observe(dt)
            if ok:
                self.router.first_token(ticket, dt)
            self.router.finish(ticket, ok=ok)

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()


class _LegFailed(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _compute_rate(r: Replica) -> float:
    """The prefill rate the estimates divide by: measured without a queue ahead when there is one
    (the estimates add the queue themselves), else the TTFT-based rate, else unmeasured (0)."""
    return r.prefill_compute_tps or r.prefill_tps


def _n_of(obj: dict[str, Any]) -> int:
    n = obj.get("n")
    best_of = obj.get("best_of")
    vals = [v for v in (n, best_of) if isinstance(v, int) and not isinstance(v, bool)]
    return max(vals) if vals else 1


async def _read_all(read: Any, limit: int) -> bytes:
    parts: list[bytes] = []
    size = 0
    while True:
        chunk: bytes = await read()
        if not chunk:
            return b"".join(parts)
        size += len(chunk)
        if size > limit:
            raise ValueError("answer too large")
        parts.append(chunk)
