"""Measure step times of a Llama-3.1-8B-shaped model with random weights on one GPU (PyTorch).

NOT RUN: no GPU was available when this was written; profiles.py is fitted from published
figures (docs/calibration.md). Run this on the target GPU, then ``fit.py`` on its CSV.

What it measures (bf16, random weights: timing does not depend on the values):
- prefill: one chunk of n new tokens after p cached tokens (n in 512..8192, p in 0..64K), which
  gives b (linear term) and c (attention pairs n*(p + n/2));
- decode: one step for a batch of D sequences each attending ctx tokens, which gives a, d, e.

Attention uses ``torch.nn.functional.scaled_dot_product_attention`` over contiguous KV (no paged
kernel), so absolute numbers are an upper bound of vLLM's FlashAttention path; the fitted slopes
are what matters. Output CSV columns: kind,n,p,d,ctx,ms.

    python -m engines.sim.calibrate.measure --out step_times.csv
"""

from __future__ import annotations

import argparse
import csv
import time
from typing import Any

HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB = 4096, 32, 32, 8, 128, 14336, 128_256


def build(torch: Any, layers: int) -> list[dict[str, Any]]:
    dev, dt = "cuda", torch.bfloat16

    def w(*shape: int) -> Any:
        return torch.randn(*shape, device=dev, dtype=dt) * 0.02

    return [
        {
            "qkv": w(HIDDEN, (HEADS + 2 * KV_HEADS) * HEAD_DIM),
            "o": w(HEADS * HEAD_DIM, HIDDEN),
            "up": w(HIDDEN, 2 * FFN),
            "down": w(FFN, HIDDEN),
        }
        for _ in range(layers)
    ]


def forward(torch: Any, layers: list[dict[str, Any]], x: Any, kv_len: int, causal: bool) -> Any:
    """x: [B, n, HIDDEN]; each sequence attends kv_len cached keys plus its n new tokens."""
    f = torch.nn.functional
    b, n, _ = x.shape
    for lw in layers:
        qkv = x @ lw["qkv"]
        q, k, v = qkv.split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], dim=-1)
        q = q.view(b, n, HEADS, HEAD_DIM).transpose(1, 2)
        k = k.view(b, n, KV_HEADS, HEAD_DIM).transpose(1, 2)
        v = v.view(b, n, KV_HEADS, HEAD_DIM).transpose(1, 2)
        if kv_len:
            k = torch.cat([torch.empty(b, KV_HEADS, kv_len, HEAD_DIM, device=x.device, dtype=x.dtype), k], 2)
            v = torch.cat([torch.empty(b, KV_HEADS, kv_len, HEAD_DIM, device=x.device, dtype=x.dtype), v], 2)
        k = k.repeat_interleave(HEADS // KV_HEADS, 1)
        v = v.repeat_interleave(HEADS // KV_HEADS, 1)
        a = f.scaled_dot_product_attention(q, k, v, is_causal=causal and kv_len == 0)
        x = x + a.transpose(1, 2).reshape(b, n, -1) @ lw["o"]
        g, u = (x @ lw["up"]).chunk(2, dim=-1)
        x = x + (f.silu(g) * u) @ lw["down"]
    return x


def timed(torch: Any, fn: Any, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1000 / reps


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="step_times.csv")
    ap.add_argument("--layers", type=int, default=LAYERS)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    layers = build(torch, args.layers)
    rows: list[tuple[str, int, int, int, int, float]] = []
    with torch.inference_mode():
        for n in (512, 1024, 2048, 4096, 8192):
            for p in (0, 4096, 16384, 32768, 65536):
                x = torch.randn(1, n, HIDDEN, device="cuda", dtype=torch.bfloat16)
                ms = timed(torch, lambda x=x, p=p: forward(torch, layers, x, p, True), args.reps)
                rows.append(("prefill", n, p, 0, 0, ms))
                print(rows[-1], flush=True)
        for d in (1, 8, 32, 64, 128, 256):
            for ctx in (1024, 4096, 16384, 32768):
                if d * ctx > 4_000_000:  # KV memory of the batch
                    continue
                x = torch.randn(d, 1, HIDDEN, device="cuda", dtype=torch.bfloat16)
                ms = timed(torch, lambda x=x, ctx=ctx: forward(torch, layers, x, ctx - 1, False), args.reps)
                rows.append(("decode", 1, 0, d, ctx, ms))
                print(rows[-1], flush=True)
    with open(args.out, "w", newline="") as fh:
        wr = csv.writer(fh)
        wr.writerow(["kind", "n", "p", "d", "ctx", "ms"])
        wr.writerows(rows)


if __name__ == "__main__":
    main()
