"""Split or not: per request, compare estimated TTFT with local prefill against remote prefill.

Pure (no I/O, no clock): the live router (router/pd/route.py) and the offline simulator
(traces/simulate.py) call the same functions with numbers they measured.

The decode replica D is chosen first (``pick_decode``); then, for that D and the best prefill
replica P:

    uncached_D = prompt - D.cached_tokens           tokens D must compute locally / receive
    uncached_P = prompt - P.cached_tokens           tokens P computes
    local      = (D.pending_prefill + uncached_D) / D.rate + step_s * D.running
    remote     = (P.pending_prefill + uncached_P) / P.rate       P's queue and compute
               + step_s * P.running                              P's own decode batch (role both)
               + handoff_overhead_s + link.latency_s             one more HTTP leg, one more hop
               + uncached_D * link.kv_bytes_per_token / link.bandwidth
               + step_s * D.running                              D's first step after the load
    stall      = uncached_D / D.rate * D.running                 request-seconds the D batch is slowed
    stall_P    = uncached_P / P.rate * P.running                 the same on P (0 for a prefill-only P)

and the ``auto`` rule splits iff ``remote + stall_weight * stall_P + occupancy_weight * imposed +
min_gain_s < (1 - min_gain_ratio) * (local + stall_weight * stall)``, where ``imposed`` (for a
``both`` P only, ``imposed_delay``) is the TTFT the split's prefill adds to the requests the router
will send P meanwhile (P's measured arrival rate x its busy time): a split must win clearly, because the best of several noisy
estimates is biased towards the one that happened to read low (and a wrong split pays a transfer
and a second queue). ``P.running`` is the decode batch of a ``both`` replica (vLLM NixlConnector
``kv_role: kv_both``: it prefills for others and decodes its own requests), 0 for a prefill-only
one: lending a busy decoder's steps to another replica's prefill stalls its batch just as local
prefill would, so a ``both`` fleet splits only towards a replica with spare prefill capacity.

The rates are prefill *compute* rates (``Replica.prefill_compute_tps``, learned from requests that
had no prefill queued ahead of them): the estimates add the queue themselves (``pending / rate``),
so a rate measured from TTFTs that include queueing would count it twice. Two ``both`` replicas'
rates count as one unless their log-space estimates differ by more than ``rate_z`` standard errors
(``_rates``): they serve the same mix of work, so only hardware can separate them. Only the KV
D lacks crosses the link: vLLM's NixlConnector asks P for ``prompt - D's local hit`` tokens
(``get_num_new_matched_tokens``), so a decode-cached prefix is never transferred twice.

``threshold`` is the baseline the peers ship: llm-d ``prefix-based-pd-decider`` (split iff
prompt >= N and uncached_D >= N; vllm-router#130 is the same with N = 256) or, with
``threshold_max_cached_ratio`` set, Dynamo ``isl_bounding`` (local iff uncached_D < N and
uncached_D / prompt < ratio). ``always`` and ``never`` exist for comparisons.

Every decision carries both estimates and a reason; the outcome string is the label value of
``kvrouter_pd_decisions_total{outcome=...}``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

_Out = Callable[[bool, str, str], "Decision"]

Rule = Literal["auto", "threshold", "always", "never"]
RULES: tuple[Rule, ...] = ("auto", "threshold", "always", "never")

# Outcomes the decision can produce (the handoff adds fallback_<reason> at run time).
SPLIT = "split"
LOCAL_N = "local_n"  # n > 1: the single-consumer NIXL handoff cannot feed n sequences
LOCAL_NO_PREFILL = "local_no_prefill"  # no routable prefill replica
LOCAL_CACHED = "local_cached"  # D already holds (nearly) the whole prompt
LOCAL_SHORT = "local_short"  # too little to prefill for a second leg to pay
LOCAL_FASTER = "local_faster"  # the estimates say local prefill is at least as fast
LOCAL_THRESHOLD = "local_threshold"  # baseline rule: below the fixed uncached-token threshold
LOCAL_RULE = "local_rule"  # rule "never"
DECISION_OUTCOMES: tuple[str, ...] = (
    SPLIT,
    LOCAL_N,
    LOCAL_NO_PREFILL,
    LOCAL_CACHED,
    LOCAL_SHORT,
    LOCAL_FASTER,
    LOCAL_THRESHOLD,
    LOCAL_RULE,
)


@dataclass(frozen=True, slots=True)
class DecodeView:
    """What the router knows about one decode candidate, for this request."""

    cached_tokens: int  # prefix of this prompt held by D (GPU tier, plus credited CPU tier)
    running: float  # decode batch: requests running on D (max of engine and router counts)
    pending_prefill_tokens: int = 0  # uncached prompt tokens queued on D, first token not seen
    kv_free: float | None = None  # 1 - KV usage; None until scraped
    prefill_tps: float = 0.0  # D's measured prefill compute rate; 0 = unmeasured
    # Log-space estimate of the rate (EWMA of ln samples) and its squared standard error, from
    # the samples' spread (inf: not known yet): what tells two replicas' rates apart.
    rate_log: float = 0.0
    rate_log_se2: float = math.inf


@dataclass(frozen=True, slots=True)
class PrefillView:
    """The best prefill candidate (cache-aware choice made by the caller)."""

    cached_tokens: int
    pending_prefill_tokens: int = 0
    prefill_tps: float = 0.0
    running: float = 0.0  # P's own decode batch: > 0 only for a ``both`` (kv_both) replica
    decodes: bool = False  # P is a ``both`` replica: it serves the same mix of work as D
    arrival_rate: float = 0.0  # prefill-bearing requests/s the router sends P (dispatch history)
    # Log-space estimate of the rate (EWMA of ln samples) and its squared standard error, from
    # the samples' spread (inf: not known yet): what tells two replicas' rates apart.
    rate_log: float = 0.0
    rate_log_se2: float = math.inf


@dataclass(frozen=True, slots=True)
class LinkModel:
    """P -> D KV transfer: measured or configured bandwidth, one-way latency, KV size per token."""

    bandwidth_bytes_s: float = 12.5e9  # one 100 Gb/s RDMA NIC
    latency_s: float = 50e-6
    kv_bytes_per_token: int = 131_072  # Llama-3-8B bf16: 32 layers * 8 KV heads * 128 * 2 (K,V) * 2 B

    def transfer_s(self, tokens: int) -> float:
        if tokens <= 0:
            return 0.0
        return self.latency_s + tokens * self.kv_bytes_per_token / self.bandwidth_bytes_s


@dataclass(frozen=True, slots=True)
class DecisionParams:
    rule: Rule = "auto"
    default_prefill_tps: float = 20_000.0  # rate for a replica nobody has measured (as scoring/ttft)
    step_s: float = 0.0005  # cost per running request of one interleaved decode step (as scoring/ttft)
    handoff_overhead_s: float = 0.002  # leg 1 round trip through the router + leg 2 set-up
    stall_weight: float = 0.1  # TTFT seconds one request-second of decode slow-down is worth
    min_gain_s: float = 0.0  # remote must win by this much (hysteresis against noise)
    min_gain_ratio: float = 0.3  # ... and by this share of the local cost (estimates' noise)
    min_split_tokens: int = 64  # below this many uncached tokens: never a second leg (local_short)
    same_rate_ratio: float = 1.5  # P and D rates closer than this ratio count as one GPU kind
    leg1_drift: float = 0.25  # remote path's extra wait on D, as a share of leg 1's estimate
    rate_z: float = 2.0  # rates differ only beyond this many standard errors of their difference
    occupancy_weight: float = 1.0  # TTFT seconds per request-second of delay imposed on later arrivals
    # Baseline "threshold" rule (llm-d nonCachedTokens / Dynamo eff-isl-threshold).
    threshold_tokens: int = 2048
    threshold_max_cached_ratio: float | None = None  # Dynamo isl_bounding's 0.7 when set


@dataclass(frozen=True, slots=True)
class Decision:
    split: bool
    outcome: str  # label of kvrouter_pd_decisions_total
    reason: str  # one human line for /debug/route and logs
    local_ttft_s: float  # estimated TTFT if D prefills itself
    remote_ttft_s: float | None  # estimated TTFT with remote prefill (None without a P)
    stall_s: float  # request-seconds of decode slow-down local prefill would cause on D
    uncached_decode: int  # tokens D would compute locally (= tokens the link would carry)
    uncached_prefill: int  # tokens P would compute
    transfer_s: float  # estimated link time of the KV D lacks
    remote_stall_s: float = 0.0  # request-seconds of decode slow-down remote prefill causes on P
    local_rate_tps: float = 0.0  # the prefill rates the estimates divided by
    remote_rate_tps: float = 0.0
    imposed_s: float = 0.0  # request-seconds of TTFT a split adds to requests arriving at P

    @property
    def chosen_ttft_s(self) -> float:
        if self.split and self.remote_ttft_s is not None:
            return self.remote_ttft_s
        return self.local_ttft_s

    def as_dict(self) -> dict[str, object]:
        return {
            "split": self.split,
            "outcome": self.outcome,
            "reason": self.reason,
            "local_ttft_s": round(self.local_ttft_s, 6),
            "remote_ttft_s": None if self.remote_ttft_s is None else round(self.remote_ttft_s, 6),
            "stall_s": round(self.stall_s, 6),
            "uncached_decode": self.uncached_decode,
            "uncached_prefill": self.uncached_prefill,
            "transfer_s": round(self.transfer_s, 6),
            "remote_stall_s": round(self.remote_stall_s, 6),
            "local_rate_tps": round(self.local_rate_tps, 1),
            "remote_rate_tps": round(self.remote_rate_tps, 1),
            "imposed_s": round(self.imposed_s, 6),
        }


def _rate(tps: float, params: DecisionParams) -> float:
    return tps if tps > 0 else params.default_prefill_tps


def _rates(
    p_tps: float, d_tps: float, params: DecisionParams, spread: tuple[float, float] | None = None
) -> tuple[float, float]:
    """P's and D's rates for one comparison. Within ``same_rate_ratio`` of each other they are
    taken as one (their geometric mean): a measured rate moves with the prompts a replica happened
    to serve (attention makes long prompts slower per token), and on one kind of GPU a split
    chosen because P read faster than D by that noise pays the transfer for nothing.

    ``spread`` (the difference of the two log-space estimates and its squared standard error) is
    given when P is a ``both`` replica, serving the same mix of work as D: their rates then differ
    only by hardware, so they count as one unless that difference exceeds ``rate_z`` standard
    errors (never while either has under two samples), and an unmeasured one takes the measured
    one's rate. A prefill-only P's rate differs from a decoder's systematically (no decode steps
    in its prefill), so neither inference is made across those roles."""
    if spread is not None:
        if p_tps <= 0 < d_tps:
            p_tps = d_tps
        elif d_tps <= 0 < p_tps:
            d_tps = p_tps
    rp, rd = _rate(p_tps, params), _rate(d_tps, params)
    same = max(rp, rd) <= params.same_rate_ratio * min(rp, rd)
    if spread is not None and p_tps > 0 and d_tps > 0:
        diff, se2 = spread
        same = same or abs(diff) <= params.rate_z * math.sqrt(se2)
    if same:
        g = math.sqrt(rp * rd)
        return g, g
    return rp, rd


def local_ttft(prompt_tokens: int, d: DecodeView, params: DecisionParams) -> tuple[float, float, int]:
    """(estimated TTFT, stall request-seconds, uncached tokens) of prefilling on D itself."""
    uncached = max(0, prompt_tokens - d.cached_tokens)
    rate = _rate(d.prefill_tps, params)
    compute = uncached / rate
    est = (d.pending_prefill_tokens + uncached) / rate + params.step_s * d.running
    return est, compute * d.running, uncached


def remote_ttft(
    prompt_tokens: int, d: DecodeView, p: PrefillView, link: LinkModel, params: DecisionParams
) -> tuple[float, float, int]:
    """(estimated TTFT, transfer seconds, P's uncached tokens) of prefilling on P."""
    uncached_p = max(0, prompt_tokens - p.cached_tokens)
    uncached_d = max(0, prompt_tokens - d.cached_tokens)
    xfer = link.transfer_s(uncached_d)
    rate_p, rate_d = _rates(p.prefill_tps, d.prefill_tps, params)
    ready = (
        (p.pending_prefill_tokens + uncached_p) / rate_p
        + params.step_s * p.running
        + params.handoff_overhead_s
        + xfer
    )
    # While leg 1 runs, D keeps taking new prefills that leg 2 will queue behind (and step
    # boundaries it must wait for): a share of leg 1's time, measured offline (docs).
    ready *= 1.0 + params.leg1_drift
    # Leg 2 queues on D behind the prefills already there (vLLM schedules waiting requests in
    # order, and a chunked prefill in progress takes the step's token budget first).
    est = max(ready, d.pending_prefill_tokens / rate_d) + params.step_s * d.running
    return est, xfer, uncached_p


def remote_stall(prompt_tokens: int, p: PrefillView, params: DecisionParams) -> float:
    """Request-seconds P's own decode batch is slowed by prefilling this prompt (0 if P has none)."""
    return max(0, prompt_tokens - p.cached_tokens) / _rate(p.prefill_tps, params) * p.running


def imposed_delay(uncached: int, pending: int, rate: float, arrival_rate: float) -> float:
    """Request-seconds of TTFT that ``uncached`` tokens of prefill add to the requests arriving at a
    replica after it: every arrival before the replica's queue (``pending``) and this prefill have
    drained waits for this prefill too, by all of it if it arrives while the queue ahead still
    runs, by what is left of it (on average half) if it arrives during it. First order: the work
    those arrivals bring is not compounded (they are a share of the replica's arrivals, and the
    router steers later ones by the pending count this prefill adds)."""
    work = uncached / rate
    return arrival_rate * work * (pending / rate + work / 2)


def prefill_cost(prompt_tokens: int, p: PrefillView, params: DecisionParams) -> float:
    """How the best prefill replica is chosen: its queue and compute for this prompt, its own
    decode steps, and the stall it would cause on its decode batch (role both), weighted."""
    uncached = max(0, prompt_tokens - p.cached_tokens)
    return (
        (p.pending_prefill_tokens + uncached) / _rate(p.prefill_tps, params)
        + params.step_s * p.running
        + params.stall_weight * remote_stall(prompt_tokens, p, params)
    )


def decide(
    prompt_tokens: int,
    decode: DecodeView,
    prefill: PrefillView | None,
    link: LinkModel,
    params: DecisionParams,
    n: int = 1,
) -> Decision:
    """Split (remote prefill on ``prefill``, decode on ``decode``) or run locally on ``decode``."""
    if prefill is not None:
        spread = None
        if prefill.decodes:
            spread = (prefill.rate_log - decode.rate_log, prefill.rate_log_se2 + decode.rate_log_se2)
        rate_p, rate_d = _rates(prefill.prefill_tps, decode.prefill_tps, params, spread)
        decode = replace(decode, prefill_tps=rate_d)
        prefill = replace(prefill, prefill_tps=rate_p)
    loc, stall, unc_d = local_ttft(prompt_tokens, decode, params)
    if prefill is None:
        return Decision(
            False, LOCAL_NO_PREFILL, "no routable prefill replica", loc, None, stall, unc_d, 0, 0.0
        )
    rem, xfer, unc_p = remote_ttft(prompt_tokens, decode, prefill, link, params)
    rstall = remote_stall(prompt_tokens, prefill, params)
    rates = (_rate(decode.prefill_tps, params), _rate(prefill.prefill_tps, params))
    imp_p = (
        imposed_delay(unc_p, prefill.pending_prefill_tokens, rates[1], prefill.arrival_rate)
        if prefill.decodes
        else 0.0
    )

    def out(split: bool, outcome: str, reason: str) -> Decision:
        return Decision(split, outcome, reason, loc, rem, stall, unc_d, unc_p, xfer, rstall, *rates, imp_p)

    if n > 1:
        return out(False, LOCAL_N, f"n={n}: one NIXL handoff feeds one sequence")
    rule = params.rule
    if rule == "never":
        return out(False, LOCAL_RULE, "rule never")
    if rule == "always":
        return out(True, SPLIT, "rule always")
    if rule == "threshold":
        return _threshold(prompt_tokens, unc_d, params, out)
    if unc_d < params.min_split_tokens:
        if decode.cached_tokens > 0 and prompt_tokens >= params.min_split_tokens:
            return out(
                False, LOCAL_CACHED, f"decode replica holds {decode.cached_tokens}/{prompt_tokens} tokens"
            )
        return out(False, LOCAL_SHORT, f"{unc_d} uncached tokens < {params.min_split_tokens}")
    local_cost = loc + params.stall_weight * stall
    remote_cost = rem + params.stall_weight * rstall + params.occupancy_weight * imp_p
    if remote_cost + params.min_gain_s < (1.0 - params.min_gain_ratio) * local_cost:
        on_p = f" + P stall {rstall * 1e3:.1f} ms·req" if rstall else ""
        on_p += f" + imposed {imp_p * 1e3:.1f} ms·req" if imp_p else ""
        return out(
            True,
            SPLIT,
            f"remote {rem * 1e3:.1f} ms{on_p} < local {loc * 1e3:.1f} ms + stall {stall * 1e3:.1f} ms·req",
        )
    if decode.cached_tokens > 0 and unc_p > unc_d:
        return out(
            False, LOCAL_CACHED, f"decode replica's cached {decode.cached_tokens} tokens make local faster"
        )
    imposed = f" (+imposed {imp_p * 1e3:.1f} ms·req)" if imp_p else ""
    return out(
        False,
        LOCAL_FASTER,
        f"local {loc * 1e3:.1f} ms (+stall) <= remote {rem * 1e3:.1f} ms{imposed} (+stall)",
    )


def _threshold(prompt_tokens: int, unc_d: int, params: DecisionParams, out: _Out) -> Decision:
    """The peers' fixed rule on the tokens D lacks (see the module docstring)."""
    n = params.threshold_tokens
    ratio = params.threshold_max_cached_ratio
    if ratio is None:
        # llm-d prefix-based-pd-decider: inputTokens >= N and inputTokens - cached >= N.
        if prompt_tokens >= n and unc_d >= n:
            return out(True, SPLIT, f"threshold: {unc_d} uncached >= {n}")
        return out(False, LOCAL_THRESHOLD, f"threshold: {unc_d} uncached < {n}")
    # Dynamo isl_bounding: bypass remote prefill iff eff_isl < N and eff_isl / isl < ratio.
    share = unc_d / prompt_tokens if prompt_tokens else 0.0
    if unc_d < n and share < ratio:
        return out(
            False, LOCAL_THRESHOLD, f"threshold: {unc_d} uncached < {n} and share {share:.2f} < {ratio}"
        )
    return out(True, SPLIT, f"threshold: {unc_d} uncached, share {share:.2f}")


@dataclass(frozen=True, slots=True)
class DecodeChoice:
    index: int  # into the candidates
    decision: Decision


def pick_decode(
    prompt_tokens: int,
    decodes: Sequence[DecodeView],
    prefill: PrefillView | None,
    link: LinkModel,
    params: DecisionParams,
    n: int = 1,
    min_kv_free: float = 0.05,
    itl_weight: float = 0.001,
    prefill_for: Sequence[PrefillView | None] | None = None,
) -> DecodeChoice:
    """Decode replica first (llm-d's order): among those with KV headroom, the one whose best
    mode (local or split, as ``decide`` would pick) gives the lowest TTFT, plus ``itl_weight`` per
    running request for the decode batch this request joins. A cached prefix on D helps only
    through that estimate (it shortens local prefill and the transfer). Ties: the first.

    ``prefill_for[i]``, when given, replaces ``prefill`` for candidate ``i``: in a fleet of
    ``both`` replicas the best prefill replica may be the decode candidate itself, and then the
    split option for that candidate is the next best one (or none)."""
    if not decodes:
        raise ValueError("pick_decode needs at least one decode candidate")
    roomy = [i for i, d in enumerate(decodes) if d.kv_free is None or d.kv_free >= min_kv_free]
    pool = roomy or list(range(len(decodes)))
    best_i = pool[0]
    best_cost = math.inf
    best_dec: Decision | None = None
    for i in pool:
        d = decodes[i]
        p = prefill if prefill_for is None else prefill_for[i]
        dec = decide(prompt_tokens, d, p, link, params, n)
        cost = (
            dec.chosen_ttft_s
            + params.stall_weight * (dec.remote_stall_s if dec.split else dec.stall_s)
            + itl_weight * d.running
        )
        if cost < best_cost:
            best_i, best_cost, best_dec = i, cost, dec
    assert best_dec is not None
    return DecodeChoice(best_i, best_dec)
