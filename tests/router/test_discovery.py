"""Discovery sources: config validation, static, DNS (patched resolver + a UDP SRV responder), and the
Kubernetes list/watch protocol against a fake API server (tests/support/k8s_fake.py) on 127.0.0.1."""

from __future__ import annotations

import asyncio
import random
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import aiohttp
import pytest

from router.discovery import (
    DiscoveryConfig,
    DnsSource,
    KubernetesSource,
    StaticSource,
    build_sources,
    in_cluster_api_url,
    resolve_host,
)
from router.types import ReplicaSpec
from tests.support.k8s_fake import FakeApiServer, endpoint_slice, pod

WAIT_S = 5.0


class Published:
    """Collects what a source publishes; lets a test wait (polling, bounded) for a condition."""

    def __init__(self) -> None:
        self.sets: list[list[ReplicaSpec]] = []

    def __call__(self, specs: Sequence[ReplicaSpec]) -> None:
        self.sets.append(list(specs))

    @property
    def last(self) -> list[ReplicaSpec]:
        return self.sets[-1]

    def urls(self) -> set[str]:
        return {s.url for s in self.last}

    async def until(self, pred: Callable[[], bool], what: str) -> None:
        async def loop() -> None:
            while not pred():
                await asyncio.sleep(0.005)

        try:
            await asyncio.wait_for(loop(), WAIT_S)
        except TimeoutError:
            pytest.fail(f"timed out waiting for: {what}; published: {self.sets}")


@contextmanager
def running(source: object, publish: Published) -> Iterator[asyncio.Task[None]]:
    task = asyncio.get_running_loop().create_task(source.run(publish))  # type: ignore[attr-defined]
    try:
        yield task
    finally:
        task.cancel()


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


# ----------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"static": ["10.0.0.1:8000"]}, "static='10.0.0.1:8000': expected an http(s)://host[:port] URL"),
        ({"dns_name": "x", "dns_port": 0}, "dns_port=0: must be in 1..65535"),
        ({"dns_name": "x", "dns_interval_s": 0.0}, "dns_interval_s=0.0: must be > 0"),
        ({"sources": ["consul"]}, "sources=['consul']: 'consul' is not one of static, dns, k8s"),
        ({"sources": ["dns"]}, "dns_name='': the dns source needs a name to resolve"),
        ({"sources": ["k8s"]}, "k8s_service_name='': set it or k8s_label_selector"),
        (
            {"k8s_service_name": "vllm", "k8s_resource": "services"},
            "k8s_resource='services': must be one of endpointslices, pods",
        ),
        (
            {"k8s_service_name": "vllm", "k8s_resource": "pods"},
            "k8s_label_selector='': k8s_resource=pods needs a label selector",
        ),
        (
            {"backoff_initial_s": 2.0, "backoff_max_s": 1.0},
            "backoff_max_s=1.0: must be >= backoff_initial_s (2.0)",
        ),
    ],
)
def test_config_errors_name_field_value_and_reason(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError) as info:
        build_sources(DiscoveryConfig(**kwargs), environ={})  # type: ignore[arg-type]
    assert str(info.value) == message


def test_build_sources_infers_kinds_and_reads_in_cluster_settings(tmp_path: Path) -> None:
    ns_file = tmp_path / "namespace"
    ns_file.write_text("inference\n")
    cfg = DiscoveryConfig(
        static=["http://10.0.0.1:8000/"],
        dns_name="vllm.inference.svc",
        k8s_service_name="vllm",
        k8s_namespace_path=str(ns_file),
    )
    env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    static, dns, k8s = build_sources(cfg, environ=env)
    assert isinstance(static, StaticSource) and static.specs == [ReplicaSpec(url="http://10.0.0.1:8000")]
    assert isinstance(dns, DnsSource)
    assert isinstance(k8s, KubernetesSource)
    assert k8s.api_url == "https://10.96.0.1:443"
    assert k8s.path == "/apis/discovery.k8s.io/v1/namespaces/inference/endpointslices"
    assert k8s.selector == "kubernetes.io/service-name=vllm"
    assert (
        in_cluster_api_url({"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "6443"})
        == "https://[fd00::1]:6443"
    )


def test_build_sources_outside_a_pod_says_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^k8s_api_url='': not set and KUBERNETES_SERVICE_HOST"):
        build_sources(DiscoveryConfig(k8s_service_name="vllm"), environ={})
    cfg = DiscoveryConfig(
        k8s_service_name="vllm",
        k8s_api_url="http://127.0.0.1:8001",
        k8s_namespace_path=str(tmp_path / "missing"),
    )
    with pytest.raises(ValueError, match=r"^k8s_namespace='': not set and .*missing is unreadable"):
        build_sources(cfg, environ={})


# ----------------------------------------------------------------------------------------- static


async def test_static_publishes_once_and_idles_until_cancelled() -> None:
    got = Published()
    source = StaticSource([ReplicaSpec(url="http://b:1"), ReplicaSpec(url="http://a:1")])
    with running(source, got) as task:
        await got.until(lambda: len(got.sets) == 1, "the static set")
        await asyncio.sleep(0.02)
        assert [s.url for s in got.last] == ["http://a:1", "http://b:1"]
        assert len(got.sets) == 1 and not task.done()
        await stop(task)


# -------------------------------------------------------------------------------------------- DNS


class FakeResolver:
    def __init__(self) -> None:
        self.answers: dict[str, list[str] | Exception] = {}
        self.calls = 0

    async def __call__(self, host: str, port: int) -> list[str]:
        self.calls += 1
        answer = self.answers[host]
        if isinstance(answer, Exception):
            raise answer
        return answer


def dns_cfg(**kw: object) -> DiscoveryConfig:
    base: dict[str, object] = {
        "dns_name": "vllm.inference.svc",
        "dns_port": 8000,
        "dns_interval_s": 0.01,
        "backoff_initial_s": 0.005,
        "backoff_max_s": 0.01,
    }
    base.update(kw)
    return DiscoveryConfig(**base)  # type: ignore[arg-type]


async def test_dns_publishes_only_on_change_and_keeps_last_set_on_failure() -> None:
    resolver = FakeResolver()
    resolver.answers["vllm.inference.svc"] = ["10.0.0.2", "10.0.0.1"]
    source = DnsSource(dns_cfg(dns_events_port=5557), resolver=resolver)
    got = Published()
    with running(source, got) as task:
        await got.until(lambda: len(got.sets) == 1, "first set")
        assert got.last == [
            ReplicaSpec(url="http://10.0.0.1:8000", kv_events="tcp://10.0.0.1:5557"),
            ReplicaSpec(url="http://10.0.0.2:8000", kv_events="tcp://10.0.0.2:5557"),
        ]
        calls = resolver.calls
        await got.until(lambda: resolver.calls >= calls + 3, "more resolutions")
        assert len(got.sets) == 1  # same answer, in another order or not: no publish

        resolver.answers["vllm.inference.svc"] = OSError("SERVFAIL")
        calls = resolver.calls
        await got.until(lambda: resolver.calls >= calls + 3, "failing resolutions")
        assert len(got.sets) == 1 and source.stats.errors["resolve"] >= 3

        resolver.answers["vllm.inference.svc"] = ["10.0.0.1", "fd00::3"]
        await got.until(lambda: len(got.sets) == 2, "changed set")
        assert got.urls() == {"http://10.0.0.1:8000", "http://[fd00::3]:8000"}
        await stop(task)


async def test_dns_first_failure_still_publishes_an_empty_set_once() -> None:
    resolver = FakeResolver()
    resolver.answers["vllm.inference.svc"] = OSError("NXDOMAIN")
    got = Published()
    with running(DnsSource(dns_cfg(), resolver=resolver), got) as task:
        await got.until(lambda: resolver.calls >= 3, "retries")
        assert got.sets == [[]]
        await stop(task)


async def test_resolve_host_uses_the_loop_resolver_for_localhost() -> None:
    assert "127.0.0.1" in await resolve_host("localhost", 8000)


def _dns_name(name: str) -> bytes:
    return b"".join(bytes([len(p)]) + p.encode() for p in name.rstrip(".").split(".")) + b"\0"


class SrvResponder(asyncio.DatagramProtocol):
    """A tiny authoritative DNS server: answers SRV questions from a table, NXDOMAIN otherwise."""

    def __init__(self, records: dict[str, list[tuple[str, int]]]) -> None:
        self.records = records
        self.questions: list[str] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # selector transports skip the ABC

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        qid = struct.unpack("!H", data[:2])[0]
        labels, i = [], 12
        while data[i]:
            labels.append(data[i + 1 : i + 1 + data[i]].decode())
            i += data[i] + 1
        question = data[12 : i + 5]
        name = ".".join(labels)
        self.questions.append(name)
        answers = b""
        records = self.records.get(name.lower(), [])
        for target, port in records:
            rdata = struct.pack("!HHH", 0, 100, port) + _dns_name(target)
            answers += (
                b"\xc0\x0c" + struct.pack("!HHIH", 33, 1, 0, len(rdata)) + rdata
            )  # TTL 0: c-ares caches by TTL
        rcode = 0 if records else 3
        header = struct.pack("!6H", qid, 0x8400 | rcode, 1, len(records), 0, 0)
        assert self.transport is not None
        self.transport.sendto(header + question + answers, addr)


async def test_dns_srv_via_aiodns_against_a_udp_responder() -> None:
    pytest.importorskip("aiodns", reason="SRV lookups use aiodns: pip install aiodns")
    responder = SrvResponder(
        {
            "_http._tcp.vllm.inference.svc": [
                ("vllm-0.vllm.inference.svc", 8000),
                ("vllm-1.vllm.inference.svc", 8001),
            ],
            "_kv-events._tcp.vllm.inference.svc": [("vllm-0.vllm.inference.svc", 5557)],
        }
    )
    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: responder, local_addr=("127.0.0.1", 0)
    )
    port = transport.get_extra_info("sockname")[1]
    resolver = FakeResolver()
    resolver.answers.update(
        {"vllm-0.vllm.inference.svc": ["10.1.0.7"], "vllm-1.vllm.inference.svc": ["10.1.0.8"]}
    )
    cfg = dns_cfg(dns_srv=True, dns_nameservers=[f"127.0.0.1:{port}"])
    got = Published()
    source = DnsSource(cfg, resolver=resolver)
    try:
        with running(source, got) as task:
            await got.until(lambda: bool(got.sets), "SRV set")
            assert got.last == [
                ReplicaSpec(url="http://10.1.0.7:8000", kv_events="tcp://10.1.0.7:5557"),
                ReplicaSpec(url="http://10.1.0.8:8001"),
            ]
            # The events SRV name vanishing (NXDOMAIN) is an answer, not a failure.
            del responder.records["_kv-events._tcp.vllm.inference.svc"]
            await got.until(lambda: len(got.sets) == 2, "set without events ports")
            assert all(s.kv_events is None for s in got.last)
            assert source.stats.errors == {}
            await stop(task)
    finally:
        transport.close()
    assert "_http._tcp.vllm.inference.svc" in responder.questions


# ------------------------------------------------------------------------------------- Kubernetes


@pytest.fixture
async def api() -> object:
    server = FakeApiServer(token="good-token")
    await server.start()
    yield server
    await server.close()


def k8s_source(
    api: FakeApiServer, tmp_path: Path, token: str = "good-token", **kw: object
) -> KubernetesSource:
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    base: dict[str, object] = {
        "k8s_service_name": "vllm",
        "k8s_api_url": api.url,
        "k8s_namespace": "inference",
        "k8s_token_path": str(token_file),
        "k8s_watch_timeout_s": 30,
        "backoff_initial_s": 0.005,
        "backoff_max_s": 0.02,
    }
    base.update(kw)
    (source,) = build_sources(DiscoveryConfig(**base), environ={})  # type: ignore[arg-type]
    assert isinstance(source, KubernetesSource)
    source._backoff._rng = random.Random(7)
    return source


def spec(ip: str, pod_name: str | None, port: int = 8000, events: int | None = 5557) -> ReplicaSpec:
    return ReplicaSpec(
        url=f"http://{ip}:{port}", name=pod_name, kv_events=f"tcp://{ip}:{events}" if events else None
    )


async def test_k8s_initial_list_then_add_modify_delete(api: FakeApiServer, tmp_path: Path) -> None:
    api.add(endpoint_slice("vllm-a", "vllm", [("10.0.0.1", "vllm-0", True, False)]))
    api.add(endpoint_slice("other-x", "other", [("10.9.9.9", "other-0", True, False)]))  # not our service
    source, got = k8s_source(api, tmp_path), Published()
    with running(source, got) as task:
        await got.until(lambda: bool(got.sets), "initial list")
        assert got.last == [spec("10.0.0.1", "vllm-0")]
        assert api.lists()[0].query == {"labelSelector": "kubernetes.io/service-name=vllm"}
        await got.until(lambda: api.open_watches == 1, "watch open")
        w = api.watches()[0].query
        assert w == {
            "labelSelector": "kubernetes.io/service-name=vllm",
            "watch": "1",
            "resourceVersion": str(api.rv),
            "allowWatchBookmarks": "true",
            "timeoutSeconds": "30",
        }

        rv = api.add(endpoint_slice("vllm-b", "vllm", [("10.0.0.2", "vllm-1", True, False)]))
        await got.until(lambda: len(got.last) == 2, "added slice")
        assert source.resource_version == str(rv)

        api.modify(
            endpoint_slice(
                "vllm-a", "vllm", [("10.0.0.1", "vllm-0", True, False), ("10.0.0.3", "vllm-2", None, False)]
            )
        )
        await got.until(lambda: len(got.last) == 3, "modified slice")
        assert got.last == [
            spec("10.0.0.1", "vllm-0"),
            spec("10.0.0.2", "vllm-1"),
            spec("10.0.0.3", "vllm-2"),
        ]

        rv = api.delete("vllm-b")
        await got.until(lambda: len(got.last) == 2, "deleted slice")
        assert {s.name for s in got.last} == {"vllm-0", "vllm-2"}
        assert source.resource_version == str(rv)
        assert source.stats.lists == 1 and source.stats.watches == 1 and source.stats.errors == {}
        await stop(task)


async def test_k8s_excludes_not_ready_terminating_and_portless(api: FakeApiServer, tmp_path: Path) -> None:
    api.add(
        endpoint_slice(
            "vllm-a",
            "vllm",
            [
                ("10.0.0.1", "ready", True, False),
                ("10.0.0.2", "not-ready", False, False),
                ("10.0.0.3", "terminating", True, True),
                ("10.0.0.4", None, None, False),  # no targetRef: named by URL; ready omitted means ready
            ],
        )
    )
    api.add(
        endpoint_slice("vllm-b", "vllm", [("10.0.0.5", "metrics-only", True, False)], ports={"metrics": 9090})
    )
    api.add(endpoint_slice("vllm-c", "vllm", [("10.0.0.6", "no-events", True, False)], ports={"http": 8001}))
    source, got = k8s_source(api, tmp_path), Published()
    with running(source, got) as task:
        await got.until(lambda: bool(got.sets), "initial list")
        # Sorted by id: a replica without a pod name is named by its URL.
        assert got.last == [
            spec("10.0.0.4", None),
            spec("10.0.0.6", "no-events", port=8001, events=None),
            spec("10.0.0.1", "ready"),
        ]
        # A ready endpoint going not-ready leaves; coming back re-joins.
        api.modify(endpoint_slice("vllm-a", "vllm", [("10.0.0.1", "ready", False, False)]))
        await got.until(lambda: len(got.last) == 1, "endpoint went not-ready")
        await stop(task)


async def test_k8s_dual_stack_names_each_pod_once(api: FakeApiServer, tmp_path: Path) -> None:
    api.add(endpoint_slice("vllm-v6", "vllm", [("fd00::1", "vllm-0", True, False)], address_type="IPv6"))
    api.add(endpoint_slice("vllm-v4", "vllm", [("10.0.0.1", "vllm-0", True, False)]))
    source, got = k8s_source(api, tmp_path), Published()
    with running(source, got) as task:
        await got.until(lambda: bool(got.sets), "initial list")
        assert got.last == [spec("10.0.0.1", "vllm-0")]
        api.delete("vllm-v4")
        await got.until(lambda: got.urls() == {"http://[fd00::1]:8000"}, "IPv6 address takes over")
        await stop(task)


async def test_k8s_bookmark_advances_rv_and_resume_after_disconnect_uses_it(
    api: FakeApiServer, tmp_path: Path
) -> None:
    api.add(endpoint_slice("vllm-a", "vllm", [("10.0.0.1", "vllm-0", True, False)]))
    source, got = k8s_source(api, tmp_path), Published()
    with running(source, got) as task:
        await got.until(lambda: api.open_watches == 1, "watch open")
        rv = api.bookmark()
        await got.until(lambda: source.resource_version == str(rv), "bookmark RV taken")
        assert source.stats.bookmarks == 1 and len(got.sets) == 1  # a bookmark changes no replica

        api.drop_watches()
        await got.until(lambda: len(api.watches()) == 2 and api.open_watches == 1, "watch resumed")
        assert api.watches()[1].query["resourceVersion"] == str(rv)
        assert len(api.lists()) == 1  # resumed, not re-listed
        await stop(task)


async def test_k8s_disconnect_resumes_from_last_event_rv_and_misses_nothing(
    api: FakeApiServer, tmp_path: Path
) -> None:
    source, got = k8s_source(api, tmp_path), Published()
    with running(source, got) as task:
        await got.until(lambda: api.open_watches == 1, "watch open")
        assert got.sets == [[]]
        rv = api.add(endpoint_slice("vllm-a", "vllm", [("10.0.0.1", "vllm-0", True, False)]))
        await got.until(lambda: len(got.last) == 1, "added")
        # The cut happens first; the next change lands while we are disconnected.
        api.drop_watches()
        api.add(endpoint_slice("vllm-b", "vllm", [("10.0.0.2", "vllm-1", True, False)]))
        await got.until(lambda: len(got.last) == 2, "change made during the outage, replayed on resume")
        assert api.watches()[1].query["resourceVersion"] == str(rv)
        assert len(api.lists()) == 1
        assert sum(source.stats.errors.values()) == 1  # the cut, counted once
        await stop(task)


async def test_k8s_watch_timeout_reconnects_without_relisting(api: FakeApiServer, tmp_path: Path) -> None:
    source, got = k8s_source(api, tmp_path, k8s_watch_timeout_s=1), Published()
    source._min_watch_s = 0.0
    with running(source, got) as task:
        await got.until(lambda: len(api.watches()) >= 2, "second watch after the server timed the first out")
        assert len(api.lists()) == 1 and source.stats.errors == {}
        await stop(task)


@pytest.mark.parametrize("as_http", [False, True], ids=["error-event", "http-status"])
async def test_k8s_410_gone_relists_and_rebuilds(api: FakeApiServer, tmp_path: Path, as_http: bool) -> None:
    api.gone_as_http = as_http
    api.add(endpoint_slice("vllm-a", "vllm", [("10.0.0.1", "vllm-0", True, False)]))
    source, got = k8s_source(api, tmp_path), Published()
    with running(source, got) as task:
        await got.until(lambda: api.open_watches == 1, "watch open")
        old_rv = source.resource_version
        # While we are away, vllm-a goes and vllm-b comes, and history is compacted past our RV.
        api.drop_watches()
        api.delete("vllm-a")
        api.add(endpoint_slice("vllm-b", "vllm", [("10.0.0.2", "vllm-1", True, False)]))
        new_rv = api.compact()
        await got.until(lambda: got.last == [spec("10.0.0.2", "vllm-1")], "rebuilt from a fresh LIST")
        await got.until(lambda: api.open_watches == 1, "watching again")
        watches = api.watches()
        assert [w.query["resourceVersion"] for w in watches] == [old_rv, old_rv, str(new_rv)]
        assert watches[1].status == (410 if as_http else 200)
        assert len(api.lists()) == 2 and source.stats.gone == 1
        await stop(task)


async def test_k8s_bad_token_retries_counts_and_recovers_after_rotation(
    api: FakeApiServer, tmp_path: Path
) -> None:
    api.add(endpoint_slice("vllm-a", "vllm", [("10.0.0.1", "vllm-0", True, False)]))
    source, got = k8s_source(api, tmp_path, token="stale-token"), Published()
    with running(source, got) as task:
        await got.until(lambda: source.stats.errors.get("http_401", 0) >= 3, "several 401s")
        assert got.sets == [[]] and not task.done()
        assert all(not r.authorized for r in api.requests)
        # The kubelet rotates the projected token file; the next attempt must read the new one.
        (tmp_path / "token").write_text("good-token")
        await got.until(lambda: got.last == [spec("10.0.0.1", "vllm-0")], "recovered after rotation")
        await stop(task)


async def test_k8s_garbage_and_server_errors_do_not_crash(api: FakeApiServer, tmp_path: Path) -> None:
    source = k8s_source(api, tmp_path, k8s_api_url="http://127.0.0.1:9")  # nothing listens on :9
    got = Published()
    with running(source, got) as task:
        await got.until(lambda: sum(source.stats.errors.values()) >= 3, "connection errors")
        assert got.sets == [[]] and not task.done()
        await stop(task)


async def test_k8s_pods_mode_readiness_ports_and_annotations(api: FakeApiServer, tmp_path: Path) -> None:
    sel = {"app": "vllm"}
    api.add(pod("vllm-0", "10.0.0.1", labels=sel), resource="pods")
    api.add(pod("vllm-1", "10.0.0.2", labels=sel, ready=False), resource="pods")
    api.add(pod("vllm-2", "10.0.0.3", labels=sel, deleting=True), resource="pods")
    api.add(
        pod(
            "vllm-3",
            "10.0.0.4",
            labels=sel,
            ports={"http": 8000},
            annotations={"kvrouter.io/kv-events": "tcp://:6000", "kvrouter.io/kv-replay": "tcp://*:6001"},
        ),
        resource="pods",
    )
    api.add(
        pod("vllm-4", "10.0.0.5", labels=sel, annotations={"kvrouter.io/kv-events": "zmq:nonsense"}),
        resource="pods",
    )
    api.add(pod("web-0", "10.0.0.9", labels={"app": "web"}), resource="pods")
    source = k8s_source(
        api, tmp_path, k8s_resource="pods", k8s_label_selector="app=vllm", k8s_service_name=""
    )
    got = Published()
    with running(source, got) as task:
        await got.until(lambda: bool(got.sets), "initial pod list")
        assert api.lists("pods")[0].query == {"labelSelector": "app=vllm"}
        assert got.last == [
            spec("10.0.0.1", "vllm-0"),
            ReplicaSpec(
                url="http://10.0.0.4:8000",
                name="vllm-3",
                kv_events="tcp://10.0.0.4:6000",
                kv_replay="tcp://10.0.0.4:6001",
            ),
            spec("10.0.0.5", "vllm-4"),  # bad annotation ignored (and counted): the named port is used
        ]
        assert source.stats.errors == {"annotation": 1}
        api.modify(pod("vllm-1", "10.0.0.2", labels=sel), resource="pods")
        await got.until(lambda: "http://10.0.0.2:8000" in got.urls(), "pod became ready")
        await stop(task)


# ------------------------------------------------------------------------ end to end, real processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _status(session: aiohttp.ClientSession, url: str) -> int:
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=1)) as resp:
            return resp.status
    except (aiohttp.ClientError, TimeoutError):
        return 0


async def _until_status(session: aiohttp.ClientSession, url: str, status: int, what: str) -> None:
    for _ in range(200):  # 10 s
        if await _status(session, url) == status:
            return
        await asyncio.sleep(0.05)
    pytest.fail(f"timed out waiting for {url} -> {status}: {what}")


async def test_kvrouter_serve_follows_k8s_discovery_end_to_end(api: FakeApiServer, tmp_path: Path) -> None:
    """`kvrouter serve` + a simulated engine as processes; only the API server is faked."""
    engine_port, events_port, router_port = _free_port(), _free_port(), _free_port()
    (tmp_path / "token").write_text("good-token")
    (tmp_path / "config.yaml").write_text(
        f"server: {{port: {router_port}, drain_grace_s: 0.2, drain_timeout_s: 2}}\n"
        "discovery:\n  sources: [k8s]\n  k8s_service_name: vllm\n  k8s_namespace: inference\n"
        f"  k8s_api_url: {api.url}\n  k8s_token_path: {tmp_path / 'token'}\n"
        "  backoff_initial_s: 0.05\n  backoff_max_s: 0.2\n"
    )
    sim = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "router",
            "sim",
            "--port",
            str(engine_port),
            "--events-port",
            str(events_port),
            "--profile",
            "tiny",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    log = (tmp_path / "router.log").open("w")  # pytest keeps tmp_path: the log is there after a failure
    router = subprocess.Popen(
        [sys.executable, "-m", "router", "serve", "--config", str(tmp_path / "config.yaml")],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{router_port}"
    slice_ports = {"http": engine_port, "kv-events": events_port}
    try:
        async with aiohttp.ClientSession() as session:
            await _until_status(session, f"{base}/health", 200, "router up")
            assert await _status(session, f"{base}/ready") == 503  # alive, but no replica yet
            await _until_status(session, f"http://127.0.0.1:{engine_port}/health", 200, "engine up")

            api.add(
                endpoint_slice("vllm-a", "vllm", [("127.0.0.1", "vllm-0", True, False)], ports=slice_ports)
            )
            await _until_status(session, f"{base}/ready", 200, "engine discovered through the watch")
            body = {"model": "tiny", "prompt": "hello " * 40, "max_tokens": 2}
            async with session.post(f"{base}/v1/completions", json=body) as resp:
                assert resp.status == 200
                assert resp.headers.get("x-kvrouter-replica") == "vllm-0"  # named after the pod

            api.modify(
                endpoint_slice("vllm-a", "vllm", [("127.0.0.1", "vllm-0", False, False)], ports=slice_ports)
            )
            await _until_status(session, f"{base}/ready", 503, "engine left when its endpoint went not-ready")
        router.send_signal(signal.SIGTERM)
        assert router.wait(10) == 0
    finally:
        for proc in (router, sim):
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
        log.close()
