"""Router configuration: one msgspec Struct per component, defaults here, validation here.

Every option has one dotted path (``upstream.connect_timeout_s``) and is settable three ways, in
increasing precedence: YAML file (``--config``, nested like the path), environment variable
``KVROUTER_<FLAG>`` (flag name upper-cased, dashes -> underscores), command-line flag. The table
``OPTIONS`` is the single source of that mapping; cli and docs are generated from it.

Invalid values are refused at start-up with ``ConfigError(field, value, reason)``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import msgspec
import yaml

from .discovery.base import DiscoveryConfig, http_url_problem
from .sessions.config import SessionsConfig

NonNeg = Annotated[float, msgspec.Meta(ge=0)]
Pos = Annotated[float, msgspec.Meta(gt=0)]
PosInt = Annotated[int, msgspec.Meta(gt=0)]
NonNegInt = Annotated[int, msgspec.Meta(ge=0)]
Ratio = Annotated[float, msgspec.Meta(ge=0, le=1)]


class ConfigError(ValueError):
    def __init__(self, field: str, value: Any, reason: str) -> None:
        super().__init__(f"invalid configuration: {field}={value!r}: {reason}")
        self.field = field
        self.value = value
        self.reason = reason


class ServerConfig(msgspec.Struct, forbid_unknown_fields=True):
    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8080
    workers: PosInt = 1  # processes sharing the port with SO_REUSEPORT
    max_body_bytes: PosInt = 32 * 1024 * 1024
    max_header_bytes: PosInt = 16 * 1024
    # Open client connections beyond this get a canned 503 and are closed at once, so a flood of
    # idle sockets cannot grow memory without bound. -1: half the fd limit (RLIMIT_NOFILE) less a
    # reserve, so the process never runs out of descriptors first; 0: no cap.
    max_connections: Annotated[int, msgspec.Meta(ge=-1)] = -1
    # Hostile clients (router/http/client_limits.py, docs/reliability.md): deadlines for reading a
    # request, bytes of bodies buffered across connections, optional per-address limits.
    head_timeout_s: Pos = 10.0  # whole request head, from its first byte
    body_timeout_s: Pos = 10.0  # body: this much plus length / body_min_rate
    body_min_rate: PosInt = 64 * 1024  # bytes/s a body must sustain
    keepalive_timeout_s: Pos = 75.0  # idle connection between requests
    max_buffered_body_bytes: NonNegInt = 256 * 1024 * 1024  # all connections together (0 = no cap)
    max_connections_per_client: NonNegInt = 0  # per client address (0 = no cap)
    max_requests_per_client_s: NonNeg = 0.0  # per client address, burst = 2 s worth (0 = no cap)
    reject_log_per_s: NonNeg = 5.0  # log lines about rejected requests, at most (0 = none)
    replica_header: bool = True  # add x-kvrouter-replica to every proxied response
    fast_path: bool = True  # raw HTTP/1.1 serving of the two generate endpoints (router/http/fastpath.py)
    api_keys: list[str] = msgspec.field(default_factory=list)  # router's own Bearer keys
    enable_debug: bool = False  # POST /debug/route, GET /debug/replicas
    admin_token: str | None = None  # required for debug endpoints when set
    drain_grace_s: NonNeg = 5.0  # after SIGTERM: keep accepting while endpoints deregister
    drain_timeout_s: NonNeg = 30.0  # then let in-flight requests finish for at most this long
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_prompts: bool = False


class UpstreamConfig(msgspec.Struct, forbid_unknown_fields=True):
    connect_timeout_s: Pos = 2.0
    # Per attempt; all attempts of a request together get retry_budget_s (docs/reliability.md).
    first_byte_timeout_s: Pos = 30.0  # streams: headers + first chunk (queueing + prefill)
    request_timeout_s: Pos = 60.0  # non-streaming: the whole answer (it arrives in one piece)
    retry_budget_s: Pos = 60.0  # a request's attempts before its first byte, together
    idle_timeout_s: Pos = 60.0  # max gap between two chunks of a response
    max_retries: NonNegInt = 2  # extra replicas tried before the first byte reached the client
    api_key: str | None = None  # Bearer key the router presents to engines
    pool_per_replica: PosInt = 512  # keep-alive connections per replica


class HealthConfig(msgspec.Struct, forbid_unknown_fields=True):
    probe_interval_s: Pos = 2.0
    probe_timeout_s: Pos = 1.0
    eject_after_failures: PosInt = 3  # consecutive failed requests or probes
    # Request failures (not probes) never eject more than this share of a pool at once (at least
    # one of two or more): a fleet too loaded to accept connections must not be emptied.
    max_ejected_fraction: Ratio = 0.5
    readmit_after_successes: PosInt = 1  # consecutive passing probes
    metrics_interval_s: Pos = 0.25  # engine /metrics scrape (off: scrape_metrics false)
    scrape_metrics: bool = True
    models_interval_s: Pos = 30.0


class OutlierSettings(msgspec.Struct, forbid_unknown_fields=True):
    """Sick-but-alive replicas (router/replicas/outliers.py, canary.py; docs/reliability.md)."""

    enabled: bool = True
    interval_s: Pos = 1.0  # how often the detector compares replicas
    window_s: Pos = 30.0  # samples older than this are forgotten
    min_samples: PosInt = 8  # per replica and signal, before it is judged
    factor: Annotated[float, msgspec.Meta(gt=1)] = 2.5  # worse than the peers' median by this: degraded
    # ITL needs more: chunked prefill makes a busy replica's decode steps several times longer
    # (measured: healthy replicas reach 2.7x their peers under round robin on Mooncake)
    itl_factor: Annotated[float, msgspec.Meta(gt=1)] = 4.0
    eject_after_s: Pos = 5.0  # degraded this long in a row: ejected
    degraded_weight: Ratio = 0.2  # share of a degraded replica relative to a healthy one
    success_margin: Ratio = 0.2  # success rate this far under the peers' median counts as worse
    max_ejected_fraction: Ratio = 0.34  # of a model's replicas ejected at once (at least one of two+)
    base_ejection_s: Pos = 10.0  # x times ejected, capped by max_ejection_s
    max_ejection_s: Pos = 120.0
    slow_start_s: NonNeg = 10.0  # ramp of a joining/returning replica's share (0: none)
    slow_start_min_weight: Ratio = 0.05
    preemptions_per_s: Pos = 5.0  # vllm:num_preemptions_total rate that counts as sick
    kv_pinned_s: Pos = 10.0  # KV usage >= 99.9% this long counts as sick
    probe_grace_s: NonNeg = 10.0  # a success this recent outweighs failed /health probes
    canary_after_s: NonNeg = 10.0  # no success this long: one-token canary (0: off)
    canary_timeout_s: Pos = 3.0
    canary_body: dict[str, Any] = msgspec.field(
        default_factory=lambda: {"prompt": "ping", "max_tokens": 1, "temperature": 0}
    )  # POST /v1/completions body; "model" is filled in


class AdmissionConfig(msgspec.Struct, forbid_unknown_fields=True):
    max_in_flight: NonNegInt = 0  # whole router; 0 = unlimited
    max_in_flight_per_replica: NonNegInt = 0  # 0 = unlimited
    max_queue: NonNegInt = 1024  # requests waiting for a slot before 429
    queue_timeout_s: Pos = 30.0
    retry_after_s: PosInt = 1


class KVEventsSettings(msgspec.Struct, forbid_unknown_fields=True):
    mode: Literal["auto", "on", "off"] = "auto"  # auto: subscribe where /kv_event_sources says
    topic: str = ""
    endpoints: list[str] = msgspec.field(default_factory=list)  # "URL=tcp://host:port" pairs


class RoutingConfig(msgspec.Struct, forbid_unknown_fields=True):
    policy: str = "cache_aware"
    block_size: PosInt = 16  # tokens per block; replaced by the engines' cache_config_info
    bytes_per_token: PosInt = 4  # byte mode: a block is block_size * bytes_per_token bytes
    max_blocks: PosInt = 8192
    tokenizer: str | None = None  # folder with tokenizer.json (+ tokenizer_config.json)
    chat_template: str | None = None  # the engines' --chat-template (file or Jinja text)
    default_chat_template_kwargs: dict[str, Any] = msgspec.field(default_factory=dict)  # theirs too
    trust_request_chat_template: bool = False  # and theirs: render a request's own chat_template
    index_capacity: PosInt = 1 << 20  # blocks per replica (shrunk to num_gpu_blocks when known)
    # Prompt bounds before any work (router/http/prompt_limits.py): text longer than
    # max_model_len * this many characters cannot fit (vLLM's own bound is its vocabulary's longest
    # token); bodies above offload_parse_bytes are parsed off the event loop.
    max_chars_per_token: PosInt = 64
    offload_parse_bytes: PosInt = 1024 * 1024
    speculative_ttl_s: Pos = 30.0  # replicas with KV events: until the event confirms
    approximate_ttl_s: Pos = 300.0  # keys no event can confirm (no events, byte mode, media)
    weights: dict[str, float] = msgspec.field(default_factory=dict)  # scorer type -> weight
    load_factor: Annotated[float, msgspec.Meta(ge=1)] = 4.0  # bounded-load guard; docs/policy-tuning.md
    cpu_tier_credit: Ratio = 0.8
    seed: int | None = None  # tie-break RNG seed (tests, simulation)


class PDSettings(msgspec.Struct, forbid_unknown_fields=True):
    """Prefill/decode disaggregation (docs/disaggregation.md); on when any prefill replica exists."""

    rule: Literal["auto", "threshold", "always", "never"] = "auto"
    threshold_tokens: NonNegInt = 2048  # rule threshold: llm-d nonCachedTokens / Dynamo eff-isl
    threshold_max_cached_ratio: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None  # Dynamo's 0.7
    min_split_tokens: NonNegInt = 64  # fewer uncached tokens on the decode replica: never split
    stall_weight: NonNeg = 0.1  # TTFT seconds worth one request-second of decode slow-down
    handoff_overhead_s: NonNeg = 0.002
    link_bandwidth_bytes_s: Pos = 12.5e9  # P -> D KV link (one 100 Gb/s NIC)
    link_latency_s: NonNeg = 50e-6
    kv_bytes_per_token: PosInt = 131_072  # Llama-3-8B bf16
    check_version: bool = True  # pair only replicas whose GET /version agree
    prefill_timeout_s: Pos = 60.0  # leg 1 budget; past it: decode-only fallback
    both_prefill: bool = False  # `both` replicas run NixlConnector kv_both: remote prefill targets too
    # auto: remote must beat local by this share
    min_gain_ratio: Annotated[float, msgspec.Meta(ge=0, lt=1)] = 0.3
    leg1_drift: NonNeg = 0.25  # auto: extra wait on D while leg 1 runs, share of leg 1's estimate
    # auto: TTFT seconds per request-second a split's prefill adds to a `both` helper's later arrivals
    occupancy_weight: NonNeg = 1.0
    rate_z: NonNeg = 2.0  # auto: two `both` replicas' rates differ only beyond this many std errors


class LMCacheSettings(msgspec.Struct, forbid_unknown_fields=True):
    """vLLM + LMCache replicas (docs/lmcache.md): which replicas share an LMCache server's CPU
    tier, and the MP coordinator to ask when the tier publishes no KV events (lookup mode)."""

    instances: list[str] = msgspec.field(default_factory=list)  # "INSTANCE_ID=REPLICA" pairs
    credit_cpu_tier: bool = True  # false: ignore CPU-tier events and lookups (GPU-only routing, for A/B runs)
    coordinator_url: str | None = None  # lookup mode: POST {url}/directory/lookup
    model_name: str | None = None  # the model PATH vLLM was started with (the coordinator's key)
    chunk_tokens: PosInt = 256  # LMCache chunk_size
    lookup_min_tokens: NonNegInt = 256  # ask only for prompts of at least this many tokens
    lookup_timeout_s: Pos = 0.05  # a slower answer is dropped: the request routes without it
    lookup_cache_s: NonNeg = 2.0  # an answer is reused for this long for the same prefix
    breaker_failures: PosInt = 3  # consecutive failures that open the circuit breaker
    breaker_open_s: Pos = 10.0  # no lookups for this long once open, then one probe
    load_tps: NonNeg = 0.0  # CPU-tier load rate (tokens/s); 0: learn it, routing.cpu_tier_credit until then


class Config(msgspec.Struct, forbid_unknown_fields=True):
    backends: list[str] = msgspec.field(default_factory=list)
    prefill: list[str] = msgspec.field(default_factory=list)  # prefill-role replicas
    decode: list[str] = msgspec.field(default_factory=list)  # decode-role replicas
    pd: PDSettings = msgspec.field(default_factory=PDSettings)
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    upstream: UpstreamConfig = msgspec.field(default_factory=UpstreamConfig)
    health: HealthConfig = msgspec.field(default_factory=HealthConfig)
    admission: AdmissionConfig = msgspec.field(default_factory=AdmissionConfig)
    kv_events: KVEventsSettings = msgspec.field(default_factory=KVEventsSettings)
    routing: RoutingConfig = msgspec.field(default_factory=RoutingConfig)
    discovery: DiscoveryConfig = msgspec.field(default_factory=DiscoveryConfig)
    lmcache: LMCacheSettings = msgspec.field(default_factory=LMCacheSettings)
    sessions: SessionsConfig = msgspec.field(default_factory=SessionsConfig)
    outliers: OutlierSettings = msgspec.field(default_factory=OutlierSettings)


@dataclass(frozen=True, slots=True)
class Option:
    path: str  # dotted path in Config
    flag: str  # --flag (also KVROUTER_FLAG)
    help: str
    kind: Literal["str", "int", "float", "bool", "list", "json"] = "str"

    @property
    def env(self) -> str:
        return "KVROUTER_" + self.flag.upper().replace("-", "_")


OPTIONS: tuple[Option, ...] = (
    Option("backends", "backend", "replica base URL (repeatable; env: comma-separated)", "list"),
    Option("prefill", "prefill", "prefill-role replica base URL (repeatable; env: comma-separated)", "list"),
    Option("decode", "decode", "decode-role replica base URL (repeatable; env: comma-separated)", "list"),
    Option("pd.rule", "pd-rule", "split rule: auto | threshold | always | never"),
    Option("pd.both_prefill", "pd-both-prefill", "`both` replicas (kv_both) also prefill for others", "bool"),
    Option(
        "pd.threshold_tokens", "pd-threshold-tokens", "threshold rule: uncached tokens to split at", "int"
    ),
    Option("pd.stall_weight", "pd-stall-weight", "auto rule: weight of the decode batch stall", "float"),
    Option("pd.link_bandwidth_bytes_s", "pd-link-bandwidth", "P->D KV link bandwidth (bytes/s)", "float"),
    Option("pd.kv_bytes_per_token", "pd-kv-bytes-per-token", "KV cache bytes per token (all layers)", "int"),
    Option("pd.check_version", "pd-check-version", "refuse to pair replicas whose /version differ", "bool"),
    Option("server.host", "host", "listen address"),
    Option("server.port", "port", "listen port", "int"),
    Option("server.workers", "workers", "worker processes on one SO_REUSEPORT port", "int"),
    Option("server.max_body_bytes", "max-body-bytes", "largest accepted request body", "int"),
    Option(
        "server.max_header_bytes", "max-header-bytes", "longest accepted request line / header field", "int"
    ),
    Option(
        "server.max_connections",
        "max-connections",
        "open client connections before 503 + close (-1 = from the fd limit, 0 = no cap)",
        "int",
    ),
    Option("server.head_timeout_s", "head-timeout", "seconds to receive a whole request head", "float"),
    Option(
        "server.body_timeout_s", "body-timeout", "seconds for a body, plus length / --body-min-rate", "float"
    ),
    Option("server.body_min_rate", "body-min-rate", "bytes/s a request body must sustain", "int"),
    Option("server.keepalive_timeout_s", "keepalive-timeout", "idle client connection close (s)", "float"),
    Option(
        "server.max_buffered_body_bytes",
        "max-buffered-body-bytes",
        "request body bytes buffered across all connections (0 = no cap)",
        "int",
    ),
    Option(
        "server.max_connections_per_client",
        "max-connections-per-client",
        "open connections per client address (0 = no cap)",
        "int",
    ),
    Option(
        "server.max_requests_per_client_s",
        "max-requests-per-client",
        "requests/s per client address (0 = no cap)",
        "float",
    ),
    Option("server.reject_log_per_s", "reject-log-rate", "log lines/s about rejected requests", "float"),
    Option("server.replica_header", "replica-header", "add x-kvrouter-replica to responses", "bool"),
    Option(
        "server.fast_path", "fast-path", "serve the generate endpoints on the raw HTTP/1.1 fast path", "bool"
    ),
    Option("server.api_keys", "api-key", "accepted client Bearer key (repeatable)", "list"),
    Option("server.enable_debug", "enable-debug", "enable POST /debug/route", "bool"),
    Option("server.admin_token", "admin-token", "Bearer token required by debug endpoints"),
    Option("server.drain_grace_s", "drain-grace", "seconds to keep accepting after SIGTERM", "float"),
    Option(
        "server.drain_timeout_s", "drain-timeout", "seconds in-flight requests may take to finish", "float"
    ),
    Option("server.log_level", "log-level", "debug | info | warning | error"),
    Option("server.log_prompts", "log-prompts", "include prompts in debug logs", "bool"),
    Option("upstream.connect_timeout_s", "connect-timeout", "upstream connect timeout (s)", "float"),
    Option("upstream.first_byte_timeout_s", "first-byte-timeout", "upstream first-byte timeout (s)", "float"),
    Option("upstream.request_timeout_s", "request-timeout", "budget of a non-streaming request (s)", "float"),
    Option("upstream.idle_timeout_s", "idle-timeout", "max gap between upstream chunks (s)", "float"),
    Option(
        "upstream.retry_budget_s",
        "retry-budget",
        "seconds all attempts of a request may take before its first byte",
        "float",
    ),
    Option("upstream.max_retries", "max-retries", "other replicas tried before the first byte", "int"),
    Option("upstream.api_key", "upstream-api-key", "Bearer key sent to engines"),
    Option("health.probe_interval_s", "probe-interval", "active /health probe interval (s)", "float"),
    Option("health.eject_after_failures", "eject-after", "consecutive failures before ejection", "int"),
    Option(
        "health.max_ejected_fraction",
        "max-ejected",
        "share of a pool that request failures may eject at once (probes are not capped)",
        "float",
    ),
    Option("health.metrics_interval_s", "metrics-interval", "engine /metrics scrape interval (s)", "float"),
    Option("health.scrape_metrics", "scrape-metrics", "scrape engine /metrics", "bool"),
    Option("outliers.enabled", "outliers", "eject replicas slower/failing more than their peers", "bool"),
    Option("outliers.factor", "outlier-factor", "worse than the peers' median by this: degraded", "float"),
    Option(
        "outliers.itl_factor", "outlier-itl-factor", "inter-token latency this much worse: degraded", "float"
    ),
    Option("outliers.eject_after_s", "outlier-eject-after", "degraded this long: ejected (s)", "float"),
    Option("outliers.min_samples", "outlier-min-samples", "samples per signal before judging", "int"),
    Option(
        "outliers.max_ejected_fraction",
        "outlier-max-ejected",
        "share of a model's replicas ejected at once",
        "float",
    ),
    Option(
        "outliers.base_ejection_s",
        "outlier-ejection-time",
        "first ejection's length (s), x times ejected",
        "float",
    ),
    Option("outliers.interval_s", "outlier-interval", "outlier evaluation period (s)", "float"),
    Option(
        "outliers.probe_grace_s", "probe-grace", "a success this recent outweighs failed probes (s)", "float"
    ),
    Option("outliers.slow_start_s", "slow-start", "traffic ramp of a joining/returning replica (s)", "float"),
    Option(
        "outliers.canary_after_s",
        "canary-after",
        "no success this long: one-token canary (s, 0 off)",
        "float",
    ),
    Option("outliers.canary_timeout_s", "canary-timeout", "canary deadline (s)", "float"),
    Option("outliers.canary_body", "canary-body", "canary POST /v1/completions body (JSON object)", "json"),
    Option("admission.max_in_flight", "max-in-flight", "router-wide concurrent requests (0 = no cap)", "int"),
    Option(
        "admission.max_in_flight_per_replica",
        "max-in-flight-per-replica",
        "per replica cap (0 = none)",
        "int",
    ),
    Option("admission.max_queue", "max-queue", "requests queued for a slot before 429", "int"),
    Option("kv_events.mode", "kv-events", "auto | on | off"),
    Option("kv_events.endpoints", "kv-events-endpoint", "BACKEND_URL=tcp://host:port (repeatable)", "list"),
    Option("routing.policy", "policy", "routing policy"),
    Option("routing.block_size", "block-size", "tokens per KV block (learned from engines)", "int"),
    Option("routing.tokenizer", "tokenizer", "tokenizer folder for precise token-mode keys"),
    Option("routing.chat_template", "chat-template", "the engines' --chat-template (file or Jinja text)"),
    Option(
        "routing.default_chat_template_kwargs",
        "default-chat-template-kwargs",
        "the engines' --default-chat-template-kwargs (JSON object)",
        "json",
    ),
    Option(
        "routing.trust_request_chat_template",
        "trust-request-chat-template",
        "the engines' --trust-request-chat-template (else a request's chat_template is a 400)",
        "bool",
    ),
    Option("routing.index_capacity", "index-capacity", "indexed blocks per replica", "int"),
    Option(
        "routing.max_chars_per_token",
        "max-chars-per-token",
        "text prompt bound: max_model_len x this many characters",
        "int",
    ),
    Option(
        "routing.offload_parse_bytes",
        "offload-parse-bytes",
        "bodies larger than this are parsed off the event loop",
        "int",
    ),
    Option("routing.load_factor", "load-factor", "bounded-load guard: max load vs mean", "float"),
    Option("routing.seed", "seed", "tie-break RNG seed", "int"),
    Option(
        "lmcache.instances",
        "lmcache-instance",
        "INSTANCE_ID=REPLICA: replicas on one LMCache server (repeatable)",
        "list",
    ),
    Option(
        "lmcache.credit_cpu_tier",
        "lmcache-credit-cpu-tier",
        "credit the CPU (LMCache) tier (false: GPU-only routing)",
        "bool",
    ),
    Option("lmcache.coordinator_url", "lmcache-coordinator", "LMCache MP coordinator URL: lookup mode"),
    Option(
        "lmcache.model_name", "lmcache-model", "model path the engines were started with (coordinator key)"
    ),
    Option(
        "lmcache.lookup_min_tokens",
        "lmcache-lookup-min-tokens",
        "ask the coordinator only for longer prompts",
        "int",
    ),
    Option(
        "lmcache.lookup_timeout_s",
        "lmcache-lookup-timeout",
        "coordinator lookup budget per request (s)",
        "float",
    ),
    Option("lmcache.load_tps", "lmcache-load-tps", "CPU-tier load rate, tokens/s (0: learn it)", "float"),
    Option(
        "discovery.sources", "discovery", "static | dns | k8s (repeatable; default: whatever is set)", "list"
    ),
    Option("discovery.dns_name", "dns-name", "headless Service name to re-resolve"),
    Option("discovery.dns_prefill_name", "dns-prefill-name", "DNS name of the prefill pool"),
    Option("discovery.dns_decode_name", "dns-decode-name", "DNS name of the decode pool"),
    Option("discovery.dns_port", "dns-port", "HTTP port of replicas found by DNS", "int"),
    Option("discovery.dns_srv", "dns-srv", "use SRV records for ports", "bool"),
    Option("discovery.dns_interval_s", "dns-interval", "DNS re-resolution interval (s)", "float"),
    Option("discovery.k8s_namespace", "k8s-namespace", "namespace to watch (default: the pod's own)"),
    Option("discovery.k8s_service_name", "k8s-service", "Service whose EndpointSlices to watch"),
    Option("discovery.k8s_label_selector", "k8s-label-selector", "label selector for EndpointSlices or pods"),
    Option("discovery.k8s_port_name", "k8s-port-name", "named port of the engine HTTP API"),
    Option("discovery.k8s_events_port_name", "k8s-events-port-name", "named port of the KV-event publisher"),
    Option("discovery.k8s_resource", "k8s-resource", "endpointslices | pods"),
    Option("sessions.enabled", "sessions", "agent-session routing (keys, affinity, hints)", "bool"),
    Option("sessions.header", "session-header", "extra request header carrying the session key"),
    Option("sessions.body_field", "session-body-field", "top-level body field carrying the session key"),
    Option("sessions.infer", "session-infer", "infer sessions of keyless requests from the prefix", "bool"),
    Option(
        "sessions.capacity", "session-capacity", "sessions remembered (least recently used beyond)", "int"
    ),
    Option("sessions.idle_ttl_s", "session-idle-ttl", "seconds before an idle session is forgotten", "float"),
    Option(
        "sessions.priority_replicas",
        "priority-replica",
        "replica id/URL running priority scheduling, gets `priority` (repeatable; * = all)",
        "list",
    ),
    Option("sessions.token_header", "session-token-header", "answer with x-session-token", "bool"),
)

_BY_FLAG = {o.flag: o for o in OPTIONS}


def _set_path(tree: dict[str, Any], path: str, value: Any) -> None:
    node = tree
    parts = path.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(path, value, f"'{p}' is not a section")
    node[parts[-1]] = value


def parse_bool(raw: str) -> bool:
    """``1/true/yes/on`` or ``0/false/no/off``, any case: the one reading of a boolean string
    (environment values and ``--flag VALUE``). Raises ValueError otherwise."""
    low = raw.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true/false")


def _parse_scalar(opt: Option, raw: str) -> Any:
    """Environment strings -> typed values; the Struct validation then checks ranges."""
    try:
        if opt.kind == "int":
            return int(raw)
        if opt.kind == "float":
            return float(raw)
        if opt.kind == "bool":
            return parse_bool(raw)
        if opt.kind == "list":
            return [x.strip() for x in raw.split(",") if x.strip()]
        if opt.kind == "json":
            return json.loads(raw)
    except ValueError as exc:
        raise ConfigError(opt.path, raw, f"{opt.env}: {exc}") from None
    return raw


def load_yaml(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as exc:
        raise ConfigError("config", path, f"cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError("config", path, f"not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("config", path, "top level must be a mapping")
    return data


def build_config(
    yaml_tree: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> Config:
    """Merge YAML < environment < flags into a validated Config."""
    tree: dict[str, Any] = _deep_copy(dict(yaml_tree or {}))
    env = os.environ if env is None else env
    for opt in OPTIONS:
        if opt.env in env:
            _set_path(tree, opt.path, _parse_scalar(opt, env[opt.env]))
    for flag, value in (flags or {}).items():
        if value is None or (isinstance(value, list) and not value):
            continue
        _set_path(tree, _BY_FLAG[flag].path, value)
    try:
        cfg = msgspec.convert(tree, Config, strict=False)
    except msgspec.ValidationError as exc:
        raise _config_error(exc, tree) from None
    if cfg.backends or cfg.prefill or cfg.decode:
        # --backend/--prefill/--decode URLs are the static discovery source, whatever other
        # sources run beside it.
        d = cfg.discovery
        sources = d.sources
        if sources and "static" not in sources:
            sources = [*sources, "static"]
        cfg.discovery = msgspec.structs.replace(
            d,
            static=[u.rstrip("/") for u in (*cfg.backends, *d.static)],
            static_prefill=[u.rstrip("/") for u in (*cfg.prefill, *d.static_prefill)],
            static_decode=[u.rstrip("/") for u in (*cfg.decode, *d.static_decode)],
            sources=sources,
        )
    validate(cfg)
    return cfg


def _deep_copy(tree: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in tree.items()}


def _config_error(exc: msgspec.ValidationError, tree: Mapping[str, Any]) -> ConfigError:
    # msgspec says e.g. "Expected `float` >= 0, got -1 - at `$.upstream.connect_timeout_s`"
    msg = str(exc)
    field = "config"
    if " - at `$." in msg:
        msg, _, where = msg.partition(" - at `$.")
        field = where.rstrip("`")
    value: Any = tree
    for part in field.replace("[", ".").replace("]", "").split("."):
        if isinstance(value, Mapping) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            value = None
            break
    if field == "config":
        # Unknown field: "Object contains unknown field `x`"
        return ConfigError(field, None, msg)
    return ConfigError(field, value, msg)


def validate(cfg: Config) -> None:
    """Checks that need more than a type: URLs, names, cross-field rules."""
    for i, url in enumerate(cfg.backends):
        check_backend_url(f"backends[{i}]", url)
    for i, url in enumerate(cfg.prefill):
        check_backend_url(f"prefill[{i}]", url)
    for i, url in enumerate(cfg.decode):
        check_backend_url(f"decode[{i}]", url)
    for i, pair in enumerate(cfg.kv_events.endpoints):
        _backend, sep, endpoint = pair.partition("=")
        if not sep or not endpoint.startswith(("tcp://", "ipc://")):
            raise ConfigError(f"kv_events.endpoints[{i}]", pair, "expected BACKEND_URL=tcp://host:port")
    from .scoring.policies import DEFAULT_WEIGHTS, POLICIES

    if cfg.routing.policy not in POLICIES:
        raise ConfigError(
            "routing.policy", cfg.routing.policy, f"unknown policy; known: {', '.join(POLICIES)}"
        )
    for name, weight in cfg.routing.weights.items():
        if name not in DEFAULT_WEIGHTS:
            raise ConfigError(
                f"routing.weights.{name}", weight, f"unknown scorer; known: {', '.join(DEFAULT_WEIGHTS)}"
            )
        if weight < 0:
            raise ConfigError(f"routing.weights.{name}", weight, "weights must be >= 0")
    try:
        cfg.discovery.validate()
    except ValueError as exc:
        field, _, reason = str(exc).partition(": ")
        name, _, value = field.partition("=")
        raise ConfigError(f"discovery.{name}", value, reason) from None
    for i, pair in enumerate(cfg.lmcache.instances):
        iid, sep, replica = pair.partition("=")
        if not sep or not iid.strip() or not replica.strip():
            raise ConfigError(f"lmcache.instances[{i}]", pair, "expected INSTANCE_ID=REPLICA")
    if cfg.lmcache.coordinator_url is not None:
        check_backend_url("lmcache.coordinator_url", cfg.lmcache.coordinator_url)
    if cfg.server.workers > 1 and cfg.server.port == 0:
        raise ConfigError("server.workers", cfg.server.workers, "several workers need a fixed port")


def check_backend_url(field: str, url: str) -> None:
    problem = http_url_problem(url)
    if problem:
        raise ConfigError(field, url, problem)


def config_to_yaml(cfg: Config) -> str:
    return str(yaml.safe_dump(msgspec.to_builtins(cfg), sort_keys=False))
