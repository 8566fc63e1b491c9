"""Router: prompt keys -> index match -> policy -> dispatch accounting. No I/O.

The proxy (live) and the offline simulator (virtual time) both drive this one object, so what the
replay measures is what production runs. Lifecycle of one request::

    req = router.request_info(model, token_ids=... | text=... | messages=...)
    replica = router.select(req)                 # sync; raises NoReplicaAvailable
    ticket = router.dispatch(req, replica)       # in-flight += 1, speculative index insert
    router.first_token(ticket, ttft_s)           # prefill done: pending prefill released
    router.finish(ticket, ok, cached_tokens)     # in-flight -= 1, parity bookkeeping

Load is counted at dispatch, before any byte is sent, so concurrent arrivals see each other.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from xxhash import xxh3_64_intdigest

from .errors import ModelNotFound, NoReplicaAvailable, Overloaded
from .hashing import model_seed, render_messages, token_bytes
from .index import PrefixIndex
from .media_keys import media_digest
from .prefix_tokens import ChainCache
from .replicas.registry import Replica, ReplicaRegistry
from .response_affinity import ResponseAffinity
from .scoring.churn import CHURN_TAU_S
from .scoring.pipeline import Explanation
from .scoring.policies import Policy
from .scoring.ttft import cpu_tier_credit
from .sessions.tracker import SessionTracker
from .types import BlockHash, KeyMode, ReplicaId, RequestInfo

if TYPE_CHECKING:
    from .replicas.outliers import OutlierDetector

log = logging.getLogger("kvrouter.routing")


class Tokenizer(Protocol):
    @property
    def has_chat_template(self) -> bool: ...
    def encode_prompt(self, text: str) -> list[int]: ...
    def encode_chat(self, messages: Sequence[Mapping[str, Any]]) -> list[int]: ...


class RoutingObserver(Protocol):
    def on_decision(self, replica: Replica, seconds: float, req: RequestInfo) -> None: ...
    def on_finish(self, ticket: Ticket, ok: bool, cached_tokens: int | None) -> None: ...


@dataclass(slots=True)
class Ticket:
    replica: Replica
    prompt_tokens: int
    predicted_cached_tokens: int
    pending_tokens: int  # added to replica.pending_prefill_tokens until the first token
    dispatched_at: float
    cpu_tokens: int = (
        0  # predicted to load from the CPU tier (LMCache); pending_tokens holds their uncredited part
    )
    recompute_tokens: int = 0  # of the prompt, predicted to be computed (with cpu_tokens: the rest of it)
    first_token_at: float | None = None
    backlog_tokens: int = 0  # the replica's pending prefill ahead of this request at dispatch
    remote_prefill: bool = False  # PD leg 2: its TTFT is the KV transfer, not this replica's prefill
    done: bool = False
    matched_blocks: int = 0  # GPU prefix matched on this replica (speculative + confirmed)
    confirmed_blocks: int = 0  # of those, confirmed by the replica's KV events
    confirmed_tokens: int = 0  # predicted_cached_tokens counting confirmed blocks only


@dataclass(frozen=True, slots=True)
class RouterLimits:
    """Per-replica admission: ``Overloaded`` (429, ``Retry-After: retry_after_s``) once every
    candidate holds ``max_in_flight_per_replica`` requests (0: no cap)."""

    max_in_flight_per_replica: int = 0
    retry_after_s: int = 1


class Router:
    def __init__(
        self,
        index: PrefixIndex,
        registry: ReplicaRegistry,
        policy: Policy,
        *,
        block_size: int = 16,
        bytes_per_token: int = 4,
        max_blocks: int = 8192,
        speculative_ttl_s: float = 30.0,
        approximate_ttl_s: float = 300.0,
        tokenizer: Tokenizer | None = None,
        clock: Callable[[], float] = time.monotonic,
        observer: RoutingObserver | None = None,
        limits: RouterLimits = RouterLimits(),
        on_overload: Callable[[], None] = lambda: None,
        sessions: SessionTracker | None = None,
        outliers: OutlierDetector | None = None,
    ) -> None:
        self.index = index
        self.registry = registry
        self.policy = policy
        self.block_size = block_size
        self.bytes_per_token = bytes_per_token
        self.max_blocks = max_blocks
        self.speculative_ttl_s = speculative_ttl_s
        # CPU-tier credit until the rates are measured, and the configured load rate (app.py sets
        # both from routing.cpu_tier_credit and lmcache.load_tps, like the scorers').
        self.cpu_credit = 0.8
        self.cpu_load_tps = 0.0
        self.approximate_ttl_s = approximate_ttl_s
        self.tokenizer = tokenizer
        # the next turn of a conversation hashes only its new blocks
        self._chains = ChainCache()
        self.clock = clock
        self.observer = observer
        self.limits = limits
        self.on_overload = on_overload
        self.sessions = sessions  # agent sessions: home lookup before the policy, record at dispatch
        self.outliers = outliers  # thins candidates by outlier state (replicas/outliers.py)
        self.responses = ResponseAffinity()  # /v1/responses id -> replica (engine-local store)

    def default_model(self) -> str | None:
        """The model a request without ``model`` gets: vLLM serves it with its first served
        name, which is the fleet's only model when it serves one (else: any replica, unkeyed
        by model)."""
        models = self.registry.known_models()
        return next(iter(models)) if len(models) == 1 else None

    # ---- request keys ---------------------------------------------------------------------

    def request_info(
        self,
        model: str | None,
        *,
        token_ids: Sequence[int] | None = None,
        text: str | None = None,
        messages: Sequence[Mapping[str, Any]] | None = None,
        cache_salt: str | None = None,
        max_tokens: int = 0,
        stream: bool = False,
        block_hashes: Sequence[BlockHash] | None = None,
        prompt_tokens: int | None = None,
        session_id: str | None = None,
    ) -> RequestInfo:
        """Build the routing view of a request. Exactly one prompt form is used, first match:
        precomputed ``block_hashes`` (simulator), ``token_ids``, ``text`` / ``messages`` through
        the tokenizer when configured, else the canonical bytes of ``text`` / ``messages``."""
        bs = self.block_size
        req = RequestInfo(
            model=model,
            prompt_tokens=0,
            block_size=bs,
            max_tokens=max_tokens,
            stream=stream,
            now=self.clock(),
        )
        req.session_id = session_id
        if not self.policy.needs_match and block_hashes is None:
            # Simple policies never look at blocks: skip hashing entirely.
            req.prompt_tokens = prompt_tokens or _estimate_tokens(
                token_ids, text, messages, self.bytes_per_token
            )
            return req
        if block_hashes is not None:
            req.block_hashes = list(block_hashes)
            req.prompt_tokens = prompt_tokens if prompt_tokens is not None else len(block_hashes) * bs
            req.key_mode = KeyMode.TOKENS
            return req
        if token_ids is None and self.tokenizer is not None:
            if messages is not None:
                if self.tokenizer.has_chat_template:  # else: byte mode below, never a 500
                    try:
                        token_ids = self.tokenizer.encode_chat(messages)
                    except LookupError:  # chat_messages.MediaNotModeled: byte mode, never as text
                        token_ids = None
            elif text is not None:
                token_ids = self.tokenizer.encode_prompt(text)
        seed = model_seed(self.registry.key_model(model) if model else "", cache_salt)
        if messages is not None and (media := media_digest(messages)) is not None:
            # keyed distinctly, never confirmable (media_keys.py)
            req.confirmable = False
            if token_ids is not None:  # the template rendered a placeholder: the media decides
                seed = BlockHash(xxh3_64_intdigest(media.to_bytes(8, "little"), seed))
        if token_ids is not None:
            if bs <= 0:
                raise ValueError(f"block_size must be positive, got {bs}")
            req.block_hashes = self._chains.hashes(token_bytes(token_ids), bs * 4, seed, self.max_blocks)
            req.prompt_tokens = len(token_ids)
            req.token_ids = token_ids
            req.key_mode = KeyMode.TOKENS
            return req
        data = (text if text is not None else render_messages(messages or ())).encode()
        req.block_hashes = self._chains.hashes(data, bs * self.bytes_per_token, seed, self.max_blocks)
        req.prompt_tokens = max(1, len(data) // self.bytes_per_token)
        req.key_mode = KeyMode.BYTES
        return req

    # ---- selection ------------------------------------------------------------------------

    def candidates(self, model: str | None, exclude: Sequence[ReplicaId] = ()) -> list[Replica]:
        cands = self.registry.candidates(model)
        if not cands:
            if model is not None and self.registry.known_models() and not self.registry.serves(model):
                raise ModelNotFound(model)
            raise NoReplicaAvailable(model)
        if exclude:
            cands = [r for r in cands if r.id not in exclude]
            if not cands:
                raise NoReplicaAvailable(model)
        cap = self.limits.max_in_flight_per_replica
        if cap:
            cands = [r for r in cands if r.in_flight < cap]
            if not cands:
                self.on_overload()
                raise Overloaded(
                    "Every replica is at its concurrency limit.", retry_after=self.limits.retry_after_s
                )
        if self.outliers is not None:
            cands = self.outliers.admit(cands)
        return cands

    def select(
        self,
        req: RequestInfo,
        exclude: Sequence[ReplicaId] = (),
        explain: Explanation | None = None,
        *,
        record: bool = True,
    ) -> Replica:
        """``record=False`` (``/debug/route``) leaves the decision-latency metric alone."""
        t0 = time.perf_counter()
        if req.pin is not None and req.pin not in exclude:
            # affinity the engine requires (its response store, a DP rank): any routable replica
            # serving the model, before outlier thinning; elsewhere vLLM would answer 404
            pinned = pinned_candidate(self.registry.candidates(req.model), req.pin)
            if pinned is not None:
                if record and self.observer is not None:
                    self.observer.on_decision(pinned, time.perf_counter() - t0, req)
                return pinned
        cands = self.candidates(req.model, exclude)
        if req.block_hashes and self.policy.needs_match:
            req.gpu_blocks, req.any_tier_blocks = self.index.match(req.block_hashes)
            # maintained by the KV-event layer through index.set_uncertain: O(1) here
            req.uncertain_slots = self.index.uncertain_slots
            if self.sessions is not None:
                self.sessions.annotate(req, cands)
        replica = self.policy.select(req, cands, explain)
        if record and self.observer is not None:
            self.observer.on_decision(replica, time.perf_counter() - t0, req)
        return replica

    # ---- accounting -----------------------------------------------------------------------

    def predicted_cached_tokens(self, req: RequestInfo, replica: Replica) -> int:
        """Tokens the engine should reuse: full GPU blocks matched, never the last prompt token
        (vLLM recomputes at least one token, so a fully cached prompt hits n-1 rounded down)."""
        s = replica.slot
        blocks = req.gpu_blocks[s] if s < len(req.gpu_blocks) else 0
        if blocks == 0 or req.key_mode is not KeyMode.TOKENS:
            return 0
        cap = ((req.prompt_tokens - 1) // req.block_size) * req.block_size
        return max(0, min(blocks * req.block_size, cap))

    def dispatch(self, req: RequestInfo, replica: Replica) -> Ticket:
        predicted = self.predicted_cached_tokens(req, replica)
        if req.key_mode is KeyMode.BYTES:
            s = replica.slot
            matched = req.gpu_blocks[s] if s < len(req.gpu_blocks) else 0
            predicted_effective = min(req.prompt_tokens, matched * req.block_size)
        else:
            predicted_effective = predicted
        pending = 0 if req.remote_prefill else max(0, req.prompt_tokens - predicted_effective)
        backlog = replica.pending_prefill_tokens
        # A CPU-tier (LMCache) hit is loaded, not prefilled: it queues only the recompute time the
        # load does not save (scoring/ttft.py's credit), not the whole recompute.
        cpu = self._cpu_tokens(req, replica, pending)
        recompute = pending - cpu
        if cpu:
            credit = cpu_tier_credit(
                replica.prefill_tps, replica.cpu_load_tps or self.cpu_load_tps, self.cpu_credit
            )
            pending -= int(cpu * credit)
        replica.in_flight += 1
        replica.pending_prefill_tokens += pending
        now = req.now or self.clock()
        replica.add_churn(pending, now, CHURN_TAU_S)
        if pending:
            replica.add_arrival(now, CHURN_TAU_S)
        matched = confirmed = 0
        if req.key_mode is KeyMode.TOKENS and req.gpu_blocks:
            s = replica.slot
            matched = req.gpu_blocks[s] if s < len(req.gpu_blocks) else 0
            if matched and replica.has_kv_events:
                confirmed = self.index.confirmed_blocks(replica.id, req.block_hashes, matched)
        confirmed_tokens = min(predicted, confirmed * req.block_size)
        if req.block_hashes and self.policy.needs_match:
            # Keys an event can confirm wait speculative_ttl_s for it; keys no event can ever
            # confirm (byte mode, media keyed by bytes) keep the approximate TTL whether or not
            # the replica publishes events (audit #49).
            confirmable = replica.has_kv_events and req.key_mode is KeyMode.TOKENS and req.confirmable
            ttl = self.speculative_ttl_s if confirmable else self.approximate_ttl_s
            self.index.store(replica.id, req.block_hashes, speculative=True, ttl_s=ttl)
            for hashes in req.batch_block_hashes:
                self.index.store(replica.id, hashes, speculative=True, ttl_s=ttl)
            if self.sessions is not None:
                self.sessions.record(req, replica)
        return Ticket(
            replica,
            req.prompt_tokens,
            predicted,
            pending,
            self.clock(),
            cpu,
            recompute,
            backlog_tokens=backlog,
            matched_blocks=matched,
            confirmed_blocks=confirmed,
            confirmed_tokens=confirmed_tokens,
            remote_prefill=req.remote_prefill,
        )

    @staticmethod
    def _cpu_tokens(req: RequestInfo, replica: Replica, pending: int) -> int:
        """Prompt tokens beyond the GPU hit that the CPU tier should load (whole chunks, as
        the index matched them), at most the uncached part."""
        s = replica.slot
        if req.key_mode is not KeyMode.TOKENS or s >= len(req.any_tier_blocks):
            return 0
        extra = (req.any_tier_blocks[s] - req.gpu_blocks[s]) * req.block_size
        return max(0, min(extra, pending))

    def first_token(self, ticket: Ticket, ttft_s: float | None = None) -> None:
        if ticket.first_token_at is not None or ticket.done:
            return
        now = self.clock()
        ticket.first_token_at = now
        rep = ticket.replica
        rep.pending_prefill_tokens = max(0, rep.pending_prefill_tokens - ticket.pending_tokens)
        ttft = now - ticket.dispatched_at if ttft_s is None else ttft_s
        if ticket.cpu_tokens:  # part loaded, not computed: teaches the load rate, not the prefill rate
            rep.observe_cpu_load(ttft, ticket.recompute_tokens, ticket.cpu_tokens)
        else:
            rep.observe_ttft(ttft, ticket.pending_tokens, ticket.backlog_tokens)
        if self.outliers is not None and not ticket.remote_prefill:
            # Per token of prefill work: its own uncached tokens and those queued ahead of it, so
            # a replica that is merely busier than its peers does not look slower.
            self.outliers.observe_ttft(rep, ttft, ticket.pending_tokens + ticket.backlog_tokens)

    def observe_itl(self, ticket: Ticket, itl_s: float) -> None:
        """Mean gap between the chunks of one relayed stream (the outlier detector's ITL)."""
        if self.outliers is not None:
            self.outliers.observe_itl(ticket.replica, itl_s)

    def finish(self, ticket: Ticket, ok: bool = True, cached_tokens: int | None = None) -> None:
        if ticket.done:
            return
        ticket.done = True
        rep = ticket.replica
        if ticket.first_token_at is None:
            rep.pending_prefill_tokens = max(0, rep.pending_prefill_tokens - ticket.pending_tokens)
        rep.in_flight = max(0, rep.in_flight - 1)
        if self.observer is not None:
            self.observer.on_finish(ticket, ok, cached_tokens)


def pinned_candidate(cands: Sequence[Replica], pin: ReplicaId) -> Replica | None:
    for r in cands:
        if r.id == pin:
            return r
    return None


def _estimate_tokens(
    token_ids: Sequence[int] | None,
    text: str | None,
    messages: Sequence[Mapping[str, Any]] | None,
    bytes_per_token: int,
) -> int:
    if token_ids is not None:
        return len(token_ids)
    if text is not None:
        return max(1, len(text) // bytes_per_token)
    if messages is not None:
        return max(1, len(render_messages(messages)) // bytes_per_token)
    return 0
