"""Fit the step-time constants a..e from a CSV of measured steps (least squares, no numpy).

Rows: ``kind,n,p,d,ctx,ms`` (``measure.py``'s output, or published points entered by hand:
``published_points.csv`` holds the figures of shared/reference/h100-llama3-8b.md). Kinds:
    prefill: one step,   ms = a + b*n + c*n*(p + n/2)
    ttft:    a single request's whole prefill, the sum of those over 8192-token chunks
    decode:  one step,   ms = a + d*D + e*D*ctx
Prints the constants and each row's residual in percent, the table docs/calibration.md shows.

    python -m engines.sim.calibrate.fit step_times.csv
"""

from __future__ import annotations

import csv
import sys

BUDGET = 8192  # max_num_batched_tokens: a "ttft" row is prefilled in chunks of this size


def features(kind: str, n: int, p: int, d: int, ctx: int) -> list[float]:
    if kind == "prefill":
        return [1.0, n, n * (p + n / 2), 0.0, 0.0]
    if kind == "ttft":  # a whole single-request prefill of n tokens after p cached: sum of chunks
        f = [0.0] * 5
        done = p
        while done < p + n:
            m = min(BUDGET, p + n - done)
            f = [x + y for x, y in zip(f, [1.0, m, m * (done + m / 2), 0.0, 0.0], strict=True)]
            done += m
        return f
    return [1.0, 0.0, 0.0, d, d * ctx]


def solve(a: list[list[float]], y: list[float]) -> list[float]:
    """Normal equations with column scaling, Gauss-Jordan with partial pivoting."""
    k = len(a[0])
    scale = [max(abs(r[j]) for r in a) or 1.0 for j in range(k)]
    xs = [[r[j] / scale[j] for j in range(k)] for r in a]
    m = [
        [sum(r[i] * r[j] for r in xs) for j in range(k)] + [sum(r[i] * v for r, v in zip(xs, y, strict=True))]
        for i in range(k)
    ]
    for c in range(k):
        piv = max(range(c, k), key=lambda i: abs(m[i][c]))
        m[c], m[piv] = m[piv], m[c]
        if abs(m[c][c]) < 1e-12:
            continue  # no data for this constant: leave it 0
        for i in range(k):
            if i != c:
                f = m[i][c] / m[c][c]
                m[i] = [vi - f * vc for vi, vc in zip(m[i], m[c], strict=True)]
    return [(m[i][k] / m[i][i] if abs(m[i][i]) >= 1e-12 else 0.0) / scale[i] for i in range(k)]


def main(path: str) -> None:
    rows: list[tuple[str, int, int, int, int, float]] = []
    with open(path) as fh:
        for rec in csv.DictReader(fh):
            rows.append(
                (rec["kind"], int(rec["n"]), int(rec["p"]), int(rec["d"]), int(rec["ctx"]), float(rec["ms"]))
            )
    a = [features(*r[:5]) for r in rows]
    y = [r[5] for r in rows]
    # Relative least squares: a 6 ms decode step and a 10 s prefill weigh the same in percent.
    coef = solve([[x / v for x in f] for f, v in zip(a, y, strict=True)], [1.0] * len(y))
    print("a_ms={:.4g} b_ms={:.4g} c_ms={:.4g} d_ms={:.4g} e_ms={:.4g}".format(*coef))
    for r, f in zip(rows, a, strict=True):
        model = sum(ci * fi for ci, fi in zip(coef, f, strict=True))
        print(
            f"{r[0]:8s} n={r[1]:6d} p={r[2]:6d} D={r[3]:4d} ctx={r[4]:6d} "
            f"measured {r[5]:9.2f} model {model:9.2f} ms ({(model / r[5] - 1) * 100:+.1f} %)"
        )


if __name__ == "__main__":
    main(sys.argv[1])
