"""Optional compiled build. pyproject.toml holds the metadata; this file only adds extensions.

``KVROUTER_COMPILE=1`` compiles the request path (``COMPILED``) to C extensions with mypyc, the
compiler mypy ships (black and mypy itself are built the same way). The code is the same typed
Python: mypyc turns attribute reads on the slot classes, calls between these modules, int/float
arithmetic and the loops of scoring, hashing and framing into C, which is what a request spends
most of its CPU on (docs/benchmarks.md, "Compiled build"). Without the variable the package is
pure Python, as development and the test suite use it.

    pip install . mypy==2.4.1 types-PyYAML setuptools wheel   # what mypyc type-checks against
    KVROUTER_COMPILE=1 pip install --no-build-isolation --no-deps --force-reinstall .

A module belongs here when it runs per request, and it must stay free of what mypyc cannot
compile faithfully: msgspec ``Struct`` declarations (their annotations are read at run time),
exception classes that derive from built-in errors other than ``Exception`` (marked
``@mypyc_attr(native_class=False)``), monkeypatching. tests/integration/test_compiled.py builds
this list and runs the request-path tests against it.
"""

from __future__ import annotations

import os

from setuptools import setup

COMPILED = [
    "router/admission.py",
    "router/fast_metrics.py",
    "router/hashing.py",
    "router/index.py",
    "router/parity.py",
    "router/prefix_tokens.py",
    "router/routing.py",
    "router/types.py",
    "router/http/coalesce.py",
    "router/http/deadlines.py",
    "router/http/fastpath.py",
    "router/http/generate.py",
    "router/http/prompt_limits.py",
    "router/http/proxy.py",
    "router/http/sessions.py",
    "router/http/upstream.py",
    "router/replicas/outliers.py",
    "router/replicas/registry.py",
    "router/scoring/fused.py",
    "router/scoring/picker.py",
    "router/scoring/pipeline.py",
    "router/sessions/identity.py",
]


def _extensions() -> list[object]:
    if os.environ.get("KVROUTER_COMPILE") != "1":
        return []
    from mypyc.build import mypycify

    return list(mypycify(COMPILED, opt_level="3", multi_file=True))


setup(ext_modules=_extensions())
