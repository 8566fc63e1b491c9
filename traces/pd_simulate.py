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
from router.pd.decision import DecisionParams, DecodeView, LinkModel, PrefillView, decide
from router.types import BlockHash

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


class PDConfig(msgspec.Struct, frozen=True, kw_only=True):
    prefill_replicas: int
    decode_replicas: int
    rule: str = "auto"  # always | auto | threshold | never
    threshold_tokens: int = 2048  # the threshold rule's N (llm-d nonCachedTokens)
    handoff_s: float = 0.001  # leg 1's answer through the router to leg 2's arrival on D
    policy: str = "cache_aware"  # each pool's routing policy

    def __post_init__(self) -> None:
        if self.prefill_replicas < 1 or self.decode_replicas < 1:
            raise ValueError(
                f"invalid PD fleet: {self.prefill_replicas}P + {self.decode_replicas}D (each pool needs >= 1)"
            )
        if self.rule not in PD_RULES:
            raise ValueError(f"invalid pd rule {self.rule!r}: one of {', '.join(PD_RULES)} (threshold:N)")

    @property
    def name(self) -> str:
        rule = f"threshold:{self.threshold_tokens}" if self.rule == "threshold" else self.rule
        return f"{self.prefill_replicas}P+{self.decode_replicas}D {rule}"


def parse_rule(text: str) -> tuple[str, int | None]:
    """``always`` / ``auto`` / ``never`` / ``threshold`` / ``threshold:N``."""
    rule, _, n = text.partition(":")
    if rule not in PD_RULES or (n and rule != "threshold"):
        raise ValueError(f"invalid --pd {text!r}: always, auto, never, threshold or threshold:N")
    try:
        return rule, (int(n) if n else None)
    except ValueError:
        raise ValueError(f"invalid --pd {text!r}: N must be an integer") from None


class _PrefillPool(_Fleet):
    """The prefill pool: leg 1's finishes are collected as handoffs for the decode pool."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.handoffs: list[tuple[float, str, int]] = []

    def _deliver(self, ts: float, kind: int, i: int, payload: Any) -> None:
        super()._deliver(ts, kind, i, payload)
        if kind == _FINISH:
            self.handoffs.append((ts, payload.request_id, i))


class _Leg2(msgspec.Struct):
    decode: int
    request: SimRequest
    arrival: float  # the client's send time


class _PDRun:
    def __init__(self, trace: Trace, cfg: SimConfig, pd: PDConfig) -> None:
        self.cfg = cfg
        self.pd = pd
        self.clock = VirtualClock()
        factory = policy_factory(pd.policy, cfg)
        pcfg = msgspec.structs.replace(cfg, replicas=pd.prefill_replicas)
        dcfg = msgspec.structs.replace(cfg, replicas=pd.decode_replicas)
        self.p = _PrefillPool(trace, pcfg, factory, random.Random(cfg.seed), clock=self.clock)
        self.d = _Fleet(trace, dcfg, factory, random.Random(cfg.seed + 1), clock=self.clock)
        prof = get_profile(cfg.profile)
        link = prof.kv_link
        self.link = LinkModel(
            bandwidth_bytes_s=link.gbytes_per_s * 1e9 / cfg.time_scale,
            latency_s=link.latency_ms / 1000 / cfg.time_scale,
            kv_bytes_per_token=link.bytes_per_token,
        )
        self.params = DecisionParams(rule=pd.rule, threshold_tokens=pd.threshold_tokens)  # type: ignore[arg-type]
        self.leg2: dict[str, _Leg2] = {}
        self.split_at: dict[str, float] = {}  # request id -> leg 2's arrival on D
        self.outcomes: dict[str, int] = {}
        self.bs = trace.block_tokens

    def advance(self, t: float) -> None:
        """Both pools to ``t``; every handoff that finished by then goes to its decode replica."""
        self.p.advance_all(t)
        hand = sorted(self.p.handoffs)
        self.p.handoffs.clear()
        for tf, rid, pi in hand:
            leg = self.leg2.pop(rid)
            at = tf + self.pd.handoff_s
            self.d.advance_all(at)
            self.clock.t = max(self.clock.t, at)
            self.split_at[rid] = at
            try:
                self.d.engines[leg.decode].add_request(leg.request, now=at)
            except ValueError as exc:
                self.d.records[rid].error = str(exc)
                self.d.router.finish(self.d.tickets.pop(rid), False, None)
            else:
                self.d.busy.add(leg.decode)
            self.p.engines[pi].release_kv(rid)
        self.d.advance_all(t)

    def route(self, r: TraceRequest, t: float) -> None:
        n = r.input_length
        full: list[BlockHash] = list(r.hash_ids[: n // self.bs])  # type: ignore[arg-type]
        out_tokens = max(1, r.output_length)
        d, p = self.d, self.p
        info = d.router.request_info(MODEL, block_hashes=full, prompt_tokens=n, max_tokens=out_tokens)
        drep = d.router.select(info)
        di = d.rid_to_idx[drep.id]
        pinfo = p.router.request_info(MODEL, block_hashes=full, prompt_tokens=n, max_tokens=1)
        prep = p.router.select(pinfo)
        dview = DecodeView(
            cached_tokens=d.router.predicted_cached_tokens(info, drep),
            running=max(float(drep.in_flight), drep.engine_running or 0.0),
            pending_prefill_tokens=drep.pending_prefill_tokens,
            kv_free=None if drep.kv_usage is None else 1.0 - drep.kv_usage,
            prefill_tps=drep.prefill_tps,
        )
        pview = PrefillView(
            cached_tokens=p.router.predicted_cached_tokens(pinfo, prep),
            pending_prefill_tokens=prep.pending_prefill_tokens,
            prefill_tps=prep.prefill_tps,
        )
        dec = decide(n, dview, pview, self.link, self.params)
        self.outcomes[dec.outcome] = self.outcomes.get(dec.outcome, 0) + 1
        rec = RequestRecord(request_id=r.request_id, target=self.pd.name, send_s=t, prompt_tokens=n)
        rec.replica = drep.id
        d.records[r.request_id] = rec
        if not dec.split:
            ticket = d.router.dispatch(info, drep)
            try:
                d.engines[di].add_request(
                    SimRequest(r.request_id, out_tokens, prompt_len=n, block_hashes=full), now=t
                )
            except ValueError as exc:
                rec.error = str(exc)
                d.router.finish(ticket, False, None)
                return
            d.tickets[r.request_id] = ticket
            d.awaiting[di][r.request_id] = ticket
            d.busy.add(di)
            return
        # Leg 2 is committed to D now (its load counts there from the decision), with nothing to
        # prefill (as the live router's ticket): D's pending prefill and measured rate stay clean.
        info.remote_prefill = True
        dticket = d.router.dispatch(info, drep)
        d.tickets[r.request_id] = dticket
        d.awaiting[di][r.request_id] = dticket
        pi = p.rid_to_idx[prep.id]
        p.records[r.request_id] = RequestRecord(
            request_id=r.request_id, target="leg1", send_s=t, prompt_tokens=n
        )
        pticket = p.router.dispatch(pinfo, prep)
        try:
            p.engines[pi].add_request(
                SimRequest(r.request_id, 1, prompt_len=n, block_hashes=full, hold_kv=True), now=t
            )
        except ValueError as exc:
            rec.error = str(exc)
            p.router.finish(pticket, False, None)
            d.router.finish(d.tickets.pop(r.request_id), False, None)
            return
        p.tickets[r.request_id] = pticket
        p.awaiting[pi][r.request_id] = pticket
        p.busy.add(pi)
        self.leg2[r.request_id] = _Leg2(
            di, SimRequest(r.request_id, out_tokens, prompt_len=n, block_hashes=full, remote_tokens=n), t
        )

    def run(self, reqs: Sequence[TraceRequest]) -> None:
        interval = self.cfg.scrape_interval_s
        t0 = reqs[0].timestamp_s if reqs else 0.0
        last_tick = -1
        for r in reqs:
            t = (r.timestamp_s - t0) / self.cfg.speedup
            tick = math.floor(t / interval)
            if tick > last_tick:
                last_tick = tick
                ts = tick * interval
                self.advance(ts)
                self.clock.t = max(self.clock.t, ts)
                self.p.scrape()
                self.d.scrape()
            self.advance(t)
            self.clock.t = t
            self.route(r, t)
        # Drain in scrape-interval rounds until both pools are idle and every leg 2 has run.
        t = t_end = self.clock.t
        while self.p.busy or self.d.busy or self.p.heap or self.d.heap or self.leg2 or self.p.handoffs:
            t += interval
            self.advance(t)
            if t - t_end > 1e7:  # pragma: no cover - engines always progress; a guard, not a path
                raise RuntimeError("PD simulation did not drain")


def run_pd(
    trace: Trace, cfg: SimConfig, pd: PDConfig, reqs: Sequence[TraceRequest] | None = None
) -> PolicyRun:
    """Play the trace against ``pd.prefill_replicas`` + ``pd.decode_replicas`` replicas."""
    if reqs is None:
        reqs = select_requests(trace, cfg)
    start = time.perf_counter()
    run = _PDRun(trace, cfg, pd)
    run.run(reqs)
    wall = time.perf_counter() - start
    records = [run.d.records[r.request_id] for r in reqs]
    for rec in records:
        at = run.split_at.get(rec.request_id)
        if at is not None:  # D's clock starts at leg 2's arrival; the client's at its send
            if rec.ttft_s is not None:
                rec.ttft_s += at - rec.send_s
            if rec.e2e_s is not None:
                rec.e2e_s += at - rec.send_s
    end = max((rec.send_s + (rec.e2e_s or 0.0) for rec in records), default=0.0)
    engines = [*run.p.engines, *run.d.engines]
    split = len(run.split_at)
    extra: dict[str, Any] = {
        "prefill_replicas": pd.prefill_replicas,
        "decode_replicas": pd.decode_replicas,
        "pd_rule": pd.name.split(" ", 1)[1],
        "split_share": split / len(records) if records else math.nan,
        "pd_outcomes": dict(sorted(run.outcomes.items())),
        "kv_transfer_tokens": sum(e.metrics.external_prefix_cache_hits for e in run.d.engines),
    }
    return PolicyRun(
        name=pd.name,
        records=records,
        summary=summarize(
            records, slo=SLO(cfg.slo_ttft_s, cfg.slo_tpot_s), replicas=[r.id for r in run.d.replicas]
        ),
        wall_s=wall,
        sim_end_s=end,
        engine_steps=run.p.steps + run.d.steps,
        preemptions=sum(e.metrics.num_preemptions for e in engines),
        kv_events_applied=run.p.kv_events_applied + run.d.kv_events_applied,
        extra=extra,
    )
