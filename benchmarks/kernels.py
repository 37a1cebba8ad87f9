"""The update's kernels alone, opd_jax (XLA) against PyTorch, at the SmolLM2 pair's shapes.

Where the whole step against PyTorch (`benchmarks.opd_step`) falls short, this says which kernel
carries the gap, in one process, the two frameworks alternating (median of `--repeats`):

* `gemm`: a projection's three matmuls at `M = B (P + N)` rows, fp32: the forward `x @ W`, the
  input gradient `dy @ W^T` and the weight gradient `x^T @ dy`, for every projection shape of
  the decoder (q/o `D x D`, k/v `D x K H`, gate/up `D x F`, down `F x D`) and the unembedding.
* `stream`: decode's products, `B` rows times 150 distinct `[D, F]` weights (530 MB: each
  read from memory, as a decode step reads the model), at B = 1 and 8: GB/s of weights.
* `attention`: causal attention over one sequence of `S` positions at the pair's heads,
  forward and forward + backward: opd_jax's `flash` kernel (`models.attention.flash_attention`)
  against `torch.nn.functional.scaled_dot_product_attention(is_causal=True)` (PyTorch's fused
  CPU flash kernel; its keys and values repeated to the query heads beforehand, untimed).

PyTorch's idle OpenMP threads sleep (`OMP_WAIT_POLICY=PASSIVE`, as in `benchmarks.opd_step`):
spinning, they would take the cores from the JAX run that follows.
GFLOP/s count the model's FLOPs (causal attention: half the scores). `XLA_FLAGS` in the
environment applies to the JAX side and is recorded (e.g. XLA's oneDNN dots:
`--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=individual_dot`).

Usage: `python3 -m benchmarks.kernels [--rows 1152] [--lengths 1056,4128]`; prints a table and
adds a run to `benchmarks/results/kernels_<device>.json`, keyed by the XLA flags.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from benchmarks.isolated_workers import set_environment

set_environment()  # before torch starts: its idle OpenMP threads sleep

from benchmarks import common  # noqa: E402  (first: it sets malloc up before any thread allocates)

# isort: split
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.opd_sides import SHAPES  # noqa: E402
from opd_jax.models.attention import flash_attention  # noqa: E402

SHAPE = SHAPES["smollm2-135m"]


def gemm_rows(M: int, repeats: int) -> list[dict[str, Any]]:
    """One row per (projection shape, form): both frameworks' GFLOP/s and their ratio."""
    D, F, V = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["vocab_size"]
    KH = SHAPE["num_key_value_heads"] * SHAPE["head_dim"]
    shapes = {
        "q, o": (D, D),
        "k, v": (D, KH),
        "gate, up": (D, F),
        "down": (F, D),
        "unembed": (D, V),
    }
    return [row for name, shape in shapes.items() for row in _gemms(name, M, *shape, repeats)]


def _gemms(name: str, M: int, n_in: int, n_out: int, repeats: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    x, w, dy = (rng.standard_normal(s, np.float32) for s in ((M, n_in), (n_in, n_out), (M, n_out)))
    jx, jw, jdy = (jnp.asarray(a) for a in (x, w, dy))
    tx, tw, tdy = (torch.from_numpy(a) for a in (x, w, dy))
    forward, d_input, d_weight = (
        jax.jit(lambda a, b: a @ b), jax.jit(lambda a, b: a @ b.T), jax.jit(lambda a, b: a.T @ b)
    )  # fmt: skip
    forms = {
        "x @ W": (
            {"opd_jax": lambda: forward(jx, jw).block_until_ready(), "torch": lambda: tx @ tw}
        ),
        "dy @ W^T": {
            "opd_jax": lambda: d_input(jdy, jw).block_until_ready(),
            "torch": lambda: tdy @ tw.T,
        },
        "x^T @ dy": {
            "opd_jax": lambda: d_weight(jx, jdy).block_until_ready(),
            "torch": lambda: tx.T @ tdy,
        },
    }
    flop = 2.0 * M * n_in * n_out
    return [
        _row(
            "gemm",
            f"{name} {n_in}x{n_out}: {form}",
            M,
            flop,
            common.alternating_medians(runs, repeats, warmup=2),
        )
        for form, runs in forms.items()
    ]


def streaming_rows(batches: list[int], repeats: int, layers: int = 150) -> list[dict[str, Any]]:
    """Decode's products: `B` rows times `layers` distinct `[D, F]` weights (530 MB at the
    default, more than any cache holds), so each weight is read from memory once per pass;
    GB/s of weights read, both frameworks."""
    D, F = SHAPE["hidden_size"], SHAPE["intermediate_size"]
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal((D, F), np.float32) for _ in range(layers)]
    jw, tw = [jnp.asarray(w) for w in weights], [torch.from_numpy(w) for w in weights]
    total = sum(w.nbytes for w in weights)
    rows = []
    for B in batches:
        x = rng.standard_normal((B, D), np.float32)
        jx, tx = jnp.asarray(x), torch.from_numpy(x)
        ours = jax.jit(lambda x, ws: [x @ w for w in ws])
        runs = {
            "opd_jax": lambda ours=ours, jx=jx: jax.block_until_ready(ours(jx, jw)),
            "torch": lambda tx=tx: [tx @ w for w in tw],
        }
        seconds = common.alternating_medians(runs, repeats, warmup=2)
        row = _row("stream", f"B={B}: {layers} x [{D}, {F}]", B, 2.0 * B * total / 4, seconds)
        row |= {f"{k}_gb_s": total / t / 1e9 for k, t in seconds.items()}
        rows.append(row)
    return rows


def attention_rows(lengths: list[int], repeats: int) -> list[dict[str, Any]]:
    """Forward and forward + backward of causal attention over one row of each length."""
    return [row for S in lengths for row in _attention(S, repeats)]


def _attention(S: int, repeats: int) -> list[dict[str, Any]]:
    N, K, H = SHAPE["num_attention_heads"], SHAPE["num_key_value_heads"], SHAPE["head_dim"]
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, S, n, H), np.float32) for n in (N, K, K))
    lengths_B = jnp.array([S])
    jq, jk, jv = (jnp.asarray(a) for a in (q, k, v))
    forward = jax.jit(lambda q, k, v: flash_attention(q, k, v, lengths_B))
    loss = lambda q, k, v: flash_attention(q, k, v, lengths_B).sum()  # noqa: E731
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    tq = torch.from_numpy(q).transpose(1, 2).contiguous()
    tk, tv = (torch.from_numpy(a).transpose(1, 2).repeat_interleave(N // K, 1) for a in (k, v))
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def peer_forward():
        with torch.no_grad():
            sdpa(tq, tk, tv, is_causal=True)

    def peer_grads():
        a, b, c = (t.detach().requires_grad_() for t in (tq, tk, tv))
        sdpa(a, b, c, is_causal=True).sum().backward()

    flop = 4.0 * N * S * S * H / 2  # q k^T and p v over the causal half; backward: 2.5x that
    parts = {
        "forward": (1.0, lambda: forward(jq, jk, jv).block_until_ready(), peer_forward),
        "forward+backward": (3.5, lambda: jax.block_until_ready(grads(jq, jk, jv)), peer_grads),
    }
    return [
        _row(
            "attention",
            f"S={S} {part}",
            S,
            scale * flop,
            common.alternating_medians({"opd_jax": ours, "torch": peer}, repeats, warmup=2),
        )  # fmt: skip
        for part, (scale, ours, peer) in parts.items()
    ]


def _row(kind: str, case: str, size: int, flop: float, seconds: dict[str, float]) -> dict:
    return {
        "kind": kind,
        "case": case,
        "rows_or_length": size,
        "opd_jax_gflop_s": flop / seconds["opd_jax"] / 1e9,
        "torch_gflop_s": flop / seconds["torch"] / 1e9,
        "ratio_vs_torch": seconds["torch"] / seconds["opd_jax"],
        "opd_jax_ms": 1e3 * seconds["opd_jax"],
        "torch_ms": 1e3 * seconds["torch"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python3 -m benchmarks.kernels", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--rows", type=int, default=1152, help="GEMM rows M = B (P + N); 1152: B=4, 32+256"
    )
    parser.add_argument("--lengths", default="1056,4128", help="attention lengths S = P + N")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="small sizes, 3 repeats (tests)")
    parser.add_argument(
        "--out", default=None, help="JSON path (default: results/kernels_<device>.json)"
    )
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    if args.quick:
        args.rows, args.lengths, args.repeats = 64, "80", 3
    lengths = [int(s) for s in args.lengths.split(",")]
    rows = gemm_rows(args.rows, args.repeats) + attention_rows(lengths, args.repeats)
    rows += streaming_rows([1, 8], args.repeats, layers=4 if args.quick else 150)
    columns = ["kind", "case", "opd_jax_gflop_s", "torch_gflop_s", "ratio_vs_torch"]
    columns += ["opd_jax_gb_s", "torch_gb_s"]
    common.print_table(rows, columns)
    xla_flags = os.environ.get("XLA_FLAGS", "")
    settings = {"rows": args.rows, "lengths": lengths, "repeats": args.repeats,
                "torch_threads": torch.get_num_threads(), "shape": "smollm2-135m"}  # fmt: skip
    run = {"rows": rows, "machine": common.machine(), "xla_flags": xla_flags, "settings": settings}
    out = args.out or common.result_path("kernels")
    key = f"{'quick' if args.quick else 'full'}/{xla_flags or 'default'}"
    common.merge_runs(out, {key: run}, "kernels")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
