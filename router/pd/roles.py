"""Replica roles: ``prefill``, ``decode`` or ``both`` (aggregated), and where they come from.

A role is part of a replica's identity as discovery sees it (``ReplicaSpec.role``): ``--prefill
URL`` / ``--decode URL`` beside ``--backend URL`` (both), one DNS name per pool, or a Kubernetes
pod label. The label keys read, first found: ``kvrouter.io/role`` and llm-d's ``llm-d.ai/role``,
whose values are the same three words (llm-d: "any other value, or its absence, means both").

Who gets what: plain (aggregated or decode-only) requests go to ``both`` and ``decode`` replicas;
``prefill`` replicas only ever receive leg 1 of a split request.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final, Literal

Role = Literal["prefill", "decode", "both"]
PREFILL: Final = "prefill"
DECODE: Final = "decode"
BOTH: Final = "both"
ROLES: tuple[Role, ...] = ("prefill", "decode", "both")
ROLE_LABELS: tuple[str, ...] = ("kvrouter.io/role", "llm-d.ai/role")


def parse_role(value: str | None) -> Role:
    """A role label or setting; unknown or missing means ``both`` (llm-d's reading)."""
    v = (value or "").strip().lower()
    if v == PREFILL:
        return "prefill"
    if v == DECODE:
        return "decode"
    return "both"


def role_from_labels(labels: Mapping[str, str] | None) -> Role:
    for key in ROLE_LABELS:
        if labels and key in labels:
            return parse_role(labels[key])
    return "both"
