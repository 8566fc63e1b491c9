"""Offline prefill/decode disaggregation: one trace, one GPU count, aggregated vs split, in virtual time.

A PD run plays the trace against two pools of ``EngineModel`` replicas, each driven like the
aggregated simulator's fleet (``traces.simulate._Fleet``: its own ``Router`` with the
``cache_aware`` policy, its own prefix index fed by its engines' KV events, scrapes), on one
virtual clock. Per request, at its arrival:

1. The decode replica D is chosen by the decode pool's router (KV-aware: cached prefix, running
   batch, KV headroom), and the best prefill replica P by the prefill pool's (cache-aware).
2. The split rule decides (``router.pd.decision.decide``, the function the live router calls):
   ``always``, ``never``, ``threshold[:N]`` (llm-d's fixed uncached-token rule) or ``auto``
   (estimated TTFT both ways, from the routers' own measured prefill rates and queues, and the
   profile's KV link).
3. Local: the request runs on D as in an aggregated fleet. Split: leg 1 runs on P as a 1-token
   request that pins its blocks (NIXL ``do_remote_decode``); when it finishes, plus the router
   hop (``handoff_s``), leg 2 arrives on D, which loads the tokens it lacks over the KV link
   (``EngineProfile.kv_link``: latency + bytes / bandwidth, not slowing D's steps, as NIXL's
   async read) and then decodes; P's blocks are unpinned then (the read notification).

The client's TTFT is D's first token minus the arrival (leg 1's token is discarded, as in vLLM);
TPOT comes from D. Approximation: a pool learns of leg 1's finish when it is next advanced (at the
next arrival or scrape tick), and leg 2 is then queued at its true time ``tf + handoff_s``; an
engine already advanced past that time schedules it at its next step, so at very sparse arrivals
a handoff can start up to one scrape interval (0.25 s) late. The comparison tables in
docs/disaggregation.md were run at arrival rates where that gap is a few milliseconds.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from typing import Any

import msgspec

from engines.sim.model.profiles import get_profile
from engines.sim.model.structs import SimRequest
from router.pd.decision import DecisionParams, DecodeView, LinkModel, PrefillView, decide, prefill_cost
from router.replicas.registry import Replica
from router.scoring.churn import CHURN_TAU_S
from router.types import BlockHash, RequestInfo

from .model import Trace, TraceRequest
from .records import SLO, RequestRecord, summarize
from .simulate import (
    _FINISH,
    MODEL,
    PolicyRun,
    SimConfig,
    VirtualClock,
    _Fleet,
    policy_factory,
    select_requests,
)

PD_RULES = ("always", "auto", "threshold", "never")
RATES = ("compute", "ttft")
SUBSTEP_S = 0.005  # while a leg 1 runs on a replica that may also receive leg 2s: handoff resolution


class PDConfig(msgspec.Struct, frozen=True, kw_only=True):
    prefill_replicas: int
    decode_replicas: int
    both_replicas: int = 0  # NIXL kv_both: prefill for others (leg 1) and serve/decode their own
    rule: str = "auto"  # always | auto | threshold | never
    threshold_tokens: int = 2048  # the threshold rule's N (llm-d nonCachedTokens)
    handoff_s: float = 0.001  # leg 1's answer through the router to leg 2's arrival on D
    policy: str = "cache_aware"  # the routing policy that picks D
    # Which measured rate the decision divides by: "compute" (Replica.prefill_compute_tps, from
    # requests with no queue ahead; the live router's) or "ttft" (prefill_tps, queue included).
    rate: str = "compute"

    def __post_init__(self) -> None:
        p, d, b = self.prefill_replicas, self.decode_replicas, self.both_replicas
        if min(p, d, b) < 0 or d + b < 1 or p + b < 1:
            raise ValueError(
                f"invalid PD fleet: {p}P + {d}D + {b}B (needs a decode-capable and a prefill-capable replica)"
            )
        if self.rule not in PD_RULES:
            raise ValueError(f"invalid pd rule {self.rule!r}: one of {', '.join(PD_RULES)} (threshold:N)")
        if self.rate not in RATES:
            raise ValueError(f"invalid pd rate {self.rate!r}: one of {', '.join(RATES)}")

    @property
    def replicas(self) -> int:
        return self.prefill_replicas + self.decode_replicas + self.both_replicas

    @property
    def roles(self) -> list[str]:
        p, d, b = self.prefill_replicas, self.decode_replicas, self.both_replicas
        return ["prefill"] * p + ["decode"] * d + ["both"] * b

    @property
    def fleet(self) -> str:
        """``2P+6D``, ``8B``, ``2P+6B``: pool sizes, B for ``both`` (kv_both) replicas."""
        parts = [(self.prefill_replicas, "P"), (self.decode_replicas, "D"), (self.both_replicas, "B")]
        return "+".join(f"{n}{k}" for n, k in parts if n)

    @property
    def name(self) -> str:
        rule = f"threshold:{self.threshold_tokens}" if self.rule == "threshold" else self.rule
        suffix = "" if self.rate == "compute" else f" rate:{self.rate}"
        return f"{self.fleet} {rule}{suffix}"


def parse_rule(text: str) -> tuple[str, int | None]:
    """``always`` / ``auto`` / ``never`` / ``threshold`` / ``threshold:N``."""
    rule, _, n = text.partition(":")
    if rule not in PD_RULES or (n and rule != "threshold"):
        raise ValueError(f"invalid --pd {text!r}: always, auto, never, threshold or threshold:N")
    try:
        return rule, (int(n) if n else None)
    except ValueError:
        raise ValueError(f"invalid --pd {text!r}: N must be an integer") from None


class _Leg2(msgspec.Struct):
    decode: int
    request: SimRequest
    arrival: float  # the client's send time


class _PDFleet(_Fleet):
    """One fleet with roles; leg 1's finishes are collected as handoffs."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.leg2: dict[str, _Leg2] = {}  # leg 1's request id -> leg 2
        self.leg1_on: dict[int, int] = {}  # replica index -> leg 1s in flight there
        self.handoffs: list[tuple[float, str, int]] = []

    def _deliver(self, ts: float, kind: int, i: int, payload: Any) -> None:
        super()._deliver(ts, kind, i, payload)
        if kind == _FINISH and payload.request_id in self.leg2:
            self.handoffs.append((ts, payload.request_id, i))
            left = self.leg1_on[i] - 1
            if left:
                self.leg1_on[i] = left
            else:
                del self.leg1_on[i]


def _leg1_id(rid: str) -> str:
    return rid + "#prefill"


class _PDRun:
    def __init__(self, trace: Trace, cfg: SimConfig, pd: PDConfig) -> None:
        self.cfg = msgspec.structs.replace(cfg, replicas=pd.replicas)
        self.pd = pd
        self.clock = VirtualClock()
        factory = policy_factory(pd.policy, cfg)
        self.f = _PDFleet(trace, self.cfg, factory, random.Random(cfg.seed), clock=self.clock, roles=pd.roles)
        self.roles = pd.roles
        # Replicas a leg 2 may land on while they run a leg 1: their advances are sub-stepped.
        self.both = {i for i, r in enumerate(self.roles) if r == "both"}
        prof = get_profile(cfg.profile)
        link = prof.kv_link
        self.link = LinkModel(
            bandwidth_bytes_s=link.gbytes_per_s * 1e9 / cfg.time_scale,
            latency_s=link.latency_ms / 1000 / cfg.time_scale,
            kv_bytes_per_token=link.bytes_per_token,
        )
        self.params = DecisionParams(rule=pd.rule, threshold_tokens=pd.threshold_tokens)  # type: ignore[arg-type]
        self.split_at: dict[str, float] = {}  # request id -> leg 2's arrival on D
        self.outcomes: dict[str, int] = {}
        self.bs = trace.block_tokens
        self.now = 0.0

    # ---- time -----------------------------------------------------------------------------

    def advance(self, t: float) -> None:
        """The fleet to ``t``; every handoff that finished by then goes to its decode replica at
        its own time. While a ``both`` replica runs a leg 1, time moves in SUBSTEP_S slices so a
        leg 2 bound for a replica that is itself being advanced starts at most that late."""
        f = self.f
        while self.now < t:
            sub = t
            if f.leg1_on and not self.both.isdisjoint(f.leg1_on):
                sub = min(t, self.now + SUBSTEP_S)
            for i in list(f.leg1_on):
                if f.engines[i].now < sub:
                    f.advance(i, sub)
            f.deliver_until(sub)
            self._hand_over()
            f.advance_all(sub)
            self._hand_over()
            self.now = sub

    def _hand_over(self) -> None:
        f = self.f
        hand = sorted(f.handoffs)
        f.handoffs.clear()
        for tf, lid, pi in hand:
            leg = f.leg2.pop(lid)
            at = tf + self.pd.handoff_s
            di = leg.decode
            if f.engines[di].now < at:
                f.advance(di, at)
            f.deliver_until(at)
            saved = self.clock.t
            self.clock.t = max(saved, at)
            rid = leg.request.request_id
            self.split_at[rid] = at
            try:
                f.engines[di].add_request(leg.request, now=at)
            except ValueError as exc:
                f.records[rid].error = str(exc)
                f.router.finish(f.tickets.pop(rid), False, None)
            else:
                f.busy.add(di)
            f.engines[pi].release_kv(lid)
            self.clock.t = max(saved, self.clock.t)

    # ---- one request ----------------------------------------------------------------------

    def _rate(self, rep: Replica) -> float:
        if self.pd.rate == "compute":
            return rep.prefill_compute_tps or rep.prefill_tps
        return rep.prefill_tps

    def _running(self, rep: Replica) -> float:
        return max(float(rep.in_flight), rep.engine_running or 0.0)

    def _best_prefill(
        self, n: int, info: RequestInfo, exclude: Replica
    ) -> tuple[Replica | None, PrefillView | None]:
        """The live router's choice (router/pd/route.py): lowest ``decision.prefill_cost``."""
        f = self.f
        best: tuple[float, Replica, PrefillView] | None = None
        for i, rep in enumerate(f.replicas):
            role = self.roles[i]
            if role == "decode" or rep is exclude:
                continue
            view = PrefillView(
                cached_tokens=f.router.predicted_cached_tokens(info, rep),
                pending_prefill_tokens=rep.pending_prefill_tokens,
                prefill_tps=self._rate(rep),
                running=self._running(rep) if role == "both" else 0.0,
                arrival_rate=rep.arrival_rate(self.clock.t, CHURN_TAU_S),
                rate_log=rep.prefill_compute_log_tps,
                rate_log_se2=rep.prefill_compute_log_se2,
                decodes=role == "both",
            )
            cost = prefill_cost(n, view, self.params)
            if best is None or cost < best[0]:
                best = (cost, rep, view)
        return (None, None) if best is None else (best[1], best[2])

    def route(self, r: TraceRequest, t: float) -> None:
        n = r.input_length
        full: list[BlockHash] = list(r.hash_ids[: n // self.bs])  # type: ignore[arg-type]
        out_tokens = max(1, r.output_length)
        f = self.f
        info = f.router.request_info(MODEL, block_hashes=full, prompt_tokens=n, max_tokens=out_tokens)
        drep = f.router.select(info)  # decode-capable replicas only (prefill role excluded)
        di = f.rid_to_idx[drep.id]
        prep, pview = self._best_prefill(n, info, drep)
        dview = DecodeView(
            cached_tokens=f.router.predicted_cached_tokens(info, drep),
            running=self._running(drep),
            pending_prefill_tokens=drep.pending_prefill_tokens,
            kv_free=None if drep.kv_usage is None else 1.0 - drep.kv_usage,
            prefill_tps=self._rate(drep),
            rate_log=drep.prefill_compute_log_tps,
            rate_log_se2=drep.prefill_compute_log_se2,
        )
        dec = decide(n, dview, pview, self.link, self.params)
        self.outcomes[dec.outcome] = self.outcomes.get(dec.outcome, 0) + 1
        rec = RequestRecord(request_id=r.request_id, target=self.pd.name, send_s=t, prompt_tokens=n)
        rec.replica = drep.id
        f.records[r.request_id] = rec
        if not dec.split or prep is None:
            self._local(r, full, info, drep, di, t)
            return
        # Leg 2 is committed to D now (its load counts there from the decision), with nothing to
        # prefill (as the live router's ticket): D's pending prefill and measured rate stay clean.
        pinfo = f.router.request_info(MODEL, block_hashes=full, prompt_tokens=n, max_tokens=1)
        pinfo.gpu_blocks, pinfo.any_tier_blocks = info.gpu_blocks, info.any_tier_blocks
        info.remote_prefill = True
        dticket = f.router.dispatch(info, drep)
        f.tickets[r.request_id] = dticket
        f.awaiting[di][r.request_id] = dticket
        pi = f.rid_to_idx[prep.id]
        lid = _leg1_id(r.request_id)
        f.records[lid] = RequestRecord(request_id=lid, target="leg1", send_s=t, prompt_tokens=n)
        pticket = f.router.dispatch(pinfo, prep)
        try:
            f.engines[pi].add_request(
                SimRequest(lid, 1, prompt_len=n, block_hashes=full, hold_kv=True), now=t
            )
        except ValueError as exc:
            rec.error = str(exc)
            f.router.finish(pticket, False, None)
            f.router.finish(f.tickets.pop(r.request_id), False, None)
            return
        f.tickets[lid] = pticket
        f.awaiting[pi][lid] = pticket
        f.busy.add(pi)
        f.leg1_on[pi] = f.leg1_on.get(pi, 0) + 1
        f.leg2[lid] = _Leg2(
            di, SimRequest(r.request_id, out_tokens, prompt_len=n, block_hashes=full, remote_tokens=n), t
        )

    def _local(
        self, r: TraceRequest, full: list[BlockHash], info: RequestInfo, drep: Replica, di: int, t: float
    ) -> None:
        f = self.f
        ticket = f.router.dispatch(info, drep)
        try:
            f.engines[di].add_request(
                SimRequest(
                    r.request_id, max(1, r.output_length), prompt_len=r.input_length, block_hashes=full
                ),
                now=t,
            )
        except ValueError as exc:
            f.records[r.request_id].error = str(exc)
            f.router.finish(ticket, False, None)
            return
        f.tickets[r.request_id] = ticket
        f.awaiting[di][r.request_id] = ticket
        f.busy.add(di)

    def run(self, reqs: Sequence[TraceRequest]) -> None:
        interval = self.cfg.scrape_interval_s
        t0 = reqs[0].timestamp_s if reqs else 0.0
        last_tick = -1
        f = self.f
        for r in reqs:
            t = (r.timestamp_s - t0) / self.cfg.speedup
            tick = math.floor(t / interval)
            if tick > last_tick:
                last_tick = tick
                ts = tick * interval
                self.advance(ts)
                self.clock.t = max(self.clock.t, ts)
                f.scrape()
            self.advance(t)
            self.clock.t = t
            self.route(r, t)
        # Drain in scrape-interval rounds until the fleet is idle and every leg 2 has run.
        t = t_end = self.clock.t
        while f.busy or f.heap or f.leg2 or f.handoffs:
            t += interval
            self.advance(t)
            if t - t_end > 1e7:  # pragma: no cover - engines always progress; a guard, not a path
                raise RuntimeError("PD simulation did not drain")


def run_pd(
    trace: Trace, cfg: SimConfig, pd: PDConfig, reqs: Sequence[TraceRequest] | None = None
) -> PolicyRun:
    """Play the trace against ``pd.prefill_replicas`` + ``pd.decode_replicas`` + ``pd.both_replicas``."""
    if reqs is None:
        reqs = select_requests(trace, cfg)
    start = time.perf_counter()
    run = _PDRun(trace, cfg, pd)
    run.run(reqs)
    wall = time.perf_counter() - start
    f = run.f
    records = [f.records[r.request_id] for r in reqs]
    for rec in records:
        at = run.split_at.get(rec.request_id)
        if at is not None:  # D's clock starts at leg 2's arrival; the client's at its send
            if rec.ttft_s is not None:
                rec.ttft_s += at - rec.send_s
            if rec.e2e_s is not None:
                rec.e2e_s += at - rec.send_s
    end = max((rec.send_s + (rec.e2e_s or 0.0) for rec in records), default=0.0)
    split = len(run.split_at)
    extra: dict[str, Any] = {
        "prefill_replicas": pd.prefill_replicas,
        "decode_replicas": pd.decode_replicas,
        "both_replicas": pd.both_replicas,
        "pd_rule": pd.name.split(" ", 1)[1],
        "split_share": split / len(records) if records else math.nan,
        "pd_outcomes": dict(sorted(run.outcomes.items())),
        "kv_transfer_tokens": sum(e.metrics.external_prefix_cache_hits for e in f.engines),
    }
    serving = [r.id for r, role in zip(f.replicas, run.roles, strict=True) if role != "prefill"]
    return PolicyRun(
        name=pd.name,
        records=records,
        summary=summarize(records, slo=SLO(cfg.slo_ttft_s, cfg.slo_tpot_s), replicas=serving),
        wall_s=wall,
        sim_end_s=end,
        engine_steps=f.steps,
        preemptions=sum(e.metrics.num_preemptions for e in f.engines),
        kv_events_applied=f.kv_events_applied,
        extra=extra,
    )
