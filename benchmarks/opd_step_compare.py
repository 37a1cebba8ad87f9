"""The ``throughput`` and ``scaling`` parts of ``benchmarks.opd_step``: opd_jax's update against
its PyTorch peers, case by case on the same weights and batch.

A part is a list of cases (a batch and what to run on it), timed for every framework with
their runs alternating (or, off ``interleave``, one framework at a time): by
``benchmarks.isolated_workers.measure`` with each framework in a process of its own per case,
which also records each one's peak resident memory (``--isolate``, the CPU preset's default),
or by :func:`measure` with every framework in this process. A size that does not fit is
recorded as ``oom`` (``failed``) and the part goes on; :func:`rows` turns the results into
tokens/s, ratios, peak memory and (on a GPU) MFU. Used by ``benchmarks.opd_step``, which sets
the environment before these imports start JAX and torch.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable
from typing import Any

from benchmarks import isolated_workers
from benchmarks.common import MALLOC, wall_times
from benchmarks.opd_sides import (
    PAIRS,
    SHAPES,
    free_memory,
    make_batch,
    make_side,
    peak_flops,
    step_flops,
)


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
            results[case["name"]][side.name] = isolated_workers.failure(error)
            free_memory()
            return None

    def prepare(side, case):
        def warm():
            run, info = getattr(side, case["kind"])(case["host"], case["prompt"], case["response"])
            wall_times(run, 2 if getattr(side, "compile", False) else 1)
            return run, info

        return attempt(side, case, warm)

    def timed(sides_runs, case):
        times = {side.name: [] for side, _ in sides_runs}
        for _ in range(repeats):
            for side, (run, _) in sides_runs:
                if side.name not in results[case["name"]]:
                    attempt(
                        side, case, lambda r=run, s=side: times[s.name].extend(wall_times(r, 1))
                    )
        for side, (_, info) in sides_runs:
            if side.name not in results[case["name"]]:
                results[case["name"]][side.name] = {
                    "status": "ok", "seconds": statistics.median(times[side.name]),
                    "times": times[side.name], **info, **getattr(side, "info", dict)(),
                    "loadavg_1m": os.getloadavg()[0], "malloc": MALLOC,
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


def _specs(dirs, args, dtype: str, frameworks: list[str]) -> dict[str, dict[str, Any]]:
    """Framework -> :func:`make_side`'s arguments, transformers first (on a GPU, JAX keeps the
    memory it has used in its pool)."""
    order = [name for name in ("torch", "torch_compile", "opd_jax") if name in frameworks]
    return {
        name: dict(framework=name, dirs=dirs, dtype=dtype, chunk=args.chunk_size,
                   remat=args.remat, attention=args.attention)
        for name in order
    }  # fmt: skip


def rows(results, cases, pair: str, frameworks: list[str], dtype: str) -> list[dict]:
    """A row per case: each framework's tokens/s, status, peak memory (``peak_gib``: XLA's
    analysis or torch's CUDA peak; ``peak_rss_gib``: its process's, isolated) and malloc,
    opd_jax's ratios to each peer (``peak_rss_ratio``: opd_jax's peak RSS over torch's), and
    (on a GPU, for the update alone) TFLOP/s and MFU."""
    peak, out = peak_flops(dtype), []
    for case in cases:
        B, P, N = case["host"]["tokens"].shape[0], case["prompt"], case["response"]
        flops = step_flops(pair, B, P, N) if case["kind"] == "update" else None
        row = {"case": case["name"], "B": B, "P": P, "N": N, "model_tflop_per_step": None}
        for name in frameworks:
            result = row[f"{name}_result"] = results[case["name"]][name]
            row[f"{name}_tok_s"] = B * N / result["seconds"] if "seconds" in result else None
            row[f"{name}_status"] = result["status"]
            row[f"{name}_peak_gib"] = result.get("xla_peak_gib", result.get("torch_peak_gib"))
            row[f"{name}_peak_rss_gib"] = result.get("peak_rss_gib")
            row[f"{name}_malloc"] = result.get("malloc")
            if flops and "seconds" in result:
                row[f"{name}_tflop_s"] = flops / result["seconds"] / 1e12
                row[f"{name}_mfu"] = flops / result["seconds"] / peak if peak else None
        for name in frameworks[1:]:
            if row["opd_jax_tok_s"] and row[f"{name}_tok_s"]:
                row[f"ratio_vs_{name}"] = row["opd_jax_tok_s"] / row[f"{name}_tok_s"]
        ok = all(row.get(f"{n}_status") == "ok" for n in ("opd_jax", "torch"))
        if ok and row["opd_jax_peak_rss_gib"] and row["torch_peak_rss_gib"]:
            row["peak_rss_ratio"] = row["opd_jax_peak_rss_gib"] / row["torch_peak_rss_gib"]
        row["model_tflop_per_step"] = flops / 1e12 if flops else None
        out.append(row)
    return out


def columns(frameworks: list[str], gpu: bool, rss: bool = False) -> list[str]:
    """The printed table's columns for :func:`rows`; ``rss``: with each process's peak."""
    names = ["case", "B", "P", "N"] + [f"{name}_tok_s" for name in frameworks]
    names += [f"{name}_status" for name in frameworks]
    names += [f"ratio_vs_{name}" for name in frameworks[1:]]
    names += ["opd_jax_peak_gib"] + (["torch_peak_gib"] if gpu else [])
    if rss:
        names += [f"{name}_peak_rss_gib" for name in frameworks]
        names += ["peak_rss_ratio"] if "torch" in frameworks else []
    return names + ([f"{name}_mfu" for name in frameworks] if gpu else [])


def _compare(cases, pair, dirs, args, preset, frameworks) -> list[dict]:
    specs = _specs(dirs, args, preset["dtype"], frameworks)
    if preset["isolate"]:
        results = isolated_workers.measure(specs, cases, preset["repeats"])
    else:
        makers = {name: (lambda s=spec: make_side(**s)) for name, spec in specs.items()}
        results = measure(makers, cases, preset["repeats"], preset["interleave"])
    return rows(results, cases, pair, frameworks, preset["dtype"])


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
    return _compare(cases, pair, dirs, args, preset, frameworks)


def part_scaling(pair, dirs, args, preset, settings, frameworks):
    """The update along two ladders: response lengths at batch ``length_batch`` (``length``)
    and batch sizes at ``batch_response`` tokens (``batch``)."""
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
    return _compare(cases, pair, dirs, args, preset, frameworks)
