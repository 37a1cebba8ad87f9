"""Does ``opd-jax plan`` predict a real step's memory? The plan against a measured peak.

For one case per process: ``plan(config)`` (the parameter, optimizer and teacher shards, XLA's
memory analysis of the compiled step, the sampler's KV cache; nothing allocated), then a
:class:`Session` built from the same config runs two real steps (rollout, segments, update).

What is measured depends on the device:

- GPU/TPU: the allocator's ``bytes_in_use`` before the session is built, and its
  ``peak_bytes_in_use`` after each phase. JAX cannot reset the peak: it covers loading, the
  sampler (KV cache), compilation (autotuning scratch) and both steps; ``peak_phase`` names
  the phase in which it last rose.
- CPU (``memory_stats()`` is None): the process's resident set, VmRSS before and VmHWM after,
  the high-water mark reset (``/proc/self/clear_refs``) before each phase; ``measured_peak``
  is that of the second step (no compilation). This is host memory of the whole process
  (compiled code, tokenizer, host copies of rollouts and checkpoints), not device memory: a
  rough upper bound at best, and the JSON says so.

The plan's ``total`` adds the sampler's KV cache and the step's temporaries, which are never
alive at once; ``concurrent`` = parameters + optimizer + teacher + max(temporaries, KV cache) is
the tighter prediction. Both ratios are printed, and ``update_2_growth``: the second update's
peak over what was in use when it started, against the plan's temporaries (on a device, only
meaningful when the peak rose in that phase).

Cases (``--case``):

- ``tiny``: 1-layer random models and the tiny tokenizer, a smoke run;
- ``smollm2``: ``configs/smollm2_layers.yaml`` (SmolLM2-135M GGUF teacher, every other layer as
  the student), offline;
- ``qwen3-0.6b``: a random Qwen3-0.6B-shaped student and a Qwen3-1.7B-shaped teacher;
- ``qwen3-1.7b``: a random Qwen3-1.7B-shaped student and teacher (one checkpoint, loaded twice).

The Qwen3 cases take ``configs/paper_qwen3_8b_to_0p6b.yaml``'s settings (``train.remat`` on) with
smaller models and batches, ``optim.accumulate`` 1 unless ``--accumulate``. Their bfloat16
checkpoints are written by ``init_checkpoint`` with the tiny tokenizer (prompts use its ids;
sampled ids span the model's 151,936-token vocabulary, so segments are ``fixed`` blocks computed
without decoding). ``--smoke`` shrinks them to CPU size (vocabulary kept).

Usage: ``python3 -m benchmarks.plan_vs_peak --case CASE [--batch B] [--prompt P] [--response N]
[--accumulate A] [--smoke] [--checkpoints DIR] [--set KEY=VALUE ...]``; prints a table and
merges the case into ``benchmarks/results/memory_plan_<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from benchmarks import common
from opd_jax import text_segments as segments
from opd_jax.config import Config, load_config
from opd_jax.memory_plan import GIB, plan
from opd_jax.models.scratch import init_checkpoint
from opd_jax.models.testing import tiny_hf_config, train_tiny_tokenizer
from opd_jax.train.session import Session

ROOT = Path(__file__).resolve().parent.parent
QWEN3 = dict(
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=151936,
    tie_word_embeddings=True,
    rope_theta=1e6,
    max_position_embeddings=40960,
)
SHAPES = {
    "0.6b": QWEN3 | dict(hidden_size=1024, intermediate_size=3072),
    "1.7b": QWEN3 | dict(hidden_size=2048, intermediate_size=6144),
}
SMOKE = dict(
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    max_position_embeddings=4096,
)  # fmt: skip
SMOKE_WIDTH = {"0.6b": (64, 192), "1.7b": (96, 288)}  # hidden, intermediate
QWEN_CASES = {"qwen3-0.6b": ("0.6b", "1.7b"), "qwen3-1.7b": ("1.7b", "1.7b")}  # student, teacher
PROMPTS = (
    "What is 12 + 30? Explain each step.",
    "The quick brown fox jumps over the lazy dog. Why was it not amused?",
    "Distillation moves knowledge from a teacher to a student model. Summarise how.",
    "Caf\u00e9 cr\u00e8me: write a short r\u00e9sum\u00e9 of it.",
)


def qwen_checkpoint(root: Path, size: str, smoke: bool) -> Path:
    """A random bfloat16 Qwen3-shaped checkpoint at ``root/qwen3-SIZE[-smoke]``, written once
    (on the host CPU, so that no device memory is touched before the measurement)."""
    path = root / f"qwen3-{size}{'-smoke' if smoke else ''}"
    if (path / "config.json").exists():
        return path
    shape = SHAPES[size]
    if smoke:
        hidden, intermediate = SMOKE_WIDTH[size]
        shape = shape | SMOKE | dict(hidden_size=hidden, intermediate_size=intermediate)
    with jax.default_device(jax.devices("cpu")[0]):
        init_checkpoint(
            path, tiny_hf_config("qwen3", **shape), train_tiny_tokenizer(), dtype=jnp.bfloat16
        )
    return path


def case_config(args: argparse.Namespace, root: Path) -> Config:
    """The case's training config (its checkpoints written under ``root`` if needed)."""
    sizes = [
        f"data.batch_size={args.batch}",
        f"data.max_prompt_tokens={args.prompt}",
        f"sampling.max_new_tokens={args.response}",
        f"optim.accumulate={args.accumulate}",
    ]
    if args.case == "smollm2":
        return load_config(ROOT / "configs/smollm2_layers.yaml", [*sizes, *args.overrides])
    if args.case == "tiny":
        tokenizer = train_tiny_tokenizer()
        small = dict(num_hidden_layers=1, hidden_size=32, intermediate_size=48)
        for name, family, width, seed in (("student", "qwen3", 32, 0), ("teacher", "llama", 48, 1)):
            if not (root / name / "config.json").exists():
                config = tiny_hf_config(family, **small | {"hidden_size": width})
                init_checkpoint(root / name, config, tokenizer, seed=seed)
        paths = [f"student.path={root / 'student'}", f"teacher.path={root / 'teacher'}"]
        return load_config(None, [*paths, *sizes, "score.chunk_size=8", *args.overrides])
    student, teacher = (qwen_checkpoint(root, s, args.smoke) for s in QWEN_CASES[args.case])
    return load_config(
        ROOT / "configs/paper_qwen3_8b_to_0p6b.yaml",
        [
            f"student.path={student}",
            f"teacher.path={teacher}",
            *sizes,
            "segments.kind=fixed",
            f"score.chunk_size={min(2048, args.batch * args.response)}",
            *args.overrides,
        ],
    )


class Probe:
    """Memory in use now and at its peak: the device allocator's where it reports, else the
    process's resident set (VmRSS / VmHWM, the mark reset through ``/proc/self/clear_refs``)."""

    def __init__(self):
        self.device = jax.devices()[0]
        self.kind = "device" if self.device.memory_stats() else "process_rss"
        self.resettable = self.kind == "process_rss" and self._clear_refs()

    @staticmethod
    def _clear_refs() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to VmRSS (Linux >= 4.0)
            return True
        except OSError:
            return False

    def reset(self) -> None:
        """Starts a new peak where possible (a device allocator's peak cannot be reset)."""
        if self.resettable:
            self._clear_refs()

    def read(self) -> dict[str, int]:
        if self.kind == "device":
            stats = self.device.memory_stats()
            return {
                "in_use": stats["bytes_in_use"],
                "peak": stats["peak_bytes_in_use"],
                "limit": stats.get("bytes_limit"),
            }
        status = {}
        with open("/proc/self/status") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name in ("VmRSS", "VmHWM"):
                    status[name] = int(value.split()[0]) * 1024
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {"in_use": status["VmRSS"], "peak": status["VmHWM"], "ru_maxrss": maxrss}


def measure(config: Config, probe: Probe) -> dict[str, Any]:
    """Builds the session and runs two steps, reading ``probe`` around each phase. Running out
    of memory is a result (``out_of_memory``: the phase and XLA's message), not a failure."""
    phases: dict[str, dict[str, Any]] = {}
    baseline = probe.read()
    result: dict[str, Any] = {"baseline": baseline, "phases": phases}

    def phase(name, fn):  # fn returns its result when its device work is done
        probe.reset()
        before, start = probe.read()["in_use"], time.perf_counter()
        result["out_of_memory"] = name  # until fn returns
        out = fn()
        phases[name] = probe.read() | {"before": before, "seconds": time.perf_counter() - start}
        del result["out_of_memory"]
        return out

    def build():
        session = Session.build(config)
        jax.block_until_ready((session.state, session.teacher_params))
        return session

    def steps(session):
        p, kind = session.prompt_len, config.segments.kind
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(config.data.batch_size)]
        tokens, mask = session.encode(prompts)
        for step in (1, 2):
            key = jax.random.fold_in(jax.random.key(config.seed), step)
            rollout = phase(f"rollout_{step}", lambda key=key: session.rollout(tokens, mask, key))

            def update(rollout=rollout, key=key):
                if kind == "sentence":
                    seg = session.segments(rollout)[0]
                else:  # no decoding: sampled ids may lie outside the tokenizer's vocabulary
                    block = config.segments.tokens
                    seg = segments.segment_ids(kind, rollout[1][:, p:], tokens=block)
                metrics = session.update(session.device_batch(rollout, seg), key)
                return jax.block_until_ready((metrics, session.state))[0]

            result["loss"] = float(phase(f"update_{step}", update)["loss"])

    try:
        steps(phase("build", build))
    except Exception as error:  # jaxlib's XlaRuntimeError (its module moves between versions)
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        result["out_of_memory"] = (
            result.get("out_of_memory", "") + ": " + str(error).strip().splitlines()[0][:400]
        )
        phases["at_error"] = probe.read()
    if probe.kind == "device" or "out_of_memory" in result:
        # cumulative on a device: the peak of everything since the process started
        last = list(phases)[-1]
        peak = phases[last]["peak"]
        result["peak_phase"] = next(name for name, v in phases.items() if v["peak"] == peak)
    else:
        steady = ("rollout_2", "update_2")
        peak = max(phases[name]["peak"] for name in steady)
        result["peak_phase"] = max(steady, key=lambda name: phases[name]["peak"])
    result["peak_bytes"] = peak - baseline["in_use"]
    result["peak_all_phases_bytes"] = max(v["peak"] for v in phases.values()) - baseline["in_use"]
    if "build" in phases:
        result["resident_bytes"] = phases["build"]["in_use"] - baseline["in_use"]
    if "update_2" in phases:  # the second update's growth over what was alive at its start
        # (on a device, only meaningful when the peak rose in that phase)
        update = phases["update_2"]
        result["update_2_transient_bytes"] = update["peak"] - update["before"]
    return result


def summary(predicted: dict[str, float], measured: dict[str, Any]) -> dict[str, Any]:
    """One table row: the plan's rows, its totals and the measured GiB, with ratios."""
    resident = ("student_params", "optimizer_state", "teacher_params")
    row: dict[str, Any] = {k: predicted[k] for k in resident}
    row["temporaries"] = predicted["step_temporaries"]
    row["kv_cache"] = predicted["sampler_kv_cache"]
    row["plan_total"] = predicted["total"]
    row["plan_concurrent"] = sum(row[k] for k in resident) + max(
        row["temporaries"], row["kv_cache"]
    )
    row["resident"] = measured.get("resident_bytes", float("nan")) / GIB
    row["peak"] = measured["peak_bytes"] / GIB
    if "out_of_memory" in measured:
        row["peak"] = f"OOM ({measured['out_of_memory'].split(':')[0]})"
        return row
    row["peak/plan"] = row["peak"] / row["plan_total"]
    row["peak/concurrent"] = row["peak"] / row["plan_concurrent"]
    row["update_2_growth"] = measured["update_2_transient_bytes"] / GIB
    row["growth/temporaries"] = row["update_2_growth"] / row["temporaries"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python3 -m benchmarks.plan_vs_peak", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--case", required=True, choices=["tiny", "smollm2", *QWEN_CASES])
    parser.add_argument("--batch", type=int, help="data.batch_size (default: the case's)")
    parser.add_argument("--prompt", type=int, help="data.max_prompt_tokens")
    parser.add_argument("--response", type=int, help="sampling.max_new_tokens")
    parser.add_argument("--accumulate", type=int, default=1, help="optim.accumulate")
    parser.add_argument("--smoke", action="store_true", help="Qwen3 cases at CPU size")
    parser.add_argument("--checkpoints", help="keep (and reuse) written checkpoints here")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    qwen = args.case in QWEN_CASES
    defaults = {
        "tiny": (2, 96, 12),
        "smollm2": (4, 80, 48),
        "qwen": (2, 64, 32) if args.smoke else (8, 256, 512),
    }["qwen" if qwen else args.case]
    args.batch = args.batch or defaults[0]
    args.prompt = args.prompt or defaults[1]
    args.response = args.response or defaults[2]
    if args.smoke and not qwen:
        parser.error("--smoke applies to the qwen3 cases")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        # The step compiled by plan() is the one the session runs: a persistent cache compiles
        # it once (and keeps the compiler's scratch out of the measured phases).
        jax.config.update("jax_compilation_cache_dir", os.path.join(tmp, "jax_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
        root = Path(args.checkpoints or tmp)
        root.mkdir(parents=True, exist_ok=True)
        config = case_config(args, root)
        written = time.perf_counter() - start
        predicted = plan(config)
        probe = Probe()
        measured = measure(config, probe)
    name = args.case + ("-smoke" if args.smoke else "")
    row = {"case": name, "memory": probe.kind} | summary(predicted["gib_per_device"], measured)
    columns = list(dict.fromkeys([*row, "peak/plan", "peak/concurrent"]))
    common.print_table([row], columns)
    print(f"peak set in phase {measured['peak_phase']}; {time.perf_counter() - start:.0f} s")
    if "limit" in measured["baseline"]:
        print(f"device memory limit {measured['baseline']['limit'] / GIB:.2f} GiB")
    if probe.kind == "process_rss":
        print("CPU: process resident set (host memory of the whole process), not device memory")
    entry = {
        "config": {
            "student": config.student.path,
            "teacher": config.teacher.path,
            "dtype": config.student.dtype,
            "batch_size": config.data.batch_size,
            "max_prompt_tokens": config.data.max_prompt_tokens,
            "max_new_tokens": config.sampling.max_new_tokens,
            "accumulate": config.optim.accumulate,
            "remat": config.train.remat,
            "chunk_size": config.score.chunk_size,
            "segments": config.segments.kind,
            "overrides": args.overrides,
        },
        "memory": probe.kind,
        "what_is_measured": (
            "device allocator bytes: resident = bytes_in_use after Session.build minus before; "
            "peak = peak_bytes_in_use after the second step minus bytes_in_use before build "
            "(not resettable: includes loading, sampling, compilation scratch and both steps)"
            if probe.kind == "device"
            else "NOT device memory: the process's resident set (VmRSS/VmHWM, high-water mark "
            "reset before each phase); resident = RSS growth over Session.build, peak = VmHWM "
            "over the second rollout and update minus RSS before build. Includes compiled "
            "code, the tokenizer, host copies of rollouts and checkpoints: a rough upper bound"
        ),
        "row_gib": row,
        "plan": predicted,
        "measured": measured,
        "checkpoint_and_config_seconds": written,
        "wall_seconds": time.perf_counter() - start,
        "machine": common.machine(),
    }
    # the committed results keep the name of this module's former self, memory_plan.py
    out = Path(__file__).parent / "results" / f"memory_plan_{common.device_tag()}.json"
    payload = json.loads(out.read_text()) if out.exists() else {"benchmark": "memory_plan"}
    payload.setdefault("cases", {})[name] = entry
    common.write_json(str(out), payload)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
