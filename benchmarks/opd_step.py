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
  against ``benchmarks/torch_opd.py``; ``included``, the same after generating the rollouts
  (``opd_jax.sampling.sample`` against ``generate``: ``N`` new tokens at temperature 1). On a
  GPU, model FLOPs utilisation against the card's bfloat16 dense peak.
- ``rule``: opd_jax's step with rule ``release`` against ``full``, and the jitted rule
  (``core.apply_rule("release", ...)`` on the scored statistics) and the step's diagnostics
  alone, as fractions of the step (target: the rule < 2%).
- ``profile``: opd_jax only: the update's parts (teacher forward, student forward and
  backward, chunked scoring and its backward, rule and diagnostics, optimizer) jitted and
  timed alone beside the whole step, with GFLOP/s and XLA's memory (``step_profile.py``).
- ``scaling``: the update against response length (``--only length``) and batch size
  (``--only batch``).

opd_jax's attention kernel is ``--attention`` (default ``auto``: cuDNN's fused flash attention
on a CUDA GPU in bfloat16, ``flash`` on CPU); runs are named by it
(``gpu/throughput/0.6b-1.7b/cudnn``), so ``--attention xla`` measures the masked scores.

A size that runs out of memory (or fails to compile) is recorded as ``oom`` (``failed``) and
the benchmark goes on. Both frameworks share a heap that keeps what it frees (``opd_jax.heap``,
recorded as ``machine.malloc``); at sizes where their two peaks together exceed the machine's
memory (the SmolLM2 pair at B=16 on 23 GiB: killed by the kernel at 24 GB) run with
``OPD_JAX_HEAP=system`` (that case then ran). On the CPU preset the frameworks alternate run
by run (the shared machine's load drifts); on the GPU preset transformers runs, frees the GPU,
then opd_jax runs, and each part and pair runs in its own process (JAX keeps the memory it has
used).

Usage::

  python3 benchmarks/opd_step.py --preset cpu [--torch-compile]     # every part
  python3 benchmarks/opd_step.py --preset gpu --part throughput --pair 0.6b-1.7b
  python3 benchmarks/opd_step.py --preset gpu --part scaling --only length --lengths 1024,2048
  python3 benchmarks/opd_step.py --preset gpu --smoke               # tiny shapes, any device
  python3 benchmarks/opd_step.py --merge A.json B.json --out results/opd_step_<device>.json

Prints a table per part and pair and merges its rows into ``--out`` (default
``benchmarks/results/opd_step_<device>.json``; ``--smoke``: the temporary directory), one run
per preset, part and pair whose rows accumulate over commands (a ladder split in two).
"""

from __future__ import annotations

import os

# Before JAX starts: it would otherwise take 75% of the GPU that transformers shares.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# Before torch starts: OpenMP threads that spin while waiting make torch 10-20x slower on a
# CPU shared with other processes (SmolLM2 decoding on 2 busy cores: 33-74 s spinning, 5-8 s
# passive, 3.4 s on one thread); idle threads sleep instead.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (first: it sets malloc up before any thread allocates)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import step_profile  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402
from opd_sides import (  # noqa: E402
    PAIRS,
    SEGMENT_TOKENS,
    SHAPES,
    JaxSide,
    K,
    TorchSide,
    build_checkpoints,
    free_memory,
    make_batch,
    peak_flops,
    step_flops,
)

from opd_jax import core, models  # noqa: E402


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


def _failure(error: BaseException) -> dict[str, Any]:
    text = f"{type(error).__name__}: {error}"
    oom = isinstance(error, MemoryError) or any(
        s in text.lower() for s in ("resource_exhausted", "out of memory", "can't allocate")
    )
    return {"status": "oom" if oom else "failed", "error": text[:400]}


def _time(run: Callable[[], Any], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times


def measure(makers: dict[str, Callable[[], Any]], cases: list[dict], repeats: int, interleave):
    """``{case name: {framework: result}}``: median seconds (``status`` ok), ``oom`` or
    ``failed``. A case has ``name``, ``kind`` (``update`` or ``rollout_update``), ``host``
    arrays, ``prompt`` and ``response``.

    ``interleave``: every framework alive and their timed runs alternating, so that a drifting
    load hits them alike; otherwise one framework at a time, freed before the next."""
    results: dict[str, dict[str, Any]] = {c["name"]: {} for c in cases}

    def attempt(side, case, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as error:  # noqa: BLE001 - a size may not fit: recorded, not fatal
            results[case["name"]][side.name] = _failure(error)
            free_memory()
            return None

    def prepare(side, case):
        def warm():
            run, info = getattr(side, case["kind"])(case["host"], case["prompt"], case["response"])
            _time(run, 2 if getattr(side, "compile", False) else 1)
            return run, info

        return attempt(side, case, warm)

    def timed(sides_runs, case):
        times = {side.name: [] for side, _ in sides_runs}
        for _ in range(repeats):
            for side, (run, _) in sides_runs:
                if side.name not in results[case["name"]]:
                    attempt(side, case, lambda r=run, s=side: times[s.name].extend(_time(r, 1)))
        for side, (_, info) in sides_runs:
            if side.name not in results[case["name"]]:
                results[case["name"]][side.name] = {
                    "status": "ok", "seconds": statistics.median(times[side.name]),
                    "times": times[side.name], **info, **getattr(side, "info", dict)(),
                    "loadavg_1m": os.getloadavg()[0],
                }  # fmt: skip
        print(f"done {case['name']} ({', '.join(s.name for s, _ in sides_runs)})", flush=True)

    groups = [list(makers.values())] if interleave else [[m] for m in makers.values()]
    for group in groups:
        sides = [make() for make in group]
        for case in cases:
            ready = [(side, prepared) for side in sides if (prepared := prepare(side, case))]
            timed(ready, case)
            del ready
            free_memory()
        for side in sides:
            side.close()
        del sides
        free_memory()
    return results


def _makers(dirs, args, dtype: str, frameworks: list[str]) -> dict[str, Callable[[], Any]]:
    chunk, remat = args.chunk_size, args.remat
    makers = {  # transformers first: on a GPU, JAX keeps the memory it has used in its pool
        "torch": lambda: TorchSide(dirs, dtype, chunk, remat),
        "torch_compile": lambda: TorchSide(dirs, dtype, chunk, remat, compile=True),
        "opd_jax": lambda: JaxSide(dirs, dtype, chunk, remat, args.attention),
    }
    return {name: make for name, make in makers.items() if name in frameworks}


def _rows(results, cases, pair: str, frameworks: list[str], dtype: str) -> list[dict]:
    peak, rows = peak_flops(dtype), []
    for case in cases:
        B, P, N = case["host"]["tokens"].shape[0], case["prompt"], case["response"]
        flops = step_flops(pair, B, P, N) if case["kind"] == "update" else None
        row = {"case": case["name"], "B": B, "P": P, "N": N, "model_tflop_per_step": None}
        for name in frameworks:
            result = row[f"{name}_result"] = results[case["name"]][name]
            row[f"{name}_tok_s"] = B * N / result["seconds"] if "seconds" in result else None
            row[f"{name}_status"] = result["status"]
            row[f"{name}_peak_gib"] = result.get("xla_peak_gib", result.get("torch_peak_gib"))
            if flops and "seconds" in result:
                row[f"{name}_tflop_s"] = flops / result["seconds"] / 1e12
                row[f"{name}_mfu"] = flops / result["seconds"] / peak if peak else None
        for name in frameworks[1:]:
            if row["opd_jax_tok_s"] and row[f"{name}_tok_s"]:
                row[f"ratio_vs_{name}"] = row["opd_jax_tok_s"] / row[f"{name}_tok_s"]
        row["model_tflop_per_step"] = flops / 1e12 if flops else None
        rows.append(row)
    return rows


def _columns(frameworks: list[str], gpu: bool) -> list[str]:
    columns = ["case", "B", "P", "N"] + [f"{name}_tok_s" for name in frameworks]
    columns += [f"{name}_status" for name in frameworks]
    columns += [f"ratio_vs_{name}" for name in frameworks[1:]]
    columns += ["opd_jax_peak_gib"] + (["torch_peak_gib"] if gpu else [])
    return columns + ([f"{name}_mfu" for name in frameworks] if gpu else [])


def part_throughput(pair, dirs, args, preset, settings, frameworks):
    """The update (``excluded``) and the update after its rollouts (``included``) at the
    preset's shape, and the update at its ``small`` shape (``excluded_small``) if it has one."""
    vocab, P = SHAPES[PAIRS[pair][0]]["vocab_size"], settings["prompt"]
    host = make_batch(settings["batch"], P, settings["response"], vocab)
    cases = [
        dict(name=name, kind=kind, host=host, prompt=P, response=settings["response"])
        for name, kind in (("excluded", "update"), ("included", "rollout_update"))
    ]
    if "small" in settings:
        B, P_small, N = settings["small"]
        host = make_batch(B, P_small, N, vocab)
        cases.append(dict(name="excluded_small", kind="update", host=host, prompt=P_small,
                          response=N))  # fmt: skip
    cases = [case for case in cases if not args.only or case["name"] in args.only]
    makers = _makers(dirs, args, preset["dtype"], frameworks)
    results = measure(makers, cases, preset["repeats"], preset["interleave"])
    return _rows(results, cases, pair, frameworks, preset["dtype"])


def part_scaling(pair, dirs, args, preset, settings, frameworks):
    vocab, P, cases = SHAPES[PAIRS[pair][0]]["vocab_size"], settings["prompt"], []
    ladders = {
        "length": [(settings["length_batch"], n) for n in settings["lengths"]],
        "batch": [(b, settings["batch_response"]) for b in settings["batches"]],
    }
    for ladder, sizes in ladders.items():
        if not args.only or ladder in args.only:
            cases += [
                dict(name=f"{ladder} B={b} N={n}", kind="update", host=make_batch(b, P, n, vocab),
                     prompt=P, response=n)
                for b, n in sizes
            ]  # fmt: skip
    makers = _makers(dirs, args, preset["dtype"], frameworks)
    results = measure(makers, cases, preset["repeats"], preset["interleave"])
    return _rows(results, cases, pair, frameworks, preset["dtype"])


def _interleaved_medians(runs: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            times[name] += _time(run, 1)
    return {name: statistics.median(ts) for name, ts in times.items()}


def part_rule(pair, dirs, args, preset, settings, frameworks):
    """opd_jax only: the step with rule release against full; the rule alone, and the
    objective after scoring (rule, loss and diagnostics), on the scored statistics."""
    B, P, N = settings["batch"], settings["prompt"], settings["response"]
    host = make_batch(B, P, N, SHAPES[PAIRS[pair][0]]["vocab_size"])
    side = JaxSide(dirs, preset["dtype"], args.chunk_size, args.remat, args.attention)
    runs = {rule: side.update(host, P, N, rule)[0] for rule in ("full", "release")}
    step = _interleaved_medians(runs, preset["repeats"])
    del runs
    params, batch = jax.device_put(side.master), jax.device_put(host)
    graphdef, teacher_graphdef, settings_ = (
        side.graphdef,
        side.teacher_graphdef,
        side.settings(P, "release"),
    )

    def hidden(params, teacher_params, batch):
        model = nnx.merge(graphdef, params)
        teacher = nnx.merge(teacher_graphdef, teacher_params)
        tokens, mask, attention = batch["tokens"], batch["attention_mask"], side.attention
        h_s = model.response_hidden(tokens, mask, P, attention=attention)
        h_t = teacher.response_hidden(tokens, mask, P, attention=attention)
        return model, teacher, h_s, h_t

    @jax.jit
    def score(params, teacher_params, batch):
        model, teacher, h_s, h_t = hidden(params, teacher_params, batch)
        return core.score_chunked(
            h_s, model.unembed_matrix(), h_t, teacher.unembed_matrix(), batch["tokens"][:, P:],
            k=K, chunk_size=args.chunk_size,
        )  # fmt: skip

    forwards = jax.jit(lambda *a: hidden(*a)[2:])  # both models' hidden states alone

    scored = jax.block_until_ready(score(params, side.teacher_params, batch))
    r, seg = batch["response_mask"][:, P:], batch["seg"]
    rule = jax.jit(lambda s, r, seg: core.apply_rule("release", core.RuleBatch(s, r, seg)))
    # the step's objective after scoring: the rule, the loss, the diagnostics of
    # docs/method.md §7 and five rules' kept fractions
    objective = jax.jit(
        lambda scored, r, seg: core.objective_from_scores(
            scored, r, seg, None, settings_.objective
        )[0]
    )
    many = max(20, preset["repeats"])
    rule_s = common.median_seconds(lambda: rule(scored.stats, r, seg), many)
    objective_s = common.median_seconds(lambda: objective(scored, r, seg), many)
    score_s = common.median_seconds(lambda: score(params, side.teacher_params, batch), 3)
    forwards_s = common.median_seconds(lambda: forwards(params, side.teacher_params, batch), 3)
    side.close()
    return [
        {
            "case": "rule", "B": B, "P": P, "N": N, "step_full_s": step["full"],
            "step_release_s": step["release"],
            "release_minus_full_frac": step["release"] / step["full"] - 1,
            "forwards_s": forwards_s, "score_s": score_s, "rule_s": rule_s,
            "rule_frac": rule_s / step["release"],
            "objective_s": objective_s,
            "objective_frac": objective_s / step["release"],
            "rule_below_2pct": rule_s / step["release"] < 0.02,
            "loadavg_1m": os.getloadavg()[0],
        }
    ]  # fmt: skip


def part_profile(pair, dirs, args, preset, settings, frameworks):
    """opd_jax only: the update's parts timed alone beside the whole step
    (``step_profile.profile``), and XLA's memory of the step."""
    B, P, N = settings["batch"], settings["prompt"], settings["response"]
    host = make_batch(B, P, N, SHAPES[PAIRS[pair][0]]["vocab_size"])
    side = JaxSide(dirs, preset["dtype"], args.chunk_size, args.remat, args.attention)
    shapes = tuple(SHAPES[s] for s in PAIRS[pair])
    rows = step_profile.profile(side, host, P, shapes, preset["repeats"], common.median_seconds)
    side.close()
    return [dict(row, case=row["part"], B=B, P=P, N=N) for row in rows]


PARTS = {
    "throughput": part_throughput,
    "rule": part_rule,
    "scaling": part_scaling,
    "profile": part_profile,
}
RULE_COLUMNS = [
    "B", "P", "N", "step_full_s", "step_release_s", "release_minus_full_frac", "forwards_s",
    "score_s", "rule_s",
    "rule_frac", "objective_s", "objective_frac", "rule_below_2pct",
]  # fmt: skip
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
    "optimizer": "clip_by_global_norm(1.0) + AdamW(lr 1e-5, b1 0.9, b2 0.999, eps 1e-8, "
    "weight decay 0), constant rate",
    "segments": f"fixed {SEGMENT_TOKENS}-token blocks",
    "rollouts": "N new tokens at temperature 1, no EOS stop, no top-k/top-p",
}


def merge_runs(out: str, runs: dict[str, dict[str, Any]]) -> None:
    """Adds ``runs`` to the JSON at ``out``: a run's rows replace those of the same case and
    join the others (a ladder may be measured over several commands); its other keys (machine,
    settings) replace the old ones."""
    payload = {"benchmark": "opd_step", "runs": {}}
    if os.path.exists(out):
        with open(out) as f:
            payload = json.load(f)
    for name, run in runs.items():
        old = payload["runs"].get(name, {}).get("rows", [])
        cases = {row["case"] for row in run["rows"]}
        rows = [row for row in old if row.get("case") not in cases] + run["rows"]
        payload["runs"][name] = run | {"rows": rows}
    common.write_json(out, payload)


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
    return preset


def _parser() -> argparse.ArgumentParser:
    ints = lambda s: tuple(int(x) for x in s.split(","))  # noqa: E731
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
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
                merge_runs(args.out, json.load(f)["runs"])
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
            code = subprocess.run([sys.executable, os.path.abspath(__file__), *argv]).returncode
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
        columns = {"rule": RULE_COLUMNS, "profile": step_profile.COLUMNS}
        common.print_table(rows, columns.get(part) or _columns(frameworks, gpu))
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
                "timing": "median of repeats after a warm-up; "
                + ("frameworks alternating run by run" if preset["interleave"]
                   else "one framework at a time, the GPU freed in between"),
                **NOTES,
            },
        }  # fmt: skip
        name = f"{args.preset}/{part}/{pair}" + ("/remat" if args.remat else "")
        merge_runs(out, {f"{name}/{attention}": run})
    if args.smoke:
        absent = [m for m in ("tensorflow_datasets", "grain", "nltk", "gguf") if m in sys.modules]
        print(f"imported modules that the GPU image lacks: {absent or 'none'}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
