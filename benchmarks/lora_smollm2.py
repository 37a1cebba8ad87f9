"""A LoRA OPD run of the SmolLM2 pair, end to end: it trains, resumes bit-exactly, and exports
merged weights that transformers reads.

Three runs of ``configs/smollm2_layers.yaml`` (SmolLM2-135M-Instruct teacher, its 15-layer
student; the cosine's horizon fixed at 4 steps so that 2 + 2 steps follow the same schedule):

- ``straight``: LoRA (``student.lora.rank``), 4 steps;
- ``resumed``: the same, stopped after 2 steps and resumed to 4 in the same ``run.dir``;
- ``full``: full fine-tuning, 4 steps (checkpoint size and update time beside LoRA's).

Reported: the losses of steps 3 and 4 of both LoRA runs and whether their merged students are
bit-equal; the checkpoint bytes on disk and the median update time (steps 2-4; a run saves at
its end only, so no save runs beside a step) of LoRA and of full fine-tuning; ``opd-jax
convert RUN DST`` of the LoRA run loaded by transformers (``AutoModelForCausalLM``) against
opd_jax's merged student on the same tokens (max |logit difference|). Usage: ``python3 -m
benchmarks.lora_smollm2 [--rank 16]``; prints a table and writes
``benchmarks/results/lora_smollm2_<device>.json``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks import common
from opd_jax.config import load_config
from opd_jax.convert import convert
from opd_jax.train.checkpoint import restore_student
from opd_jax.train.loop import train
from opd_jax.train.metrics import read_metrics

CONFIG = "configs/smollm2_layers.yaml"


def _run(run_dir: Path, *extra: str) -> list[dict]:
    overrides = [f"run.dir={run_dir}", "run.progress=false", "run.loggers=[]",
                 "optim.decay_steps=4", "run.checkpoint_every=100", *extra]  # fmt: skip
    train(load_config(CONFIG, overrides))
    return read_metrics(run_dir)


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _last_checkpoint_bytes(run_dir: Path) -> int:
    steps = [p for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()]
    return _dir_bytes(max(steps, key=lambda p: int(p.name)))


def _params(run_dir: Path) -> list[np.ndarray]:
    model, _ = restore_student(run_dir)
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def _export_difference(run_dir: Path, dst: Path) -> float:
    """Max |logit| difference of transformers on ``convert``'s output against opd_jax."""
    import torch
    import transformers

    convert(run_dir, dst)
    model, _ = restore_student(run_dir)
    tokens = np.asarray(jax.random.randint(jax.random.key(0), (2, 24), 0, 49152), np.int64)
    ours = np.asarray(model(jnp.asarray(tokens)))
    hf = transformers.AutoModelForCausalLM.from_pretrained(dst, torch_dtype=torch.float32)
    with torch.no_grad():
        theirs = hf(torch.from_numpy(tokens)).logits.numpy()
    return float(np.abs(ours - theirs).max())


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python3 -m benchmarks.lora_smollm2", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    lora = f"student.lora.rank={args.rank}"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        straight = _run(root / "straight", lora, "train.steps=4")
        _run(root / "resumed", lora, "train.steps=2")
        resumed = _run(root / "resumed", lora, "train.steps=4")
        full = _run(root / "full", "train.steps=4")
        same = all(
            np.array_equal(a, b)
            for a, b in zip(_params(root / "straight"), _params(root / "resumed"), strict=True)
        )
        difference = _export_difference(root / "straight", root / "export")
        step_s = lambda lines: statistics.median(x["time/step_s"] for x in lines[1:])  # noqa: E731
        row = {
            "rank": args.rank,
            "loss_steps_3_4_straight": [x["loss"] for x in straight[2:4]],
            "loss_steps_3_4_resumed": [x["loss"] for x in resumed[2:4]],
            "resume_bit_exact": same,
            "lora_checkpoint_mib": _last_checkpoint_bytes(root / "straight") / 2**20,
            "full_checkpoint_mib": _last_checkpoint_bytes(root / "full") / 2**20,
            "lora_update_s": step_s(straight),
            "full_update_s": step_s(full),
            "export_max_abs_logit_difference": difference,
        }
    common.print_table([row], list(row))
    out = args.out or common.result_path("lora_smollm2")
    payload = {"benchmark": "lora_smollm2", "config": CONFIG, "machine": common.machine()}
    common.write_json(out, payload | {"rows": [row]})


if __name__ == "__main__":
    main()
