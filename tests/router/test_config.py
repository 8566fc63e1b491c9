"""config.py: layering (YAML < env < flags) and errors that name field, value and reason."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from router.config import ConfigError, build_config


def test_defaults() -> None:
    cfg = build_config({}, {}, {})
    assert cfg.routing.policy == "cache_aware"
    assert cfg.server.max_body_bytes == 32 * 1024 * 1024
    assert cfg.server.replica_header is True


def test_yaml_env_flag_precedence() -> None:
    tree = {"server": {"port": 1000, "host": "0.0.0.0"}, "routing": {"policy": "random"}}
    env = {"KVROUTER_PORT": "2000", "KVROUTER_BACKEND": "http://a:1, http://b:2"}
    cfg = build_config(tree, env, {"port": 3000})
    assert cfg.server.port == 3000
    assert cfg.server.host == "0.0.0.0"
    assert cfg.routing.policy == "random"
    assert cfg.backends == ["http://a:1", "http://b:2"]


@pytest.mark.parametrize(
    ("tree", "env", "field", "value"),
    [
        ({"upstream": {"connect_timeout_s": -1}}, {}, "upstream.connect_timeout_s", -1),
        ({}, {"KVROUTER_PORT": "70000"}, "server.port", 70000),
        ({}, {"KVROUTER_PORT": "eighty"}, "server.port", "eighty"),
        ({"backends": ["ftp://x"]}, {}, "backends[0]", "ftp://x"),
        ({"routing": {"weights": {"prefix-cache": -2}}}, {}, "routing.weights.prefix-cache", -2),
        ({}, {"KVROUTER_SCRAPE_METRICS": "maybe"}, "health.scrape_metrics", "maybe"),
        ({"routing": {"weights": {"magic": 1}}}, {}, "routing.weights.magic", 1),
        (
            {"discovery": {"k8s_resource": "nodes", "k8s_service_name": "v"}},
            {},
            "discovery.k8s_resource",
            "'nodes'",
        ),
    ],
)
def test_invalid_values_name_field_value_reason(tree: dict, env: dict, field: str, value: object) -> None:
    with pytest.raises(ConfigError) as exc:
        build_config(tree, env, {})
    assert exc.value.field == field
    assert str(value) in str(exc.value)
    assert exc.value.reason


def test_unknown_field_is_refused() -> None:
    with pytest.raises(ConfigError, match="unknown field"):
        build_config({"server": {"prot": 1}}, {}, {})


def test_cli_refuses_bad_config_at_startup(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("server:\n  port: -5\nbackends: [http://127.0.0.1:1]\n")
    out = subprocess.run(
        [sys.executable, "-m", "router", "serve", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2
    assert "server.port=-5" in out.stderr
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "router",
            "serve",
            "--policy",
            "nope",
            "--backend",
            "http://127.0.0.1:1",
            "--print-config",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2
    assert "routing.policy='nope'" in out.stderr
    out = subprocess.run(
        [sys.executable, "-m", "router", "serve"], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 2
    assert "backends" in out.stderr


def test_backends_join_explicit_discovery_sources() -> None:
    """Regression: --backend with --discovery dns was silently dropped, with --discovery static refused."""
    cfg = build_config({}, {}, {"backend": ["http://a:1"], "discovery": ["dns"], "dns-name": "vllm.svc"})
    assert cfg.discovery.static == ["http://a:1"]
    assert set(cfg.discovery.enabled_sources()) == {"dns", "static"}
    cfg = build_config({}, {}, {"backend": ["http://a:1/"], "discovery": ["static"]})
    assert cfg.discovery.static == ["http://a:1"]
