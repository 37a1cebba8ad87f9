"""The release rule's cost, against a vectorised NumPy implementation of the same maths.

Three measurements on one synthetic batch (sentence-like segments of 10-40 tokens, response
lengths between T/4 and T, a planted collapse of the teacher's margin in half of the rows):

1. ``rule``: margin (``gap`` over the student's top-K) -> sentence means -> BIC change point
   -> mask, from the K-sized statistics a scoring pass produces; jitted JAX vs NumPy.
2. ``score+rule``: the same from final hidden states, scoring the vocabulary in chunks
   (``core.score_chunked``) vs a NumPy scorer that also works chunk by chunk.
3. ``memory``: the compiled peak temporary memory of chunked scoring vs full logits.

Usage: ``python3 -m benchmarks.release_rule_cost [--size small|paper]``; prints a table and
writes ``benchmarks/results/release_rule_<device>.json``. ``paper`` is B=64, T=4096, K=16,
V=151,936 (for an accelerator); ``small`` fits a 2-core CPU in a few minutes.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from opd_jax import core

SIZES = {
    "small": dict(batch=8, length=1024, scoring_batch=2, scoring_length=1024),
    "paper": dict(batch=64, length=4096, scoring_batch=64, scoring_length=4096),
}
K, VOCAB, WIDTH, CHUNK = 16, 151_936, 64, 1024
NUMPY_SCORING_MAX_ROWS = 16_384  # beyond this the NumPy scorer takes minutes per repeat


def synthetic_batch(batch: int, length: int, seed: int = 0):
    """Teacher log-probs on the student's top-K ``[B, T, K]``, segments and response mask."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(length // 4, length + 1, size=batch)
    response = np.arange(length)[None] < lengths[:, None]
    seg = np.full((batch, length), -1, np.int32)
    for b in range(batch):
        sentence_ends = np.cumsum(rng.integers(10, 41, size=length))
        seg[b, : lengths[b]] = np.searchsorted(sentence_ends, np.arange(lengths[b]), side="right")
    collapse = np.where(rng.random(batch) < 0.5, rng.uniform(0.3, 0.8, batch), 2.0) * lengths
    gap_scale = np.where(np.arange(length)[None] < collapse[:, None], 2.0, 0.3)
    gaps = rng.exponential(1.0, size=(batch, length, K)) * gap_scale[..., None]
    q = -0.05 - np.cumsum(gaps, axis=-1)
    q = rng.permuted(q, axis=-1)  # the student's order is not the teacher's
    return q.astype(np.float32), seg, response


def numpy_release(q_BxTxK: np.ndarray, seg: np.ndarray, response: np.ndarray) -> np.ndarray:
    """The release rule with docs/method.md's defaults, vectorised NumPy in float64."""
    top2 = -np.partition(-q_BxTxK.astype(np.float64), 1, axis=-1)[..., :2]
    margin = top2[..., 0] - top2[..., 1]
    batch, length = seg.shape
    valid = response & (seg >= 0)
    ids = (np.arange(batch)[:, None] * length + seg)[valid]
    sums = np.bincount(ids, weights=margin[valid], minlength=batch * length).reshape(batch, length)
    counts = np.bincount(ids, minlength=batch * length).reshape(batch, length)
    x = np.where(counts > 0, sums / np.maximum(counts, 1), 0.0)
    n = np.where(valid, seg + 1, 0).max(axis=1)
    in_series = np.arange(length)[None] < n[:, None]
    nf = np.maximum(n, 1)[:, None].astype(np.float64)
    x = np.where(in_series, x - (x * in_series).sum(1, keepdims=True) / nf, 0.0)
    c1, c2 = np.cumsum(x, 1), np.cumsum(x * x, 1)
    tot1, rss0 = c1[:, -1:], c2[:, -1:]
    pre = np.arange(1, length + 1)[None].astype(np.float64)
    post = nf - pre
    mu_pre, mu_post = c1 / pre, (tot1 - c1) / np.maximum(post, 1)
    rss1 = np.maximum(c2 - c1 * mu_pre, 0) + np.maximum(rss0 - c2 - (tot1 - c1) * mu_post, 0)
    ok = (pre >= 2) & (post >= 2) & (mu_pre > mu_post)
    with np.errstate(divide="ignore"):
        bic1 = np.where(ok, nf * np.log(rss1 / nf + 1e-8) + 3 * np.log(nf), np.inf)
        bic0 = nf * np.log(rss0 / nf + 1e-8) + np.log(nf)
    best = bic1.argmin(1)
    released = bic1[np.arange(batch), best] < bic0[:, 0]
    boundary_seg = np.where(released, best + 1, np.iinfo(np.int32).max)
    return (response & (seg < boundary_seg[:, None])).astype(np.float32)


def stats_of(q_BxTxK: np.ndarray) -> core.TokenStats:
    """A TokenStats carrying the teacher values the ``gap`` margin reads."""
    shape = q_BxTxK.shape
    zeros = jnp.zeros(shape, jnp.float32)
    ids = jnp.broadcast_to(jnp.arange(K, dtype=jnp.int32), shape)
    flat = jnp.zeros(shape[:2], jnp.float32)
    return core.TokenStats(
        jnp.zeros(shape[:2], jnp.int32),
        flat,
        flat,
        ids,
        zeros,
        jnp.asarray(q_BxTxK),
        ids,
        zeros,
        zeros,
    )


def bench_rule(batch: int, length: int, repeats: int) -> dict:
    q, seg, response = synthetic_batch(batch, length)
    stats, seg_j, resp_j = stats_of(q), jnp.asarray(seg), jnp.asarray(response)
    rule = jax.jit(lambda s, g, r: core.RULES["release"](core.RuleBatch(s, r, g)))
    w_jax = np.asarray(rule(stats, seg_j, resp_j))
    w_np = numpy_release(q, seg, response)
    t_jax = common.median_seconds(lambda: rule(stats, seg_j, resp_j), repeats)
    t_np = common.median_seconds(lambda: numpy_release(q, seg, response), repeats, warmup=0)
    return {
        "measure": "rule",
        "B": batch,
        "T": length,
        "K": K,
        "jax_s": t_jax,
        "numpy_s": t_np,
        "speedup": t_np / t_jax,
        "rows_released": float(np.mean(w_jax.sum(1) < response.sum(1))),
        "mask_agreement": float(np.mean(w_jax == w_np)),
    }


def numpy_score_release(h_s, w_s, h_t, w_t, seg, response):
    """NumPy chunked scoring (logits, top-K, log-probs) followed by :func:`numpy_release`."""
    rows = h_s.shape[0] * h_s.shape[1]
    hs, ht = h_s.reshape(rows, -1), h_t.reshape(rows, -1)
    q_topk = np.empty((rows, K), np.float32)
    for start in range(0, rows, CHUNK):
        z_s, z_t = hs[start : start + CHUNK] @ w_s, ht[start : start + CHUNK] @ w_t
        ids = np.argpartition(-z_s, K - 1, axis=-1)[:, :K]
        z_max = z_t.max(-1, keepdims=True)
        lse = z_max + np.log(np.exp(z_t - z_max).sum(-1, keepdims=True))
        q_topk[start : start + CHUNK] = np.take_along_axis(z_t, ids, -1) - lse
    return numpy_release(q_topk.reshape(h_s.shape[:2] + (K,)), seg, response)


def bench_scoring(batch: int, length: int, repeats: int) -> dict:
    _, seg, response = synthetic_batch(batch, length)
    keys = jax.random.split(jax.random.key(0), 3)
    h = jax.random.normal(keys[0], (batch, length, WIDTH))
    w_s = jax.random.normal(keys[1], (WIDTH, VOCAB)) / np.sqrt(WIDTH)
    w_t = 2.0 * jax.random.normal(keys[2], (WIDTH, VOCAB)) / np.sqrt(WIDTH)
    seg_j, resp_j = jnp.asarray(seg), jnp.asarray(response)

    @jax.jit
    def score_and_release(h, w_s, w_t, y):
        scored = core.score_chunked(h, w_s, h, w_t, y, k=K, chunk_size=CHUNK)
        return core.RULES["release"](core.RuleBatch(scored.stats, resp_j, seg_j)), scored.token_loss

    y = jnp.zeros((batch, length), jnp.int32)
    t_jax = common.median_seconds(lambda: score_and_release(h, w_s, w_t, y), repeats)
    rule_only = jax.jit(lambda s: core.RULES["release"](core.RuleBatch(s, resp_j, seg_j)))
    stats = jax.jit(
        lambda h, a, b, y: core.score_chunked(h, a, h, b, y, k=K, chunk_size=CHUNK).stats
    )(h, w_s, w_t, y)
    t_rule = common.median_seconds(lambda: rule_only(stats), repeats)
    row = {
        "measure": "score+rule",
        "B": batch,
        "T": length,
        "K": K,
        "V": VOCAB,
        "jax_s": t_jax,
        "rule_fraction": t_rule / t_jax,
        "numpy_s": None,
        "speedup": None,
    }
    memory_stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in memory_stats:  # accelerators only: measured, not compiled
        row["peak_gib_measured"] = memory_stats["peak_bytes_in_use"] / 2**30
    if batch * length <= NUMPY_SCORING_MAX_ROWS:
        args = [np.asarray(a) for a in (h, w_s, h, w_t)]
        t_np = common.median_seconds(lambda: numpy_score_release(*args, seg, response), 1, warmup=0)
        row.update(numpy_s=t_np, speedup=t_np / t_jax)
    return row


def bench_memory(batch: int, length: int) -> dict:
    h = jax.ShapeDtypeStruct((batch, length, WIDTH), jnp.float32)
    w = jax.ShapeDtypeStruct((WIDTH, VOCAB), jnp.float32)
    y = jax.ShapeDtypeStruct((batch, length), jnp.int32)

    def chunked(h, w, y):
        return core.score_chunked(h, w, h, w, y, k=K, chunk_size=CHUNK)

    def full(h, w, y):
        return core.token_stats(h @ w, h @ w, y, k=K), core.token_loss(h @ w, h @ w, y)

    temp, notes = {}, []
    for name, fn in (("chunked", chunked), ("full", full)):
        try:
            compiled = jax.jit(fn).lower(h, w, y).compile()
            temp[name] = compiled.memory_analysis().temp_size_in_bytes / 2**30
        except jax.errors.JaxRuntimeError as error:  # e.g. a GPU autotuner out of memory
            temp[name] = None
            notes.append(f"{name} does not compile: {str(error).splitlines()[-1][:160]}")
    return {
        "measure": "memory",
        "B": batch,
        "T": length,
        "K": K,
        "V": VOCAB,
        "chunked_temp_gib": temp["chunked"],
        "full_temp_gib": temp["full"],
        "notes": notes,
        "full_logits_gib": batch * length * VOCAB * 4 / 2**30,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python3 -m benchmarks.release_rule_cost", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--out", default=None, help="JSON path (default: results/release_rule_<device>.json)"
    )
    args = parser.parse_args()
    size = SIZES[args.size]
    rows = [
        bench_rule(size["batch"], size["length"], args.repeats),
        bench_scoring(size["scoring_batch"], size["scoring_length"], max(1, args.repeats // 2)),
        bench_memory(size["scoring_batch"], size["scoring_length"]),
    ]
    common.print_table(
        rows[:2],
        [
            "measure",
            "B",
            "T",
            "jax_s",
            "numpy_s",
            "speedup",
            "rule_fraction",
            "mask_agreement",
            "peak_gib_measured",
        ],
    )
    common.print_table(
        rows[2:], ["measure", "B", "T", "V", "chunked_temp_gib", "full_temp_gib", "full_logits_gib"]
    )
    # the committed results keep the name of this module's former self, release_rule.py
    out = args.out or common.result_path("release_rule")
    common.write_json(
        out,
        {"benchmark": "release_rule", "size": args.size, "machine": common.machine(), "rows": rows},
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
