"""A replica's settings apart from the engine model's (``EngineConfig``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .faults import FaultConfig
from .publisher import DEFAULT_BUFFER_STEPS, DEFAULT_HWM, DEFAULT_TOPIC

DEFAULT_CHAT_MAX_TOKENS = 256
KV_EVENT_HASHES = ("vllm", "engine")


@dataclass
class ReplicaConfig:
    """Everything about one replica that is not the engine model."""

    model: str = "tiny"
    host: str = "127.0.0.1"
    port: int = 0  # 0: any free port
    # KV events. With ``events_bind`` None the vLLM heuristic decides bind vs connect.
    events_endpoint: str | None = "tcp://127.0.0.1:*"
    events_bind: bool | None = None
    replay_endpoint: str | None = "tcp://127.0.0.1:*"
    topic: str = DEFAULT_TOPIC
    buffer_steps: int = DEFAULT_BUFFER_STEPS
    hwm: int = DEFAULT_HWM
    legacy_events: bool = False
    int_block_hashes: bool = True  # False: raw 32-byte digests (VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0)
    # Block hashes in KV events: "vllm" = vLLM's sha256 values for the same tokens; "engine" = the
    # engine's own xxh3 identity (vllm_hashes.EngineEventHashes says when that is enough, and why).
    kv_event_hashes: str = "vllm"
    max_model_len: int = 2048
    default_chat_max_tokens: int = DEFAULT_CHAT_MAX_TOKENS
    # vLLM's --stream-interval: a stream sends its first token at once, then every this many
    # tokens, and the last ones when it finishes. A request's "stream_interval" can raise it.
    stream_interval: int = 1
    faults: FaultConfig = field(default_factory=FaultConfig)
    seed: int = 0
    # PD (NixlConnector, engines/sim/replica/nixl.py): which legs this replica serves, how long a
    # prefill pins its blocks for the decode side, and what decode does when the read fails.
    role: str = "both"
    kv_lease_s: float = 30.0
    kv_load_failure_policy: str = "fail"
