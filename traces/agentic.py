"""Agent sessions as a workload: shared tool prompts, growing histories, log-normal tool pauses, sub-agents.

An agent session is a loop: the model answers (a tool call), the tool runs for a while, and the
next LLM call sends the *whole* history again plus that answer and the tool's result. So every
turn's prompt extends the previous turn's prompt (prefix reuse above 90% over a session), and
the gap between turns is the tool's run time: seconds for a file read, many minutes for a build,
a test suite or a human approval. Those pauses are exactly when an engine evicts the session's
KV, which is what session-aware routing has to survive.

What this generator draws (every draw from one ``random.Random(seed)``: same parameters, same
trace):

- **A pool of tool/system prompts** (``prompts`` of them, each with its own length around
  ``system_tokens_mean``), chosen per session with Zipf(``prompt_zipf``) popularity: a few agent
  frameworks and tool sets are used by most sessions, a long tail by few.
- **Sessions** of ``turns_mean`` turns on average (geometric, at least 1). Turn 1 is the
  system prompt + a task. Turn k is turn k-1's prompt + its answer (``answer_tokens_*``, the tool
  call) + the tool's result (``tool_result_tokens_*``). A session ends early when the next prompt
  would exceed ``max_input_tokens``.
- **Tool pauses**, log-normal with median ``pause_median_s`` and shape ``pause_sigma`` (of the
  underlying normal): p99 = median * exp(2.326 * sigma). ``pause`` names a preset
  (``PAUSE_PRESETS``: short, medium, long); the two explicit fields override it.
- **Sub-agents**: with probability ``subagent_prob`` a session, at one of its turns, spawns
  ``subagents_mean`` (geometric) child sessions. A child starts from the parent's prompt at that
  point (its prefix, so KV is shareable) + its own sub-task, runs ``subagent_turns_mean`` turns with
  the same pause law, and the parent resumes when the last child ends, with the children's
  reports appended as its tool result. Children are sessions of their own
  (``session_id = <parent session>/sub<k>``) whose first request has ``parent_id`` = the parent's
  request at the branch point.
- **Arrivals**: root sessions start as a Poisson process at ``rate`` per second, or, with
  ``concurrency > 0``, as a closed population: ``concurrency`` sessions run at once and a new one
  starts (after an exponential gap of mean ``restart_gap_s``) whenever one ends; the first
  ``concurrency`` start uniformly over ``[0, restart_gap_s * concurrency]``.

A turn's next request is scheduled at its arrival + its decode time at ``decode_tps`` + the
pause; service time is unknown when the trace is written (open-loop replay), as in the other
generators (``traces/generators.py``). Every request carries ``session_id`` and ``turn``
(1-based within its session). Block ids are chained prefix ids (``traces.model.ChainedIds``) of
``block_tokens`` tokens, 512 by default so the trace can be written as Mooncake JSONL.
"""

from __future__ import annotations

import heapq
import math
import random
from typing import Annotated

import msgspec

from .generators import GENERATORS, GenParams, Segment, Zipf, _Builder, geometric, lognormal_tokens
from .model import MOONCAKE_BLOCK_TOKENS, Trace

Pos = Annotated[int, msgspec.Meta(gt=0)]
NonNeg = Annotated[int, msgspec.Meta(ge=0)]
PosF = Annotated[float, msgspec.Meta(gt=0)]
NonNegF = Annotated[float, msgspec.Meta(ge=0)]
Prob = Annotated[float, msgspec.Meta(ge=0, le=1)]

# (median seconds, sigma). p50 / p90 / p99 of each:
#   short   2 s,  sigma 1.0:   2 s /  7 s /  20 s   (file reads, greps, quick API calls)
#   medium 20 s,  sigma 1.2:  20 s / 93 s / 5.4 min (test runs, builds, web search)
#   long  120 s,  sigma 1.5:   2 min / 14 min / 66 min (long jobs, human approval)
PAUSE_PRESETS: dict[str, tuple[float, float]] = {
    "short": (2.0, 1.0),
    "medium": (20.0, 1.2),
    "long": (120.0, 1.5),
}


class AgenticParams(GenParams, frozen=True, kw_only=True):
    """Agent sessions: shared tool prompts, whole-history turns, log-normal tool pauses, sub-agents."""

    block_tokens: Pos = MOONCAKE_BLOCK_TOKENS
    sessions: Pos = 200  # root sessions (sub-agents come on top)
    rate: PosF = 0.5  # root sessions per second (Poisson), unless concurrency > 0
    concurrency: NonNeg = 0  # > 0: keep this many root sessions running (closed population)
    restart_gap_s: NonNegF = 1.0  # closed population: mean gap before a finished slot restarts
    prompts: Pos = 64  # distinct tool/system prompts
    prompt_zipf: NonNegF = 1.0  # their popularity exponent (0 = uniform)
    system_tokens_mean: PosF = 6000.0  # length of one pool prompt (drawn once per prompt)
    system_tokens_cv: NonNegF = 0.5
    task_tokens_mean: PosF = 300.0
    task_tokens_cv: NonNegF = 1.0
    turns_mean: PosF = 30.0  # geometric turns per session, >= 1
    answer_tokens_mean: PosF = 150.0  # one turn's output (a tool call, reasoning)
    answer_tokens_cv: NonNegF = 0.8
    tool_result_tokens_mean: PosF = 700.0
    tool_result_tokens_cv: NonNegF = 1.5
    pause: str = "medium"  # a PAUSE_PRESETS name
    pause_median_s: NonNegF | None = None  # overrides the preset's median
    pause_sigma: NonNegF | None = None  # overrides the preset's sigma
    subagent_prob: Prob = 0.4  # share of root sessions that spawn sub-agents once
    subagents_mean: PosF = 2.0  # geometric children per spawn, >= 1
    subagent_turns_mean: PosF = 8.0
    subagent_task_tokens_mean: PosF = 200.0
    report_tokens_mean: PosF = 400.0  # what one child hands back to the parent

    def __post_init__(self) -> None:
        if self.pause not in PAUSE_PRESETS:
            raise ValueError(
                f"unknown pause preset {self.pause!r}; expected one of {', '.join(PAUSE_PRESETS)}"
            )

    @property
    def pause_law(self) -> tuple[float, float]:
        """(median s, sigma) after overrides."""
        median, sigma = PAUSE_PRESETS[self.pause]
        if self.pause_median_s is not None:
            median = self.pause_median_s
        if self.pause_sigma is not None:
            sigma = self.pause_sigma
        return median, sigma


def lognormal_pause(rng: random.Random, median_s: float, sigma: float) -> float:
    """A log-normal duration with the given median and shape (sigma of ln)."""
    if median_s <= 0:
        return 0.0
    return median_s * math.exp(sigma * rng.gauss(0.0, 1.0)) if sigma > 0 else median_s


class _Gen:
    def __init__(self, p: AgenticParams) -> None:
        self.p = p
        self.rng = random.Random(p.seed)
        self.b = _Builder("agentic", p)
        self.pool = Zipf(p.prompts, p.prompt_zipf)
        # Pool prompt lengths are drawn first so a prompt keeps its length whatever the sessions do.
        self.prompt_len = [
            lognormal_tokens(self.rng, p.system_tokens_mean, p.system_tokens_cv) for _ in range(p.prompts)
        ]
        self.median_s, self.sigma = p.pause_law

    def pause(self) -> float:
        return lognormal_pause(self.rng, self.median_s, self.sigma)

    def session(
        self,
        sid: str,
        start: float,
        history: list[Segment],
        turns: int,
        parent_rid: str | None,
        may_spawn: bool,
    ) -> float:
        """Emit one session's requests from ``start``; return when its last answer is done."""
        p, rng = self.p, self.rng
        spawn_at = rng.randrange(1, turns + 1) if may_spawn and rng.random() < p.subagent_prob else 0
        at, parent = start, parent_rid
        for turn in range(1, turns + 1):
            if sum(n for _, n in history) > p.max_input_tokens:
                break
            answer = lognormal_tokens(rng, p.answer_tokens_mean, p.answer_tokens_cv)
            rid = f"{sid}-{turn}"
            self.b.add(at, history, answer, rid, sid, parent, turn)
            history.append((("answer", sid, turn), answer))
            at += answer / p.decode_tps
            parent = rid
            if turn == spawn_at:
                # The tool call spawned sub-agents: they branch from this prompt + the call, run
                # in parallel, and the parent's next turn waits for the last of them.
                end = at
                children = geometric(rng, p.subagents_mean)
                for k in range(children):
                    child_sid = f"{sid}/sub{k}"
                    task = lognormal_tokens(rng, p.subagent_task_tokens_mean, 1.0)
                    child_hist = [*history, (("subtask", child_sid), task)]
                    child_turns = geometric(rng, p.subagent_turns_mean)
                    end = max(end, self.session(child_sid, at, child_hist, child_turns, rid, False))
                reports = sum(lognormal_tokens(rng, p.report_tokens_mean, 1.0) for _ in range(children))
                history.append((("reports", sid, turn), reports))
                at = end
            else:
                result = lognormal_tokens(rng, p.tool_result_tokens_mean, p.tool_result_tokens_cv)
                history.append((("tool", sid, turn), result))
                if turn < turns:
                    at += self.pause()
        return at

    def root(self, s: int, start: float) -> float:
        p, rng = self.p, self.rng
        prompt = self.pool.draw(rng)
        history: list[Segment] = [
            (("sys", prompt), self.prompt_len[prompt]),
            (("task", s), lognormal_tokens(rng, p.task_tokens_mean, p.task_tokens_cv)),
        ]
        return self.session(f"agentic-{s}", start, history, geometric(rng, p.turns_mean), None, True)


def agentic_sessions(p: AgenticParams) -> Trace:
    g = _Gen(p)
    rng = g.rng
    if p.concurrency > 0:
        # Closed population: slot free times in a heap; each new session takes the earliest slot.
        slots = [rng.uniform(0.0, p.restart_gap_s * p.concurrency) for _ in range(p.concurrency)]
        heapq.heapify(slots)
        for s in range(p.sessions):
            start = heapq.heappop(slots)
            end = g.root(s, start)
            heapq.heappush(
                slots, end + (rng.expovariate(1 / p.restart_gap_s) if p.restart_gap_s > 0 else 0.0)
            )
    else:
        t = 0.0
        for s in range(p.sessions):
            t += rng.expovariate(p.rate)
            g.root(s, t)
    trace = g.b.trace()
    median, sigma = p.pause_law
    meta = dict(trace.meta)
    meta.update({"pause_median_s": median, "pause_sigma": sigma})
    return msgspec.structs.replace(trace, meta=meta)


GENERATORS["agentic"] = (AgenticParams, agentic_sessions)


def session_prefix_reuse(trace: Trace) -> float:
    """Share of prompt tokens each request shares with the request before it in its session tree
    (its ``parent_id``), token-weighted over the trace: the reuse a router keeps only if the
    session finds its KV where it left it. Full blocks only, as an engine's prefix cache."""
    by_id = {r.request_id: r for r in trace.requests}
    bt = trace.block_tokens
    reused = total = 0
    for r in trace.requests:
        total += r.input_length
        par = by_id.get(r.parent_id) if r.parent_id is not None else None
        if par is None:
            continue
        n = 0
        for a, b in zip(
            r.hash_ids[: r.input_length // bt], par.hash_ids[: par.input_length // bt], strict=False
        ):
            if a != b:
                break
            n += 1
        reused += n * bt
    return reused / total if total else 0.0
