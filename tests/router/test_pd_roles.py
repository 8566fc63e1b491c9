"""Replica roles from every source: flags/YAML/env, DNS (one name per pool), Kubernetes labels."""

from __future__ import annotations

import asyncio

import msgspec

from router.config import build_config
from router.discovery import DiscoveryConfig, DnsSource, StaticSource, build_sources
from router.discovery.kubernetes import _Pod, pod_replicas
from router.index import PrefixIndex
from router.pd.roles import parse_role, role_from_labels
from router.replicas.registry import ReplicaRegistry
from router.types import ReplicaSpec
from tests.support.k8s_fake import pod


def test_parse_role_reads_llm_d_values() -> None:
    assert parse_role("prefill") == "prefill"
    assert parse_role("Decode") == "decode"
    assert parse_role("both") == "both"
    assert parse_role("anything-else") == "both" and parse_role(None) == "both"
    assert role_from_labels({"llm-d.ai/role": "prefill"}) == "prefill"
    assert role_from_labels({"kvrouter.io/role": "decode", "llm-d.ai/role": "prefill"}) == "decode"
    assert role_from_labels({"app": "vllm"}) == "both" and role_from_labels(None) == "both"


def test_flags_yaml_and_env_give_static_roles() -> None:
    cfg = build_config(
        {"prefill": ["http://p1:8000"]},
        env={"KVROUTER_DECODE": "http://d1:8000,http://d2:8000/"},
        flags={"backend": ["http://a:8000"]},
    )
    (src,) = build_sources(cfg.discovery)
    assert isinstance(src, StaticSource)
    roles = {s.url: s.role for s in src.specs}
    assert roles == {
        "http://a:8000": "both",
        "http://p1:8000": "prefill",
        "http://d1:8000": "decode",
        "http://d2:8000": "decode",
    }


def test_prefill_replicas_only_in_the_prefill_pool() -> None:
    reg = ReplicaRegistry(PrefixIndex(1024, 30.0))
    reg.add(ReplicaSpec(url="http://a", role="both"))
    reg.add(ReplicaSpec(url="http://p", role="prefill"))
    reg.add(ReplicaSpec(url="http://d", role="decode"))
    assert sorted(r.id for r in reg.candidates(None)) == ["http://a", "http://d"]
    assert [r.id for r in reg.prefill_candidates(None)] == ["http://p"]
    assert reg.get("http://p").role == "prefill"  # type: ignore[union-attr]


def test_dns_one_name_per_pool() -> None:
    cfg = DiscoveryConfig(dns_prefill_name="prefill.svc", dns_decode_name="decode.svc", dns_port=8000)
    sources = build_sources(cfg)
    assert [s.name for s in sources] == ["dns:prefill", "dns:decode"]

    async def resolve(name: str, port: int) -> list[str]:
        return {"prefill.svc": ["10.0.0.1"], "decode.svc": ["10.0.0.2", "10.0.0.3"]}[name]

    got = []
    for s in sources:
        assert isinstance(s, DnsSource)
        s._resolver = resolve
        got += asyncio.run(s.resolve_once())
    assert [(x.url, x.role) for x in got] == [
        ("http://10.0.0.1:8000", "prefill"),
        ("http://10.0.0.2:8000", "decode"),
        ("http://10.0.0.3:8000", "decode"),
    ]


def test_kubernetes_pod_label_gives_the_role() -> None:
    cfg = DiscoveryConfig(k8s_label_selector="app=vllm", k8s_resource="pods")
    for labels, role in (
        ({"app": "vllm", "llm-d.ai/role": "prefill"}, "prefill"),
        ({"app": "vllm", "llm-d.ai/role": "decode"}, "decode"),
        ({"app": "vllm"}, "both"),
    ):
        p = msgspec.convert(pod("vllm-0", "10.0.0.9", labels=labels), _Pod)
        (spec,) = pod_replicas(p, cfg)
        assert spec.role == role
