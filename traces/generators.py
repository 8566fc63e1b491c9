"""Seeded workload generators producing traces in a chained-prefix id space.

Every generated prompt is a sequence of *segments* (a system prompt, a document, one user
message, one answer, one tool result), each with a stable key and a length in tokens. The
prompt's block ids come from ``ChainedIds`` over the pieces of segments each block holds, so an
id stands for its whole prefix, exactly like the Mooncake traces: two requests share ids as far
as their prompts agree from the start, and a partial last block that a later turn extends gets a
new id (its content changed), as in a real hash chain.

Four kinds, each with a parameter struct (defaults are the documented values; ``docs/traces.md``
explains each field):

- ``chat``: multi-turn chat. Sessions arrive as a Poisson process; turn k's prompt is turn k-1's
  prompt + its answer + a new user message, after a think time.
- ``agent``: agent sessions. Bursts of LLM calls (each call's output is a tool call, its tool
  result is appended) separated by short tool latencies, bursts separated by long pauses.
- ``shared-prompt``: many users sharing a few long system prompts (Zipf popularity), each user
  with a stable app (system prompt) and optional per-user context, single-turn requests.
- ``rag``: retrieval-augmented requests over a document set with Zipf document popularity.

Times: session/request arrivals are Poisson at ``rate``. A follow-up turn is scheduled after the
previous turn's arrival + its decode time at ``decode_tps`` tokens/s + the think/tool gap; real
service time is unknown when the trace is written, so replays that need strict turn ordering
should follow ``parent_id``.

Lengths are lognormal with the given mean and coefficient of variation (cv), at least 1 token.
Everything is drawn from one ``random.Random(seed)``: same parameters, same trace.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
from collections.abc import Callable, Hashable, Sequence
from typing import Annotated, Any

import msgspec

from .model import ChainedIds, Trace, TraceRequest

Pos = Annotated[int, msgspec.Meta(gt=0)]
NonNeg = Annotated[int, msgspec.Meta(ge=0)]
PosF = Annotated[float, msgspec.Meta(gt=0)]
NonNegF = Annotated[float, msgspec.Meta(ge=0)]

Segment = tuple[Hashable, int]  # (stable key, length in tokens)


class GenParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    seed: int = 0
    block_tokens: Pos = 16  # tokens per block id (vLLM's default block size)
    rate: PosF = 1.0  # Poisson arrivals per second (sessions for chat/agent, requests otherwise)
    decode_tps: PosF = 50.0  # assumed decode speed, to space a session's turns
    max_input_tokens: Pos = 131072  # a session ends before a prompt would exceed this


class ChatParams(GenParams, frozen=True, kw_only=True):
    sessions: Pos = 200
    turns_mean: PosF = 4.0  # geometric number of turns per session, >= 1
    system_prompts: Pos = 1  # distinct system prompts, chosen uniformly per session
    system_tokens: NonNeg = 800
    user_tokens_mean: PosF = 150.0
    user_tokens_cv: NonNegF = 1.0
    answer_tokens_mean: PosF = 300.0
    answer_tokens_cv: NonNegF = 0.8
    think_time_s: NonNegF = 15.0  # mean (exponential) between an answer and the next message


class AgentParams(GenParams, frozen=True, kw_only=True):
    sessions: Pos = 50
    rate: PosF = 0.2
    system_tokens: NonNeg = 4000  # agent instructions + tool schemas, shared by every session
    task_tokens_mean: PosF = 400.0
    task_tokens_cv: NonNegF = 1.0
    bursts_mean: PosF = 3.0  # geometric bursts per session, >= 1
    calls_per_burst_mean: PosF = 4.0  # geometric LLM calls per burst, >= 1
    call_tokens_mean: PosF = 80.0  # one call's output (a tool call)
    call_tokens_cv: NonNegF = 0.5
    tool_result_tokens_mean: PosF = 600.0
    tool_result_tokens_cv: NonNegF = 1.5
    tool_latency_s: NonNegF = 1.5  # mean (exponential) tool time between calls of one burst
    pause_s: NonNegF = 60.0  # mean (exponential) pause between bursts (slow tool, human)


class SharedPromptParams(GenParams, frozen=True, kw_only=True):
    requests: Pos = 2000
    rate: PosF = 5.0
    users: Pos = 500
    system_prompts: Pos = 4  # apps; each user belongs to one, popularity Zipf(prompt_zipf)
    prompt_zipf: NonNegF = 1.0
    system_tokens: NonNeg = 3000
    user_context_tokens: NonNeg = 0  # per-user preamble (profile, memory) after the system prompt
    user_tokens_mean: PosF = 200.0
    user_tokens_cv: NonNegF = 1.0
    output_tokens_mean: PosF = 250.0
    output_tokens_cv: NonNegF = 0.8


class RagParams(GenParams, frozen=True, kw_only=True):
    requests: Pos = 2000
    rate: PosF = 5.0
    documents: Pos = 1000
    zipf_s: NonNegF = 1.1  # document popularity exponent (0 = uniform)
    docs_per_request: Pos = 1  # retrieved documents, placed in the order drawn
    doc_tokens_mean: PosF = 2500.0
    doc_tokens_cv: NonNegF = 0.5
    system_tokens: NonNeg = 300
    question_tokens_mean: PosF = 60.0
    question_tokens_cv: NonNegF = 0.7
    output_tokens_mean: PosF = 200.0
    output_tokens_cv: NonNegF = 0.8


# --- helpers ------------------------------------------------------------------------------------


def lognormal_tokens(rng: random.Random, mean: float, cv: float) -> int:
    """A lognormal length with the given mean and coefficient of variation, at least 1."""
    if cv <= 0:
        return max(1, round(mean))
    sigma2 = math.log1p(cv * cv)
    return max(1, round(rng.lognormvariate(math.log(mean) - sigma2 / 2, math.sqrt(sigma2))))


def geometric(rng: random.Random, mean: float) -> int:
    """A count >= 1 with the given mean (geometric on {1, 2, ...})."""
    if mean <= 1:
        return 1
    p = 1 / mean
    return 1 + int(math.log(1 - rng.random()) / math.log(1 - p))


class Zipf:
    """Ranks 0..n-1 with P(k) proportional to 1/(k+1)^s; O(log n) per draw."""

    def __init__(self, n: int, s: float) -> None:
        self.cum = list(itertools.accumulate(1 / (k + 1) ** s for k in range(n)))

    def draw(self, rng: random.Random) -> int:
        return bisect.bisect_left(self.cum, rng.random() * self.cum[-1])


def block_ids(segments: Sequence[Segment], block_tokens: int, ids: ChainedIds) -> tuple[int, ...]:
    """Chained ids of the ``block_tokens`` blocks of a prompt made of ``segments``.

    A block's content is the tuple of (segment key, start, end) pieces it holds; the last block
    may be partial. O(blocks + segments).
    """
    out: list[int] = []
    parent = ChainedIds.ROOT
    pieces: list[tuple[Hashable, int, int]] = []
    room = block_tokens
    for key, length in segments:
        pos = 0
        while pos < length:
            take = min(room, length - pos)
            pieces.append((key, pos, pos + take))
            pos += take
            room -= take
            if room == 0:
                parent = ids.child(parent, tuple(pieces))
                out.append(parent)
                pieces, room = [], block_tokens
    if pieces:
        out.append(ids.child(parent, tuple(pieces)))
    return tuple(out)


class _Builder:
    """Collects requests, allocates their ids, and sorts them into a Trace."""

    def __init__(self, kind: str, params: GenParams) -> None:
        self.kind = kind
        self.params = params
        self.ids = ChainedIds()
        self.reqs: list[TraceRequest] = []

    def add(
        self,
        t: float,
        segments: Sequence[Segment],
        output: int,
        request_id: str,
        session_id: str | None = None,
        parent_id: str | None = None,
        turn: int | None = None,
    ) -> None:
        self.reqs.append(
            TraceRequest(
                timestamp_s=t,
                input_length=sum(n for _, n in segments),
                output_length=output,
                hash_ids=block_ids(segments, self.params.block_tokens, self.ids),
                request_id=request_id,
                session_id=session_id,
                parent_id=parent_id,
                turn=turn,
                kind=self.kind,
            )
        )

    def trace(self) -> Trace:
        reqs = sorted(self.reqs, key=lambda r: r.timestamp_s)
        t0 = reqs[0].timestamp_s if reqs else 0.0
        if t0:
            reqs = [msgspec.structs.replace(r, timestamp_s=r.timestamp_s - t0) for r in reqs]
        meta: dict[str, str | int | float | bool | None] = {"generator": self.kind}
        meta.update(msgspec.structs.asdict(self.params))
        return Trace(requests=tuple(reqs), block_tokens=self.params.block_tokens, name=self.kind, meta=meta)


# --- generators ---------------------------------------------------------------------------------


def multi_turn_chat(p: ChatParams) -> Trace:
    rng = random.Random(p.seed)
    b = _Builder("chat", p)
    t = 0.0
    for s in range(p.sessions):
        t += rng.expovariate(p.rate)
        history: list[Segment] = [(("sys", rng.randrange(p.system_prompts)), p.system_tokens)]
        at, parent = t, None
        for turn in range(1, geometric(rng, p.turns_mean) + 1):
            history.append((("user", s, turn), lognormal_tokens(rng, p.user_tokens_mean, p.user_tokens_cv)))
            if sum(n for _, n in history) > p.max_input_tokens:
                break
            answer = lognormal_tokens(rng, p.answer_tokens_mean, p.answer_tokens_cv)
            rid = f"chat-{s}-{turn}"
            b.add(at, history, answer, rid, f"chat-{s}", parent, turn)
            history.append((("answer", s, turn), answer))
            at += answer / p.decode_tps + _exp(rng, p.think_time_s)
            parent = rid
    return b.trace()


def agent_sessions(p: AgentParams) -> Trace:
    rng = random.Random(p.seed)
    b = _Builder("agent", p)
    t = 0.0
    for s in range(p.sessions):
        t += rng.expovariate(p.rate)
        history: list[Segment] = [
            ("agent-sys", p.system_tokens),
            (("task", s), lognormal_tokens(rng, p.task_tokens_mean, p.task_tokens_cv)),
        ]
        at, parent, turn, done = t, None, 0, False
        for burst in range(geometric(rng, p.bursts_mean)):
            if burst:
                at += _exp(rng, p.pause_s)
            for call in range(geometric(rng, p.calls_per_burst_mean)):
                if call:
                    at += _exp(rng, p.tool_latency_s)
                if sum(n for _, n in history) > p.max_input_tokens:
                    done = True
                    break
                turn += 1
                out = lognormal_tokens(rng, p.call_tokens_mean, p.call_tokens_cv)
                rid = f"agent-{s}-{turn}"
                b.add(at, history, out, rid, f"agent-{s}", parent, turn)
                at += out / p.decode_tps
                history.append((("call", s, turn), out))
                result = lognormal_tokens(rng, p.tool_result_tokens_mean, p.tool_result_tokens_cv)
                history.append((("tool", s, turn), result))
                parent = rid
            if done:
                break
    return b.trace()


def shared_system_prompts(p: SharedPromptParams) -> Trace:
    rng = random.Random(p.seed)
    b = _Builder("shared-prompt", p)
    apps = Zipf(p.system_prompts, p.prompt_zipf)
    user_app = [apps.draw(rng) for _ in range(p.users)]
    t = 0.0
    for i in range(p.requests):
        t += rng.expovariate(p.rate)
        u = rng.randrange(p.users)
        segs: list[Segment] = [(("sys", user_app[u]), p.system_tokens), (("ctx", u), p.user_context_tokens)]
        segs.append((("msg", i), lognormal_tokens(rng, p.user_tokens_mean, p.user_tokens_cv)))
        out = lognormal_tokens(rng, p.output_tokens_mean, p.output_tokens_cv)
        b.add(t, segs, out, f"shared-{i}", f"user-{u}")
    return b.trace()


def zipf_documents(p: RagParams) -> Trace:
    rng = random.Random(p.seed)
    b = _Builder("rag", p)
    docs = Zipf(p.documents, p.zipf_s)
    doc_len = [lognormal_tokens(rng, p.doc_tokens_mean, p.doc_tokens_cv) for _ in range(p.documents)]
    t = 0.0
    for i in range(p.requests):
        t += rng.expovariate(p.rate)
        segs: list[Segment] = [("rag-sys", p.system_tokens)]
        for d in _distinct(rng, docs, min(p.docs_per_request, p.documents)):
            segs.append((("doc", d), doc_len[d]))
        segs.append((("q", i), lognormal_tokens(rng, p.question_tokens_mean, p.question_tokens_cv)))
        out = lognormal_tokens(rng, p.output_tokens_mean, p.output_tokens_cv)
        b.add(t, segs, out, f"rag-{i}")
    return b.trace()


def _exp(rng: random.Random, mean: float) -> float:
    return rng.expovariate(1 / mean) if mean > 0 else 0.0


def _distinct(rng: random.Random, z: Zipf, k: int) -> list[int]:
    out: list[int] = []
    while len(out) < k:
        d = z.draw(rng)
        if d not in out:
            out.append(d)
    return out


GENERATORS: dict[str, tuple[type[GenParams], Callable[[Any], Trace]]] = {
    "chat": (ChatParams, multi_turn_chat),
    "agent": (AgentParams, agent_sessions),
    "shared-prompt": (SharedPromptParams, shared_system_prompts),
    "rag": (RagParams, zipf_documents),
}


def generate(kind: str, **params: Any) -> Trace:
    """Build the named generator's parameters (validated: errors name the field) and run it."""
    try:
        cls, fn = GENERATORS[kind]
    except KeyError:
        raise ValueError(f"unknown generator {kind!r}; expected one of {', '.join(GENERATORS)}") from None
    return fn(msgspec.convert(params, cls))


# traces/agentic.py builds on this module's helpers and adds itself to GENERATORS when imported;
# importing it here makes ``generate("agentic", ...)`` and the CLI see it whichever loads first.
from . import agentic as _agentic  # noqa: E402,F401
