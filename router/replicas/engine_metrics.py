"""Parse the few vLLM /metrics series routing needs, fast, from Prometheus text (``samples``).

A vLLM /metrics page is ~50 KB (histograms dominate); the router scrapes it several times a
second per replica, so a full text parser is too slow for the event loop. We scan lines and only
parse the ones whose name is wanted. Values are summed over label sets (DP ranks publish one
``engine`` label each); ``vllm:cache_config_info`` labels are returned as a dict.

Names (vLLM 0.32; see docs/kv-events.md and reference captures):
``vllm:num_requests_running``, ``vllm:num_requests_waiting``, ``vllm:kv_cache_usage_perc``
(``vllm:gpu_cache_usage_perc`` before 0.9), ``vllm:prefix_cache_queries_total``,
``vllm:prefix_cache_hits_total`` (tokens; ``vllm:gpu_prefix_cache_*`` before 0.9),
``vllm:external_prefix_cache_hits_total`` (KV connector, e.g. LMCache), ``vllm:cache_config_info``,
``vllm:num_preemptions_total`` and the NIXL failure counters (``vllm:nixl_num_failed_transfers``,
``vllm:nixl_num_failed_notifications``), which the outlier detector reads.
"""

from __future__ import annotations

from collections.abc import Container, Iterator
from dataclasses import dataclass, field

_ALIASES = {
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
    "vllm:kv_cache_usage_perc": "kv_usage",
    "vllm:gpu_cache_usage_perc": "kv_usage",
    "vllm:prefix_cache_queries_total": "prefix_queries",
    "vllm:prefix_cache_hits_total": "prefix_hits",
    "vllm:gpu_prefix_cache_queries_total": "prefix_queries",
    "vllm:gpu_prefix_cache_hits_total": "prefix_hits",
    "vllm:external_prefix_cache_hits_total": "external_hits",
    "vllm:external_prefix_cache_queries_total": "external_queries",
    # Sick-replica signals (outliers.py): preemptions and P/D KV-transfer failures (NIXL).
    "vllm:num_preemptions_total": "preemptions",
    "vllm:num_preemptions": "preemptions",
    "vllm:nixl_num_failed_transfers": "transfer_failures",
    "vllm:nixl_num_failed_transfers_total": "transfer_failures",
    "vllm:nixl_num_failed_notifications": "transfer_failures",
    "vllm:nixl_num_failed_notifications_total": "transfer_failures",
}
_INFO = "vllm:cache_config_info"


@dataclass(slots=True)
class EngineMetrics:
    running: float | None = None
    waiting: float | None = None
    kv_usage: float | None = None
    prefix_queries: float | None = None
    prefix_hits: float | None = None
    external_hits: float | None = None
    external_queries: float | None = None
    preemptions: float | None = None
    transfer_failures: float | None = None
    cache_config: dict[str, str] = field(default_factory=dict)

    @property
    def block_size(self) -> int | None:
        return _int(self.cache_config.get("block_size"))

    @property
    def num_gpu_blocks(self) -> int | None:
        return _int(self.cache_config.get("num_gpu_blocks"))


def _int(v: str | None) -> int | None:
    if v is None:
        return None
    try:
        return int(float(v))
    except ValueError:
        return None


def parse_labels(s: str) -> dict[str, str]:
    """``a="x",b="y\\"z"`` -> dict (Prometheus escaping: backslash, quote, newline)."""
    out: dict[str, str] = {}
    i, n = 0, len(s)
    while i < n:
        eq = s.find("=", i)
        if eq < 0:
            break
        key = s[i:eq].strip().lstrip(",").strip()
        j = eq + 1
        if j >= n or s[j] != '"':
            break
        j += 1
        buf: list[str] = []
        while j < n and s[j] != '"':
            if s[j] == "\\" and j + 1 < n:
                nxt = s[j + 1]
                buf.append("\n" if nxt == "n" else nxt)
                j += 2
            else:
                buf.append(s[j])
                j += 1
        out[key] = "".join(buf)
        i = j + 1
    return out


def samples(
    text: str, prefix: str = "", names: Container[str] | None = None
) -> Iterator[tuple[str, str, float]]:
    """``(name, raw labels, value)`` per sample line of Prometheus text: the one parser of that
    format in the repository. Only lines starting with ``prefix`` and, when given, names in
    ``names`` are parsed (a vLLM page is mostly histogram buckets nobody asked for). Comments,
    blank and malformed lines are skipped; the value follows the last ``}`` (labels may hold
    spaces); ``parse_labels`` reads the raw labels."""
    for line in text.splitlines():
        if not line or line[0] == "#" or not line.startswith(prefix):
            continue
        brace = line.find("{")
        space = line.find(" ")
        if brace != -1 and (space == -1 or brace < space):
            name = line[:brace]
            if names is not None and name not in names:
                continue
            close = line.rfind("}")
            labels = line[brace + 1 : close]
            rest = line[close + 1 :].split()
        elif space != -1:
            name = line[:space]
            if names is not None and name not in names:
                continue
            labels = ""
            rest = line[space + 1 :].split()
        else:
            continue
        if not rest:
            continue
        try:
            value = float(rest[0])
        except ValueError:
            continue
        yield name, labels, value


_WANTED = frozenset(_ALIASES) | {_INFO}


def parse_engine_metrics(text: str) -> EngineMetrics:
    m = EngineMetrics()
    usage_samples = 0
    for name, labels, value in samples(text, "vllm:", _WANTED):
        if name == _INFO:
            m.cache_config = parse_labels(labels)
            continue
        attr = _ALIASES[name]
        prev = getattr(m, attr)
        setattr(m, attr, value if prev is None else prev + value)
        if attr == "kv_usage":
            usage_samples += 1
    if m.kv_usage is not None and usage_samples > 1:
        m.kv_usage /= usage_samples  # a fraction per DP rank: report the mean, not the sum
    return m
