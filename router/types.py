"""Small shared types of the request path.

Everything here is imported by the hot path, so it stays dependency-free and cheap: NewTypes for
ids and hashes (no runtime cost), an IntEnum for cache tiers, and a slots class for the per-request
routing view that the pipeline fills once and scorers only read.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import NewType

# A block hash in the router's own chain (hashing.py): an unsigned 64-bit int. Engine hashes
# (vLLM's) are a different space; kv/stream.py maps engine hash -> BlockHash per replica.
BlockHash = NewType("BlockHash", int)
# A replica's stable name: its base URL unless discovery gives it another name.
ReplicaId = NewType("ReplicaId", str)


class Tier(enum.IntEnum):
    """Where a replica holds a KV block. GPU hits skip prefill; CPU (LMCache) hits cost a load."""

    GPU = 0
    CPU = 1


class KeyMode(enum.Enum):
    TOKENS = "tokens"  # precise: blocks of block_size token ids, same chain the KV events confirm
    BYTES = "bytes"  # approximate: chunks of a canonical prompt rendering, speculation only
    NONE = "none"  # nothing to hash (e.g. embeddings passthrough)


@dataclass(slots=True)
class RequestInfo:
    """What the pipeline knows about one request when it selects a replica.

    Filled once per request by the router (hashing + one index pass); scorers read it and never
    touch the index. ``gpu_blocks`` / ``any_tier_blocks`` are indexed by replica *slot*
    (see replicas/registry.py), not by position in the candidate list, so the same arrays serve every scorer.
    """

    model: str | None  # None: any replica (a request without `model`, the fleet serving several)
    prompt_tokens: int  # exact in token mode, estimated (bytes / 4) in byte mode
    block_size: int  # tokens per block in token mode; tokens-equivalent in byte mode
    block_hashes: list[BlockHash] = field(default_factory=list)
    key_mode: KeyMode = KeyMode.NONE
    max_tokens: int = 0
    stream: bool = False
    now: float = 0.0  # router clock when the request arrived (scorers never read clocks)
    gpu_blocks: list[int] = field(default_factory=list)  # per slot: contiguous prefix on GPU
    any_tier_blocks: list[int] = field(default_factory=list)  # per slot: contiguous prefix on GPU or CPU
    # Slots whose index view missed KV events (PrefixIndex.uncertain_slots at selection time).
    uncertain_slots: AbstractSet[int] = frozenset()
    # False when no KV event can ever confirm these keys even in token mode (media the router
    # keys by its bytes, not by vLLM's placeholder tokens): they get the unconfirmed TTL.
    confirmable: bool = True
    # The other prompts of a batch (vLLM runs each as its own request): stored speculatively on
    # the chosen replica like the first, whose keys decide the routing.
    batch_block_hashes: list[list[BlockHash]] = field(default_factory=list)
    # Served by this replica when it is a candidate (a Responses `previous_response_id` held in
    # that engine's memory, a data-parallel rank): routing affinity that keys cannot express.
    pin: ReplicaId | None = None
    # Called with the first response bytes and the replica that sent them (Responses API ids).
    on_response: Callable[[bytes, ReplicaId], None] | None = None
    # PD leg 2: the prompt's KV arrives from a prefill replica, so the decode replica has no
    # prefill work queued for it and its first token says nothing about its prefill rate.
    remote_prefill: bool = False
    token_ids: Sequence[int] | None = None  # token mode: the prompt (LMCache lookups send it)
    # Agent sessions (router/sessions/): the key, and the session table's answer for the scorer.
    session_id: str | None = None
    session_home: int = -1  # slot of the replica holding the session's KV; -1 new, -2 home gone
    session_keep: float = 0.0  # fraction of the session's last prompt the home still holds (0..1)
    session_overlap: float = 1.0  # share of this prompt that is the session's last prompt (0: not extended)

    @property
    def total_blocks(self) -> int:
        return len(self.block_hashes)


@dataclass(frozen=True, slots=True)
class ReplicaSpec:
    """A replica as discovery sees it (static flags, DNS, Kubernetes). Identity is ``url``.

    ``kv_events`` / ``kv_replay`` are ZMQ endpoints (``tcp://host:port``). ``None`` means "ask
    the replica's ``/kv_event_sources``" when events are enabled, and speculation only if it has
    none. ``kv_events_bind`` makes the router's SUB socket bind instead of connect (for engines
    configured with a concrete host, which then connect: vLLM's bind/connect rule).
    """

    url: str
    name: str | None = None
    kv_events: str | None = None
    kv_replay: str | None = None
    kv_events_bind: bool = False
    models: tuple[str, ...] = ()  # known in advance (else learned from /v1/models)
    role: str = "both"  # prefill | decode | both (router/pd/roles.py)

    @property
    def id(self) -> ReplicaId:
        return ReplicaId(self.name or self.url)
