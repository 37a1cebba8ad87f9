"""Release-aware sampling against the offline rule in finished experiments: accuracy with the
training run as unit, and what each step sampled, scored and kept.

Reads two ``opd-jax experiment`` directories of the same config and seeds, one run with
``sampling.stop_at_release=false`` (offline) and one with ``true`` (online), both with the rule
``release``: each seed's in-domain accuracy (``eval.json``), the paired seed-level test of
online - offline (:func:`opd_jax.experiment.inference.paired_seed_test`), and the means over
steps of each run's ``metrics.jsonl`` token counts and phase times.

Usage: ``python3 -m benchmarks.stop_at_release_runs OFFLINE_DIR ONLINE_DIR [--split test]
[--case NAME]``; prints tables and writes ``benchmarks/results/stop_at_release_runs_<case>.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from benchmarks import common
from opd_jax.experiment.inference import paired_seed_test
from opd_jax.train.metrics import read_metrics

COUNTS = ("sampled_tokens", "scored_tokens", "kept_tokens", "kept_fraction", "stopped_fraction")
TIMES = ("time/sample_s", "time/segment_s", "time/step_s")


def seed_dirs(experiment: Path) -> dict[int, Path]:
    """``{seed: run directory}`` of the experiment's ``release`` runs."""
    runs = sorted((experiment / "opd" / "release").glob("seed*"))
    return {int(p.name.removeprefix("seed")): p for p in runs if (p / "eval.json").is_file()}


def run_summary(run: Path, split: str) -> dict[str, object]:
    """One run's per-problem accuracy on ``split`` and its mean token counts and times."""
    scored = json.loads((run / "eval.json").read_text())[split]
    correct = np.asarray(scored["correct"], np.float64)  # [P, k] samples per problem
    per_problem = correct.mean(axis=-1) if correct.ndim == 2 else correct
    lines = read_metrics(run)
    by_step = {line["step"]: line for line in lines}  # a step logged twice counts once
    means = {
        k: float(np.mean([line[k] for line in by_step.values() if k in line]))
        for k in COUNTS + TIMES
        if any(k in line for line in by_step.values())
    }
    return {"accuracy": float(per_problem.mean()), "per_problem": per_problem, "means": means}


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python3 -m benchmarks.stop_at_release_runs", description=__doc__.split("\n")[0]
    )
    parser.add_argument("offline", type=Path)
    parser.add_argument("online", type=Path)
    parser.add_argument("--split", default="test")
    parser.add_argument("--case", default="quickstart_long_recap")
    args = parser.parse_args()
    runs = {
        name: seed_dirs(path) for name, path in (("offline", args.offline), ("online", args.online))
    }
    summaries = {
        name: {seed: run_summary(run, args.split) for seed, run in dirs.items()}
        for name, dirs in runs.items()
    }
    test = paired_seed_test(
        {s: r["per_problem"] for s, r in summaries["online"].items()},
        {s: r["per_problem"] for s, r in summaries["offline"].items()},
    )
    rows = []
    for name, by_seed in summaries.items():
        for seed, r in sorted(by_seed.items()):
            rows.append(
                {"sampling": name, "seed": seed, "accuracy_%": 100 * r["accuracy"], **r["means"]}
            )
    common.print_table(rows, ["sampling", "seed", "accuracy_%", *COUNTS, *TIMES])
    se = "" if test.stderr is None else f" ± {100 * test.stderr:.2f}"
    print(
        f"online - offline, {len(test.seeds)} seeds: {100 * test.value:+.2f}{se} points "
        f"(per seed {[round(100 * d, 2) for d in test.differences]}, p {test.p})"
    )
    out = common.result_path(f"stop_at_release_runs_{args.case}")
    common.write_json(
        out,
        {
            "benchmark": "stop_at_release_runs",
            "offline": str(args.offline),
            "online": str(args.online),
            "split": args.split,
            "runs": rows,
            "online_minus_offline": test.to_dict(),
            "machine": common.machine(),
            "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
