"""``opd-jax eval CONFIG [--set KEY=VALUE]``: every model of the config on every benchmark.

:func:`evaluate_config` writes to the config's ``out_dir``::

    results.json                      config and all metrics (avg@K, pass@1..K, stderrs)
    table.md, table.json              avg@K ± stderr: models x (benchmarks + average)
    samples/<model>__<benchmark>.jsonl  per problem: prompt, gold, responses, extracted, correct
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from opd_jax import models
from opd_jax.eval.problems import load_problems
from opd_jax.eval.sample import evaluate
from opd_jax.eval.spec import EvalConfig, load_eval_config
from opd_jax.eval.tables import benchmark_table, format_cell, to_markdown, write_table
from opd_jax.files import atomic_write_text
from opd_jax.models import DTYPES


def _jsonl(records: Sequence[Mapping[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def _write_results(out_dir: Path, config: EvalConfig, results: dict[str, Any]) -> None:
    report = {"config": dataclasses.asdict(config), "metric": f"avg@{config.k}", **results}
    atomic_write_text(out_dir / "results.json", json.dumps(report, indent=2) + "\n")


def evaluate_config(
    config_path: str | os.PathLike, overrides: Sequence[str] = ()
) -> dict[str, Any]:
    """``opd-jax eval``: every model on every benchmark of the config; writes ``out_dir``
    (see the module doc), prints the avg@K table and returns ``{"results", "table"}`` with
    ``results[model][benchmark]`` the metrics of :func:`~opd_jax.eval.sample.evaluate`."""
    config = load_eval_config(config_path, overrides)
    out_dir = Path(config.out_dir)
    problems = {name: load_problems(s, config.data_dir) for name, s in config.benchmarks.items()}
    metric = f"avg@{config.k}"
    results: dict[str, Any] = {"results": {}}
    for model_name, path in config.models.items():
        model, tokenizer = models.load(path, DTYPES[config.dtype])
        for bench, bench_problems in problems.items():
            start = time.perf_counter()
            out = evaluate(
                model,
                tokenizer,
                bench_problems,
                k=config.k,
                batch_size=config.batch_size,
                max_new_tokens=config.sampling.max_new_tokens,
                max_prompt_tokens=config.max_prompt_tokens,
                temperature=config.sampling.temperature,
                seed=config.seed,
                chat_template=config.chat_template,
                system_prompt=config.system_prompt,
                top_k=config.sampling.top_k,
                top_p=config.sampling.top_p,
            )
            samples = out_dir / "samples" / f"{model_name}__{bench}.jsonl"
            atomic_write_text(samples, _jsonl(out["records"]))
            results["results"].setdefault(model_name, {})[bench] = out["metrics"]
            _write_results(out_dir, config, results)
            print(
                f"{model_name} / {bench}: {metric} = {format_cell(out['metrics'][metric])} % "
                f"({len(bench_problems)} problems, {time.perf_counter() - start:.1f} s)",
                flush=True,
            )
        del model
    table = benchmark_table(
        {m: {b: r[metric] for b, r in row.items()} for m, row in results["results"].items()},
        list(config.benchmarks),
        metric=metric,
    )
    write_table(table, out_dir)
    print(to_markdown(table), end="", flush=True)
    return {"results": results["results"], "table": table}
