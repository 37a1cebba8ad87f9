"""The OPD update step, opd_jax against PyTorch + transformers on the same weights and batch.

Random models of a preset's shapes are built in transformers (seeded), saved with
``save_pretrained`` and loaded into opd_jax with ``opd_jax.models.load``: both frameworks hold
the same weights. Both get the same batch: ``B`` prompts of ``P`` random token ids followed by
``N`` random response tokens (no padding; segments for the release rule: fixed 32-token
blocks). Times are medians of ``--repeats`` runs after a warm-up (opd_jax's step is compiled
ahead of time; its compile seconds are reported apart), as response tokens per second
(``B * N`` per step); ``ratio_vs_X`` is opd_jax's tokens/s over X's (> 1: opd_jax faster).

Parts (``--part``):

- ``throughput``: ``excluded``, the update alone (teacher forward, student forward and
  backward, loss, clipping, AdamW): opd_jax's jitted ``make_train_step`` (rule ``full``)
  against ``benchmarks.torch_opd``; ``included``, the same after generating the rollouts
  (``opd_jax.sampling.sample`` against ``generate``: ``N`` new tokens at temperature 1). On a
  GPU, model FLOPs utilisation against the card's bfloat16 dense peak.
- ``rule``: opd_jax's step with rule ``release`` against ``full``, and the jitted rule
  (``core.apply_rule("release", ...)`` on the scored statistics) and the step's diagnostics
  alone, as fractions of the step (target: the rule < 2%).
- ``profile``: opd_jax only: the update's parts (teacher forward, student forward and
  backward, chunked scoring and its backward, rule and diagnostics, optimizer) jitted and
  timed alone beside the whole step, with GFLOP/s and XLA's memory (``benchmarks.step_parts``).
- ``scaling``: the update against response length (``--only length``) and batch size
  (``--only batch``).

opd_jax's attention kernel is ``--attention`` (default ``auto``: cuDNN's fused flash attention
on a CUDA GPU in bfloat16, ``flash`` on CPU); runs are named by it
(``gpu/throughput/0.6b-1.7b/cudnn``), so ``--attention xla`` measures the masked scores.

A size that runs out of memory (or fails to compile, or whose process is killed) is recorded as
``oom`` (``failed``) and the benchmark goes on. On the CPU preset the frameworks alternate run
by run (the shared machine's load drifts). There ``throughput`` and ``scaling`` run each case
in a fresh process per framework (``--isolate``, ``benchmarks.isolated_workers``), which
reports its peak resident memory (``<framework>_peak_rss_gib``, the kernel's ``VmHWM``; its
memory before the first step as ``rss_before_gib``) and ``peak_rss_ratio`` (opd_jax over
torch); ``--no-isolate`` keeps every framework in this process (no peak RSS). Each process
keeps what it frees (``opd_jax.heap``; the malloc of each row's processes is
``<framework>_malloc``, this process's ``machine.malloc``) and calls
``opd_jax.heap.release_unused`` after each run, so that where the two workers' peaks together
would exceed the machine's memory (the SmolLM2 pair at B=16: 12.6 + 11.7 GiB on 23 GiB) each
gives its free memory back before the other runs; ``OPD_JAX_HEAP=system`` (inherited by the
workers) measures both with the system's malloc. On the GPU preset transformers runs, frees
the GPU, then opd_jax runs, and each part and pair runs in its own process (JAX keeps the
memory it has used).

Usage::

  python3 -m benchmarks.opd_step --preset cpu [--torch-compile]     # every part
  python3 -m benchmarks.opd_step --part scaling --pair smollm2 --lengths 256,1024 --batches 1,4
  python3 -m benchmarks.opd_step --preset gpu --part throughput --pair 0.6b-1.7b
  python3 -m benchmarks.opd_step --preset gpu --part scaling --only length --lengths 1024,2048
  python3 -m benchmarks.opd_step --preset gpu --smoke               # tiny shapes, any device
  python3 -m benchmarks.opd_step --merge A.json B.json --out results/opd_step_<device>.json

Prints a table per part and pair and merges its rows into ``--out`` (default
``benchmarks/results/opd_step_<device>.json``; ``--smoke``: the temporary directory), one run
per preset, part and pair whose rows accumulate over commands (a ladder split in two).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from typing import Any

# The environment is set here, in the module that ``-m`` runs, before its imports below start
# JAX and torch: not in benchmarks/__init__.py, where it would also reach the other benchmarks
# (plan_vs_peak and sampler measure JAX with its default allocator) and the tests that import
# benchmarks.torch_opd. The isolated workers set the same (isolated_workers imports neither).
from benchmarks.isolated_workers import set_environment

set_environment()

from benchmarks import common  # noqa: E402  (first: it sets malloc up before any thread allocates)

# isort: split
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402

from benchmarks import opd_step_compare, opd_step_rule, step_parts  # noqa: E402
from benchmarks.opd_sides import (  # noqa: E402
    PAIRS,
    SEGMENT_TOKENS,
    SHAPES,
    K,
    build_checkpoints,
    peak_flops,
)
from opd_jax import models  # noqa: E402


def _fixed(pairs: tuple[str, ...], batch: int, prompt: int, response: int) -> dict[str, Any]:
    return dict(pairs=pairs, batch=batch, prompt=prompt, response=response)


def _ladders(pair: str, prompt: int, lengths, batches, batch_response: int) -> dict[str, Any]:
    """Response lengths at batch 1, and batch sizes at ``batch_response`` tokens."""
    return dict(pairs=(pair,), prompt=prompt, lengths=lengths, length_batch=1, batches=batches,
                batch_response=batch_response)  # fmt: skip


PRESETS = {
    "cpu": dict(
        dtype="float32",
        interleave=True,
        isolate=True,  # a process per framework and case: each one's peak RSS
        repeats=3,
        # the shape OPD runs at on 2 cores, and the small one where per-operation costs show
        throughput=_fixed(("smollm2",), 4, 32, 256) | dict(small=(2, 32, 64)),
        rule=_fixed(("smollm2",), 2, 32, 64),
        profile=_fixed(("smollm2",), 4, 32, 256),
        scaling=_ladders("tiny", 32, (256, 512, 1024, 2048, 4096), (1, 2, 4, 8, 16), 256),
    ),
    "gpu": dict(
        dtype="bfloat16",
        interleave=False,
        isolate=False,
        repeats=3,
        # B=4 leaves room for the [B, heads, S, S] attention opd_jax stores without --remat
        throughput=_fixed(("0.6b-1.7b", "1.7b"), 4, 128, 1024),
        rule=_fixed(("0.6b",), 4, 128, 1024),
        profile=_fixed(("0.6b-1.7b",), 4, 128, 1024),
        scaling=_ladders("0.6b", 128, (1024, 2048, 4096, 8192, 16384), (1, 2, 4, 8, 16), 1024),
    ),
}
SMOKE = dict(
    repeats=1,
    throughput=_fixed(("tiny-qwen3",), 2, 8, 16),
    rule=_fixed(("tiny-qwen3",), 2, 8, 16),
    profile=_fixed(("tiny-qwen3",), 2, 8, 16),
    scaling=_ladders("tiny-qwen3", 8, (16, 32), (1, 2), 16),
)


# part -> (pair, dirs, args, preset, settings, frameworks) -> rows
PARTS = {
    "throughput": opd_step_compare.part_throughput,
    "rule": opd_step_rule.part_rule,
    "scaling": opd_step_compare.part_scaling,
    "profile": step_parts.part_profile,
}
COLUMNS = {"rule": opd_step_rule.COLUMNS, "profile": step_parts.COLUMNS}  # else compare's
NOTES = {
    "tok_s": "B * N response tokens / median step seconds",
    "ratio": "opd_jax tok/s / peer tok/s (> 1: opd_jax faster)",
    "model_flops": "3 F(student) + F(teacher), F = 2 L P_layer B S + 2 L B Nh H S^2 (causal "
    "attention) + 2 D V B N (vocabulary on response positions); embedding gathers, norms, "
    "softmax and rematerialised work not counted",
    "torch": "transformers SDPA attention, log-softmax + gather over vocabulary chunks under "
    "torch.utils.checkpoint, clip_grad_norm_, AdamW (fused on CUDA); torch_compile: both "
    "backbones through torch.compile, generate() eager",
    "opd_jax": "make_train_step (rule full unless stated; top-16 statistics and the step's "
    "diagnostics included), compiled ahead of time",
    "peak_gib": "opd_jax: XLA's compiled memory analysis of the step (temporaries + arguments "
    "+ outputs - donated aliases); torch: torch.cuda.max_memory_allocated (GPU only)",
    "peak_rss_gib": "isolated: each framework's process's peak resident memory (VmHWM of "
    "/proc/self/status: imports, weights, compilation, warm-up and timed runs of one case); in "
    "its result: rss_before_gib once the side is built, compile_peak_rss_gib up to the first "
    "run, steps_peak_rss_gib over the runs alone (VmHWM reset by /proc/self/clear_refs); "
    "peak_rss_ratio: opd_jax / torch",
    "optimizer": "clip_by_global_norm(1.0) + AdamW(lr 1e-5, b1 0.9, b2 0.999, eps 1e-8, "
    "weight decay 0), constant rate",
    "segments": f"fixed {SEGMENT_TOKENS}-token blocks",
    "rollouts": "N new tokens at temperature 1, no EOS stop, no top-k/top-p",
}


def _argv_without(*flags: str) -> list[str]:
    """``sys.argv[1:]`` without the given ``--flag VALUE`` / ``--flag=VALUE`` options."""
    argv, skip = [], False
    for arg in sys.argv[1:]:
        if not skip and arg.split("=")[0] not in flags:
            argv.append(arg)
        skip = not skip and arg in flags
    return argv


def _settings(args) -> dict[str, Any]:
    preset = PRESETS[args.preset] | (SMOKE if args.smoke else {})
    preset = {k: dict(v) if isinstance(v, dict) else v for k, v in preset.items()}
    for key in ("batch", "response"):
        for part in ("throughput", "rule", "profile"):
            preset[part][key] = getattr(args, key) or preset[part][key]
    for key in ("lengths", "batches"):
        preset["scaling"][key] = getattr(args, key) or preset["scaling"][key]
    for part in PARTS:
        preset[part]["pairs"] = (args.pair,) if args.pair else preset[part]["pairs"]
    preset["repeats"] = args.repeats or preset["repeats"]
    preset["isolate"] = preset["isolate"] if args.isolate is None else args.isolate
    return preset


def _parser() -> argparse.ArgumentParser:
    ints = lambda s: tuple(int(x) for x in s.split(","))  # noqa: E731
    parser = argparse.ArgumentParser(
        prog="python3 -m benchmarks.opd_step", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--part", choices=[*PARTS, "all"], default="all")
    parser.add_argument("--pair", choices=sorted(PAIRS), help="instead of the preset's")
    parser.add_argument(
        "--only", type=lambda s: s.split(","), help="excluded,included,excluded_small|length,batch"
    )
    parser.add_argument("--torch-compile", action="store_true", help="also torch.compile")
    parser.add_argument("--no-torch", action="store_true", help="opd_jax alone")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, one repeat")
    parser.add_argument("--repeats", type=int)
    parser.add_argument(
        "--isolate", action=argparse.BooleanOptionalAction,
        help="throughput and scaling: each framework in its own process per case, with its peak "
        "RSS (default on the cpu preset)",
    )  # fmt: skip
    parser.add_argument("--batch", type=int, help="throughput, rule and profile batch size")
    parser.add_argument("--response", type=int, help="throughput, rule and profile length")
    parser.add_argument("--lengths", type=ints, help="scaling response lengths, e.g. 1024,2048")
    parser.add_argument("--batches", type=ints, help="scaling batch sizes, e.g. 1,2,4")
    parser.add_argument("--chunk-size", type=int, default=1024, help="vocabulary chunk (both)")
    parser.add_argument(
        "--remat", action="store_true", help="recompute the student's blocks (both frameworks)"
    )
    parser.add_argument(
        "--attention", choices=("auto", *models.ATTENTION_KINDS), default="auto",
        help="opd_jax's attention kernel (auto: cuDNN flash on a CUDA GPU in bfloat16)",
    )  # fmt: skip
    parser.add_argument("--out", help="JSON path (default: results/opd_step_<device>.json)")
    parser.add_argument("--merge", nargs="+", help="merge these results JSONs into --out")
    return parser


def main() -> None:
    args = _parser().parse_args()
    if args.merge:
        if not args.out:
            sys.exit("--merge needs --out, e.g. benchmarks/results/opd_step_<device>.json")
        for path in args.merge:
            with open(path) as f:
                common.merge_runs(args.out, json.load(f)["runs"], "opd_step")
        print(f"wrote {args.out}")
        return
    preset = _settings(args)
    peers = ["torch"] + (["torch_compile"] if args.torch_compile else [])
    frameworks = ["opd_jax"] + ([] if args.no_torch else peers)
    parts = list(PARTS) if args.part == "all" else [args.part]
    combos = [(part, pair) for part in parts for pair in preset[part]["pairs"]]
    if not preset["interleave"] and len(combos) > 1:
        failed = []
        for part, pair in combos:  # one process each: JAX keeps the GPU memory it has used
            argv = _argv_without("--part", "--pair") + ["--part", part, "--pair", pair]
            code = subprocess.run([sys.executable, "-m", "benchmarks.opd_step", *argv]).returncode
            failed += [f"{part} {pair}"] if code else []
        sys.exit(f"failed: {', '.join(failed)}" if failed else 0)
    results_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    out = args.out or os.path.join(
        tempfile.gettempdir() if args.smoke else results_dir, f"opd_step_{common.device_tag()}.json"
    )
    attention = models.resolve_attention(args.attention, (getattr(jnp, preset["dtype"]),))
    for part, pair in combos:
        settings = preset[part]
        print(f"== {part} {pair} (attention {attention})", flush=True)
        with tempfile.TemporaryDirectory() as root:
            dirs = build_checkpoints(root, pair, preset["dtype"])
            rows = PARTS[part](pair, dirs, args, preset, settings, frameworks)
        gpu = jax.default_backend() == "gpu"
        isolated = preset["isolate"] and part not in COLUMNS  # throughput and scaling
        columns = COLUMNS.get(part) or opd_step_compare.columns(frameworks, gpu, isolated)
        common.print_table(rows, columns)
        run = {
            "rows": rows,
            "machine": common.machine(),
            "torch_threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "settings": {
                "preset": args.preset, "smoke": args.smoke, "part": part,
                "student": PAIRS[pair][0], "teacher": PAIRS[pair][1],
                "shapes": {s: SHAPES[s] for s in PAIRS[pair]},
                **{k: v for k, v in settings.items() if k != "pairs"},
                "dtype": preset["dtype"], "repeats": preset["repeats"],
                "chunk_size": args.chunk_size, "remat": args.remat, "k": K,
                "attention": attention,
                "peak_flops": peak_flops(preset["dtype"]),
                "isolate": isolated,
                "timing": "median of repeats after a warm-up; "
                + ("frameworks alternating run by run" if preset["interleave"] or isolated
                   else "one framework at a time, the GPU freed in between")
                + ("; each framework in its own process per case" if isolated else ""),
                **NOTES,
            },
        }  # fmt: skip
        name = f"{args.preset}/{part}/{pair}" + ("/remat" if args.remat else "")
        common.merge_runs(out, {f"{name}/{attention}": run}, "opd_step")
    if args.smoke:
        absent = [m for m in ("tensorflow_datasets", "grain", "nltk", "gguf") if m in sys.modules]
        print(f"imported modules that the GPU image lacks: {absent or 'none'}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
