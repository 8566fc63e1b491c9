"""make bench-long-prompt: router CPU per request for long multi-turn chat prompts with a tokenizer.

The AIPerf Mooncake replay shape: text chat prompts of ~14k tokens (a long system prompt, then turns
that grow the conversation), ``--tokenizer`` set, several conversations in flight at once. Each request
goes through what the router does for it in process: parse the body, render the chat template,
tokenize, hash the blocks, match the index, score, dispatch (speculative index store) and finish.

Two routers run side by side on the same requests, interleaved request by request so a shared,
noisy machine slows both alike: ``cached`` (the default: prefix_tokens.py's incremental tokenisation
and block-hash chains) and ``uncached`` (both caches off, every prompt encoded and hashed in full, as
before). It prints CPU ms per request (process time) for each, their ratio, and checks that both
produce identical keys. Rows with the first turn of each conversation (no prefix to reuse) are
counted apart from the later turns.

    PYTHONPATH=. .venv/bin/python tests/bench/bench_long_prompt.py --tokenizer /path/to/model

``--live`` measures the router processes instead: ``kvrouter serve --tokenizer`` from this tree, from
``--baseline-tree`` (another checkout, e.g. main before a change) and the SGLang router from
``--peers-venv`` (``cache_aware``), each in front of bench_proxy.py's fake backends, pinned to
``--router-cpus``; ``--compiled`` adds the mypyc build of this tree (setup.py) and ``--bytes`` the
router without a tokenizer (byte-mode keys, the SGLang router's trade). The same conversation
requests (streamed, 16 chunks) are sent one at a time; the router's CPU (utime+stime of its
process tree) over the whole sequence is divided by the request count. Targets take turns, ``--rounds`` times; the table shows the median and the ratio to SGLang.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from router.http.generate import chat_info  # noqa: E402
from router.index import PrefixIndex  # noqa: E402
from router.replicas.registry import ReplicaRegistry  # noqa: E402
from router.routing import Router  # noqa: E402
from router.scoring.policies import build_policy  # noqa: E402
from router.tokenizer import HFTokenizer, load_tokenizer  # noqa: E402
from router.types import ReplicaSpec, RequestInfo  # noqa: E402
from tests.bench.bench_proxy import CLK_TCK, Proc, free_port, kvrouter_serve, wait_serving  # noqa: E402
from tests.support.proc_stats import cpu_ticks  # noqa: E402
from tools.build_compiled import build  # noqa: E402


def conversations(
    n_conv: int, turns: int, system_words: int, user_words: int, reply_words: int, seed: int
) -> list[list[bytes]]:
    """Bodies per conversation, turn by turn; each turn resends the whole history."""
    rng = random.Random(seed)
    vocab = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
        for _ in range(20000)
    ]

    def text(n: int) -> str:
        return " ".join(rng.choice(vocab) for _ in range(n))

    out: list[list[bytes]] = []
    for _ in range(n_conv):
        msgs: list[dict[str, str]] = [{"role": "system", "content": text(system_words)}]
        bodies: list[bytes] = []
        for _t in range(turns):
            msgs.append({"role": "user", "content": text(user_words)})
            bodies.append(
                json.dumps({"model": "m", "messages": msgs, "max_tokens": 64, "stream": True}).encode()
            )
            msgs.append({"role": "assistant", "content": text(reply_words)})
        out.append(bodies)
    return out


def make_router(folder: str, cached: bool, replicas: int) -> Router:
    tok = load_tokenizer(folder)
    index = PrefixIndex(1_000_000)
    reg = ReplicaRegistry(index)
    for i in range(replicas):
        reg.add(ReplicaSpec(url=f"http://r{i}", name=f"r{i}", models=("m",)))
    router = Router(
        index, reg, build_policy("cache_aware", rng=random.Random(0)), block_size=16, tokenizer=tok
    )
    if not cached:
        tok.prefix_cache.enabled = False
        router._chains.max_entries = 0
    return router


def one(router: Router, body: bytes) -> tuple[float, RequestInfo]:
    t0 = time.process_time()
    req = chat_info(router, body)
    replica = router.select(req)
    ticket = router.dispatch(req, replica)
    router.first_token(ticket, 0.05)
    router.finish(ticket)
    return time.process_time() - t0, req


def _post(url: str, body: bytes) -> None:
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        r.read()


def live(args: argparse.Namespace, order: list[tuple[int, bytes]]) -> int:
    """Router processes: CPU per request over the same request sequence, targets in turn."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-long-"))
    ports = [free_port() for _ in range(args.replicas)]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    probe = json.dumps({"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}).encode()
    bodies = [b.replace(b'"model": "m"', b'"model": "fake-model"') for _, b in order]
    plan: list[tuple[str, list[str], Path]] = []
    trees = [
        ("kvrouter", ROOT),
        ("kvrouter-compiled", args.compiled),
        ("kvrouter-baseline", args.baseline_tree),
    ]
    serve = [*kvrouter_serve(sys.executable), "--policy", "cache_aware"]
    backends = [a for u in urls for a in ("--backend", u)]
    for name, tree in trees:
        if tree is not None:
            plan.append((name, [*serve, "--tokenizer", args.tokenizer, *backends], Path(tree)))
    if args.bytes:
        # no tokenizer: chat requests keyed by their bytes, as the SGLang router keys text
        plan.append(("kvrouter-bytes", [*serve, *backends], Path(args.compiled or ROOT)))
    peer_py = Path(args.peers_venv) / "bin" / "python"
    if peer_py.exists():
        plan.append(
            (
                "sglang",
                [
                    str(peer_py),
                    "-m",
                    "sglang_router.launch_router",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    "{port}",
                    "--log-level",
                    "warn",
                    "--policy",
                    "cache_aware",
                    "--worker-urls",
                    *urls,
                ],
                ROOT,
            )
        )
    cpu: dict[str, list[float]] = {name: [] for name, _, _ in plan}
    be = Proc(
        [
            sys.executable,
            str(ROOT / "tests" / "bench" / "bench_proxy.py"),
            "--chunks",
            "16",
            "--serve-backends",
            *map(str, ports),
        ],
        "backends",
        tmp,
        args.client_cpus,
    )
    try:
        wait_serving(be, urls[0] + "/v1/chat/completions", probe, 20)
        for rnd in range(args.rounds):
            for name, cmd, tree in plan:
                port = free_port()
                # cwd picks the checkout `python -m router` imports
                proc = Proc(
                    [a.replace("{port}", str(port)) for a in cmd],
                    f"{name}-{rnd}",
                    tmp,
                    args.router_cpus,
                    tree,
                )
                try:
                    url = f"http://127.0.0.1:{port}/v1/chat/completions"
                    wait_serving(proc, url, probe, 60)
                    t0 = cpu_ticks(proc.pid)
                    for body in bodies:
                        _post(url, body)
                    cpu[name].append((cpu_ticks(proc.pid) - t0) / CLK_TCK / len(bodies) * 1e3)
                finally:
                    proc.stop()
                print(f"  round {rnd + 1} {name}: {cpu[name][-1]:.1f} ms CPU/request", flush=True)
    finally:
        be.stop()
    ref = statistics.median(cpu["sglang"]) if cpu.get("sglang") else None
    print(f"\n{len(bodies)} requests per round, {args.rounds} rounds, router on CPUs {args.router_cpus}")
    print("| router | CPU ms/request (median) | runs | vs SGLang |")
    print("|---|---|---|---|")
    for name, runs in cpu.items():
        med = statistics.median(runs)
        vs = f"{med / ref:.2f}x" if ref else "n/a"
        print(f"| {name} | {med:.1f} | {', '.join(f'{r:.1f}' for r in runs)} | {vs} |")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--tokenizer",
        default=os.environ.get("KVROUTER_TINY_MODEL", str(ROOT / ".cache" / "tiny-llama")),
        help="model folder with tokenizer.json (default: the tiny model `make tiny-model` builds)",
    )
    ap.add_argument("--conversations", type=int, default=8)
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--system-words", type=int, default=2400)
    ap.add_argument("--user-words", type=int, default=250)
    ap.add_argument("--reply-words", type=int, default=120)
    ap.add_argument("--replicas", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--live", action="store_true", help="measure router processes (see the module doc)")
    ap.add_argument("--baseline-tree", help="--live: also run kvrouter from this checkout")
    ap.add_argument("--peers-venv", default=str(ROOT / ".venv-peers"), help="--live: venv with sglang-router")
    ap.add_argument(
        "--compiled",
        nargs="?",
        type=Path,
        const=ROOT / ".cache" / "compiled",
        help="--live: also run kvrouter-compiled, the mypyc build (tools/build_compiled.py) in PATH",
    )
    ap.add_argument(
        "--bytes",
        action="store_true",
        help="--live: also run kvrouter-bytes, without --tokenizer (byte-mode keys; compiled with --compiled)",
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--router-cpus", default="1" if (os.cpu_count() or 1) > 1 else None)
    ap.add_argument("--client-cpus", default="0" if (os.cpu_count() or 1) > 1 else None)
    args = ap.parse_args()
    convs = conversations(
        args.conversations, args.turns, args.system_words, args.user_words, args.reply_words, args.seed
    )
    # arrivals interleave the conversations, as concurrent users do
    order = [(t, convs[c][t]) for t in range(args.turns) for c in range(len(convs))]
    if args.live:
        if args.compiled is not None:
            args.compiled = build(args.compiled.resolve())
        return live(args, order)
    routers = {
        "cached": make_router(args.tokenizer, True, args.replicas),
        "uncached": make_router(args.tokenizer, False, args.replicas),
    }
    first: dict[str, list[float]] = {k: [] for k in routers}
    later: dict[str, list[float]] = {k: [] for k in routers}
    tokens: list[int] = []
    for i, (turn, body) in enumerate(order):
        names = list(routers) if i % 2 == 0 else list(reversed(routers))
        keys = {}
        for name in names:
            cpu, req = one(routers[name], body)
            (first if turn == 0 else later)[name].append(cpu * 1e3)
            keys[name] = req.block_hashes
        if keys["cached"] != keys["uncached"]:
            print(f"KEY MISMATCH at request {i}", file=sys.stderr)
            return 1
        tokens.append(req.prompt_tokens)
    print(
        f"{len(order)} requests, {args.conversations} conversations x {args.turns} turns, prompt tokens "
        f"mean {statistics.mean(tokens):,.0f} (min {min(tokens):,}, max {max(tokens):,}), tokenizer {args.tokenizer}"
    )
    print("| router | CPU ms/req, all | first turns | later turns | p90 later |")
    print("|---|---|---|---|---|")
    for name in routers:
        allv = first[name] + later[name]
        p90 = statistics.quantiles(later[name], n=10)[-1] if len(later[name]) > 1 else float("nan")
        print(
            f"| {name} | {statistics.mean(allv):.2f} | {statistics.mean(first[name]):.2f} | "
            f"{statistics.mean(later[name]):.2f} | {p90:.2f} |"
        )
    ratio_all = statistics.mean(first["cached"] + later["cached"]) / statistics.mean(
        first["uncached"] + later["uncached"]
    )
    ratio_later = statistics.mean(later["cached"]) / statistics.mean(later["uncached"])
    print(
        f"cached/uncached CPU per request: all {ratio_all:.2f}x, later turns {ratio_later:.2f}x (keys identical)"
    )
    tok = routers["cached"].tokenizer
    assert isinstance(tok, HFTokenizer)
    print("prefix cache:", tok.prefix_cache.stats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
