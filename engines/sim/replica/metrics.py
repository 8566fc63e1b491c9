"""Prometheus metrics of the simulated engine, named, typed and labelled like vLLM 0.32.

Everything a router scrapes (reference/captures/vllm-0.32-kv-events-metrics.txt) is here with the
same name, type, label names and histogram buckets; tests/engines/test_sim_metrics.py parses both
pages and compares them. Each replica owns its own ``CollectorRegistry`` because a fleet runs many
replicas in one process and each must serve only its own numbers. Like vLLM, every series carries
``engine="0"`` and ``model_name``, counters come from prometheus_client (so ``_total`` and
``_created`` samples appear as in vLLM's page), and token counters count **tokens**, not requests.

``render()`` does not go through ``generate_latest`` on every scrape: the page's shape is fixed once
every series exists, so it is split once into static text and value slots, and a scrape only
formats the current values (``_PageTemplate``). The result is byte-for-byte ``generate_latest``'s
(checked at construction, with a fallback, and by tests/engines/test_sim_metrics.py); it costs
about a tenth. A router scraping 16 replicas every 0.25 s made this ~12% of a loaded sim's CPU.

``kvrouter_sim_lag_seconds`` (last step), ``kvrouter_sim_step_lag_seconds`` (per step) and
``kvrouter_sim_dropped_seconds_total`` are ours: how late the engine loop woke up against its step
deadline (a busy host makes the sim slower than its model; this says by how much), and how much
simulated time it skipped because it was later than the catch-up limit. So are
``kvrouter_sim_delivery_lag_seconds`` (how late each stream write leaves against its step's
deadline) and ``kvrouter_sim_prepare_seconds`` (how long a request spent on the API-server side:
decode, checks, block hashes, before it entered the engine's queue).
"""

from __future__ import annotations

import logging
from bisect import bisect_left
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import utils as _prom_utils

from ..model.stats import ITL_BUCKETS, REQUEST_LATENCY_BUCKETS, TTFT_BUCKETS
from .pd_metrics import PDMetrics

log = logging.getLogger(__name__)

# prometheus_client.utils leaves floatToGoString unannotated: bound here with its signature.
floatToGoString: Callable[[float], str] = _prom_utils.floatToGoString

# Bucket sets of the golden capture (vLLM's, per metric). The latency sets are the engine model's
# own histograms (engines/sim/model/stats.py), exported here as they are.
TOKEN_COUNT_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0)
ITERATION_TOKENS_BUCKETS = (1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0,
                            8192.0, 16384.0)  # fmt: skip
# Fine around the few milliseconds that matter at a 10x time scale, with an edge at 5 ms (the
# bench's bound): a quantile interpolated inside a wide bucket (5-10 ms) reads the bucket's shape,
# not the data's (a falling density put anywhere in it reads as its middle or above).
LAG_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.004, 0.005, 0.006, 0.008,
    0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0,
)  # fmt: skip

FINISHED_REASONS = ("stop", "length", "abort", "error", "repetition")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class SimMetrics:
    """One replica's metrics. The server calls the ``on_*`` hooks; ``render()`` is the /metrics body."""

    def __init__(
        self,
        model_name: str,
        cache_config: Mapping[str, str],
        engine: str = "0",
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        lbl = ["model_name", "engine"]
        self._lv = {"model_name": model_name, "engine": engine}
        lv = self._lv

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, lbl, registry=r, multiprocess_mode="mostrecent")

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, lbl, registry=r)

        def hist(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, lbl, buckets=buckets, registry=r)

        self.running = gauge(
            "vllm:num_requests_running", "Number of requests in model execution batches."
        ).labels(**lv)
        self.waiting = gauge(
            "vllm:num_requests_waiting", "Number of requests waiting to be processed."
        ).labels(**lv)
        self.kv_usage = gauge(
            "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage."
        ).labels(**lv)
        self.prefix_queries = counter(
            "vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens."
        ).labels(**lv)
        self.prefix_hits = counter(
            "vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens."
        ).labels(**lv)
        self.ext_queries = counter(
            "vllm:external_prefix_cache_queries",
            "External prefix cache queries from KV connector cross-instance cache sharing, "
            "in terms of number of queried tokens.",
        ).labels(**lv)
        self.ext_hits = counter(
            "vllm:external_prefix_cache_hits",
            "External prefix cache hits from KV connector cross-instance cache sharing, "
            "in terms of number of cached tokens.",
        ).labels(**lv)
        self.preemptions = counter(
            "vllm:num_preemptions", "Cumulative number of preemption from the engine."
        ).labels(**lv)
        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.").labels(**lv)
        self.prompt_tokens_cached = counter(
            "vllm:prompt_tokens_cached", "Number of cached prompt tokens (local + external)."
        ).labels(**lv)
        self.generation_tokens = counter(
            "vllm:generation_tokens", "Number of generation tokens processed."
        ).labels(**lv)
        success = Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            [*lbl, "finished_reason"],
            registry=r,
        )
        self._success = {reason: success.labels(finished_reason=reason, **lv) for reason in FINISHED_REASONS}
        self.ttft = hist(
            "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", TTFT_BUCKETS
        ).labels(**lv)
        self.itl = hist(
            "vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", ITL_BUCKETS
        ).labels(**lv)
        self.e2e = hist(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            REQUEST_LATENCY_BUCKETS,
        ).labels(**lv)
        self.queue_time = hist(
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            REQUEST_LATENCY_BUCKETS,
        ).labels(**lv)
        self.prefill_time = hist(
            "vllm:request_prefill_time_seconds",
            "Histogram of time spent in PREFILL phase for request.",
            REQUEST_LATENCY_BUCKETS,
        ).labels(**lv)
        self.decode_time = hist(
            "vllm:request_decode_time_seconds",
            "Histogram of time spent in DECODE phase for request.",
            REQUEST_LATENCY_BUCKETS,
        ).labels(**lv)
        self.req_prompt_tokens = hist(
            "vllm:request_prompt_tokens", "Number of prefill tokens processed.", TOKEN_COUNT_BUCKETS
        ).labels(**lv)
        self.req_generation_tokens = hist(
            "vllm:request_generation_tokens", "Number of generation tokens processed.", TOKEN_COUNT_BUCKETS
        ).labels(**lv)
        self.iteration_tokens = hist(
            "vllm:iteration_tokens_total",
            "Histogram of number of tokens per engine_step.",
            ITERATION_TOKENS_BUCKETS,
        ).labels(**lv)
        info = Gauge(
            "vllm:cache_config_info",
            "Information of the LLMEngine CacheConfig",
            ["engine", *sorted(cache_config)],
            registry=r,
        )
        info.labels(engine=engine, **cache_config).set(1)
        self.lag = Gauge(
            "kvrouter_sim_lag_seconds",
            "How late the simulated engine loop woke up against its step deadline (last step).",
            lbl,
            registry=r,
        ).labels(**lv)
        self.lag_hist = hist(
            "kvrouter_sim_step_lag_seconds", "Distribution of engine-loop wake-up lag per step.", LAG_BUCKETS
        ).labels(**lv)
        self.delivery_lag_hist = hist(
            "kvrouter_sim_delivery_lag_seconds",
            "How late a stream write left the sim against the end of the step that produced its "
            "first token (engine-loop lag plus the stream's own turn on the loop).",
            LAG_BUCKETS,
        ).labels(**lv)
        self.prepare_hist = hist(
            "kvrouter_sim_prepare_seconds",
            "Wall time from a request's body being read to its prompts entering the engine's queue "
            "(JSON decode, checks, block hashes: vLLM's API-server side).",
            LAG_BUCKETS,
        ).labels(**lv)
        self.dropped = Counter(
            "kvrouter_sim_dropped_seconds",
            "Simulated time dropped: lateness beyond the catch-up limit, never paid back.",
            lbl,
            registry=r,
        ).labels(**lv)
        self.pd = PDMetrics(r, lbl, lv)  # by-source prompt tokens and NIXL counters (pd_metrics.py)
        # Every series exists now (no label is created later), so the page's shape is fixed.
        self._page = _PageTemplate.build(self.registry)
        # Per-step and per-token updates are kept in plain Python until a scrape (flush()): a
        # prometheus_client update takes a lock each time (on_step was ~6 us, 5 updates).
        self._step_gauges: tuple[float, float, float, float] | None = None
        self._iteration_tokens = _PendingHist(self.iteration_tokens)
        self._lag_hist = _PendingHist(self.lag_hist)
        self._delivery_lag = _PendingHist(self.delivery_lag_hist)
        self._itl = _PendingHist(self.itl)
        self._gen_tokens = 0

    # -- hooks -----------------------------------------------------------------------------------
    def on_step(
        self, running: int, waiting: int, kv_usage: float, scheduled_tokens: int, lag_s: float
    ) -> None:
        self._step_gauges = (running, waiting, kv_usage, lag_s)
        if scheduled_tokens > 0:
            self._iteration_tokens.observe(scheduled_tokens)
        self._lag_hist.observe(max(0.0, lag_s))

    def flush(self) -> None:
        """Apply what the hot hooks kept aside: the same values, bucket counts and sums (added
        in the same order) as if each had gone to prometheus_client at once."""
        g = self._step_gauges
        if g is not None:
            self._step_gauges = None
            self.running.set(g[0])
            self.waiting.set(g[1])
            self.kv_usage.set(g[2])
            self.lag.set(g[3])
        self._iteration_tokens.flush()
        self._lag_hist.flush()
        self._delivery_lag.flush()
        self._itl.flush()
        if self._gen_tokens:
            self.generation_tokens.inc(self._gen_tokens)
            self._gen_tokens = 0

    def on_delivered(self, lag_s: float) -> None:
        """A stream write left ``lag_s`` after its step's deadline."""
        self._delivery_lag.observe(max(0.0, lag_s))

    def on_prepared(self, seconds: float) -> None:
        """A request's preparation (its API-server side) took ``seconds`` of wall time."""
        self.prepare_hist.observe(seconds)

    def on_dropped(self, seconds: float) -> None:
        """The loop was later than the catch-up limit: this much simulated time is skipped."""
        self.dropped.inc(seconds)

    def on_idle(self, kv_usage: float) -> None:
        """Nothing to run: gauges to idle. Not a step, so no lag observation (an idle replica
        used to add a 0 to the per-step lag histogram each time it went idle)."""
        self._step_gauges = None  # older than these
        self.running.set(0)
        self.waiting.set(0)
        self.kv_usage.set(kv_usage)
        self.lag.set(0.0)

    def on_scheduled(
        self, prompt_tokens: int, local_hit_tokens: int, external_queried: int, external_hit_tokens: int
    ) -> None:
        """A request got its first schedule: vLLM counts prefix-cache queries/hits once, in tokens."""
        self.prefix_queries.inc(prompt_tokens)
        self.prefix_hits.inc(local_hit_tokens)
        if external_queried:
            self.ext_queries.inc(external_queried)
            self.ext_hits.inc(external_hit_tokens)
        self.prompt_tokens_cached.inc(local_hit_tokens + external_hit_tokens)

    def on_tokens(self, new_tokens: int) -> None:
        self._gen_tokens += new_tokens

    def on_preemption(self, n: int = 1) -> None:
        self.preemptions.inc(n)

    def on_first_token(self, ttft_s: float) -> None:
        self.ttft.observe(ttft_s)

    def on_inter_token(self, itl_s: float) -> None:
        self._itl.observe(itl_s)

    def on_finished(
        self,
        reason: str,
        prompt_tokens: int,
        generation_tokens: int,
        e2e_s: float,
        queue_s: float,
        prefill_s: float,
        decode_s: float,
    ) -> None:
        self._success.get(reason, self._success["error"]).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.req_prompt_tokens.observe(prompt_tokens)
        self.req_generation_tokens.observe(generation_tokens)
        self.e2e.observe(e2e_s)
        self.queue_time.observe(queue_s)
        self.prefill_time.observe(prefill_s)
        self.decode_time.observe(decode_s)

    def render(self) -> bytes:
        self.flush()
        if self._page is None:
            return generate_latest(self.registry)
        return self._page.render()


class _PendingHist:
    """Observations of one prometheus_client histogram child, kept until ``flush()``: the same
    bucket (first upper bound >= value, as ``observe``) and the same running float sum."""

    __slots__ = ("bounds", "child", "counts", "sum")

    def __init__(self, child: Any) -> None:
        self.child = child
        self.bounds: list[float] = list(child._upper_bounds)
        self.counts = [0] * len(self.bounds)
        self.sum: float | None = None

    def observe(self, v: float) -> None:
        self.counts[bisect_left(self.bounds, v)] += 1
        s = self.sum
        self.sum = (self.child._sum._value if s is None else s) + v

    def flush(self) -> None:
        if self.sum is None:
            return
        buckets = self.child._buckets
        for i, c in enumerate(self.counts):
            if c:
                buckets[i].inc(c)
                self.counts[i] = 0
        self.child._sum.set(self.sum)
        self.sum = None


class _Value(Protocol):
    """prometheus_client's value holder (``values.ValueClass``, picked at import time, so the library
    leaves it untyped): the float that ``collect()`` reads."""

    _value: float


class _WithValue(Protocol):  # a Counter or Gauge child
    _value: _Value


class _WithSum(Protocol):  # a Histogram child
    _sum: _Value


def _value_getters(wrapper: Any) -> tuple[list[Callable[[], float]], list[Callable[[], float]]]:
    """Getters of one metric's sample values in ``collect()`` order: (main samples, ``_created``
    samples). prometheus_client lists a family's ``_created`` samples after all its others."""
    main: list[Callable[[], float]] = []
    created: list[Callable[[], float]] = []
    # The getters are functions with their state bound as default arguments (what lambdas with
    # defaults would be, but typed: mypy cannot infer a lambda with defaults as Callable[[], float]).
    for child in wrapper._metrics.values():
        if isinstance(child, Histogram):
            buckets: list[_Value] = child._buckets
            cum: list[float] = [0.0]

            def bucket(
                i: int, buckets: list[_Value] = buckets, cum: list[float] = cum
            ) -> Callable[[], float]:
                def get() -> float:
                    # Cumulative, as collect() computes it; bucket 0 restarts the running sum.
                    v = buckets[i]._value + (cum[0] if i else 0.0)
                    cum[0] = v
                    return v

                return get

            def count(cum: list[float] = cum) -> float:
                return cum[0]  # _count: the +Inf bucket, just computed

            def hist_sum(child: _WithSum = child) -> float:
                return child._sum._value

            def hist_created(child: Histogram = child) -> float:
                return child._created

            main.extend(bucket(i) for i in range(len(buckets)))
            main.append(count)
            main.append(hist_sum)
            created.append(hist_created)
        elif isinstance(child, Counter):

            def counter_value(child: _WithValue = child) -> float:
                return child._value._value

            def counter_created(child: Counter = child) -> float:
                return child._created

            main.append(counter_value)
            created.append(counter_created)
        elif isinstance(child, Gauge):

            def gauge_value(child: _WithValue = child) -> float:
                return child._value._value

            main.append(gauge_value)
        else:  # pragma: no cover - SimMetrics has only these three
            raise TypeError(f"no fast path for {type(child).__name__}")
    return main, created


class _PageTemplate:
    """``generate_latest(registry)`` with the text split into fixed parts and value slots."""

    def __init__(self, parts: list[str], getters: list[Callable[[], float]]) -> None:
        self._parts = parts  # len(getters) + 1 pieces of static text
        self._getters = getters
        # Each slot's last value and its text: most values (idle series, bucket counts) do not
        # change between two scrapes, and formatting a float was half of a render.
        self._last: list[float | None] = [None] * len(getters)
        self._text: list[str] = [""] * len(getters)

    @classmethod
    def build(cls, registry: CollectorRegistry) -> _PageTemplate | None:
        """The template, or None (render with generate_latest) if the page is not the expected
        shape, e.g. another value backend (multiprocess mode)."""
        try:
            getters: list[Callable[[], float]] = []
            for wrapper in list(registry._collector_to_names):
                main, created = _value_getters(wrapper)
                getters += main + created
            text = generate_latest(registry).decode("utf-8")
            parts: list[str] = []
            static: list[str] = []
            for line in text.splitlines(keepends=True):
                if line.startswith("#"):
                    static.append(line)
                    continue
                prefix = line[: line.rindex(" ") + 1]
                static.append(prefix)
                parts.append("".join(static))
                static = ["\n"]
            parts.append("".join(static))
            page = cls(parts, getters)
            if len(parts) != len(getters) + 1 or page.render() != generate_latest(registry):
                raise ValueError("template does not reproduce generate_latest")
            return page
        except (AttributeError, TypeError, ValueError) as exc:
            log.warning("sim metrics: rendering with generate_latest (%s)", exc)
            return None

    def render(self) -> bytes:
        parts, last, text = self._parts, self._last, self._text
        out = [parts[0]]
        for i, get in enumerate(self._getters):
            v = get()
            # 0.0 is always formatted: -0.0 equals it but prints differently.
            if v != last[i] or v == 0.0:
                last[i] = v
                text[i] = floatToGoString(v)
            out.append(text[i])
            out.append(parts[i + 1])
        return "".join(out).encode("utf-8")


def cache_config_labels(
    block_size: int,
    num_gpu_blocks: int,
    num_cpu_blocks: int | None = None,
    enable_prefix_caching: bool = True,
    hash_algo: str = "sha256",
    num_gpu_blocks_override: int | None = None,
) -> dict[str, str]:
    """The ``vllm:cache_config_info`` labels a router reads (values stringified as vLLM does)."""
    return {
        "block_size": str(block_size),
        "cache_dtype": "auto",
        "enable_prefix_caching": str(enable_prefix_caching),
        "gpu_memory_utilization": "0.92",
        "kv_cache_size_tokens": str(block_size * num_gpu_blocks),
        "num_cpu_blocks": str(num_cpu_blocks),
        "num_gpu_blocks": str(num_gpu_blocks),
        "num_gpu_blocks_override": str(num_gpu_blocks_override),
        "prefix_caching_hash_algo": hash_algo,
        "sliding_window": "None",
    }
