"""Shared benchmark plumbing: timing, machine description, tables and atomic JSON."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from typing import Any

import jax

from opd_jax.files import atomic_write_text
from opd_jax.heap import keep_freed_memory

# Both frameworks in a benchmark's process reuse freed memory (opd_jax.heap), as the CLI does.
MALLOC = "kept (opd_jax.heap)" if keep_freed_memory() else "system"


def median_seconds(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` (results blocked on) over ``repeats`` after ``warmup``."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def alternating_medians(
    runs: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1
) -> dict[str, float]:
    """Median seconds of each thunk (which returns when its work is done) over ``repeats``
    runs after ``warmup`` each, the thunks alternating run by run, so that a machine whose
    load drifts penalises all of them alike."""
    for run in runs.values():
        for _ in range(warmup):
            run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            times[name] += wall_times(run, 1)
    return {name: statistics.median(ts) for name, ts in times.items()}


def wall_times(run: Callable[[], Any], repeats: int) -> list[float]:
    """Wall seconds of ``repeats`` calls of ``run``, which returns when its work is done."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times


def machine() -> dict[str, Any]:
    """Platform, devices and package versions, for the JSON of every benchmark."""
    versions = {}
    for package in ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "transformers"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    devices = jax.devices()
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "backend": jax.default_backend(),
        "devices": [d.device_kind for d in devices],
        "versions": versions,
        "cpu_vector_isa": cpu_vector_isa(),
        "cpu_model": cpu_model(),
        "malloc": MALLOC,
        "commit": commit(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def _cpuinfo(field: str) -> str | None:
    """The first ``field`` of ``/proc/cpuinfo``; None where that cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            fields = (line.split(":", 1) for line in f if ":" in line)
            return next((value.strip() for name, value in fields if name.strip() == field), None)
    except OSError:
        return None


def cpu_vector_isa() -> str | None:
    """The widest x86 vector instructions the CPU offers (``avx512``, ``avx2``), from
    ``/proc/cpuinfo``; None where that cannot be read. Both frameworks' GEMMs depend on it."""
    flags = (_cpuinfo("flags") or "").split()
    return next((isa for isa in ("avx512f", "avx2", "avx") if isa in flags), None)


def cpu_model() -> str | None:
    """The CPU's model name (``/proc/cpuinfo``): ratios against PyTorch differ between CPUs of
    one vector width (XLA's GEMMs 0.60-0.85x PyTorch's on an Intel AVX-512 machine, 0.84-1.37x
    on an AMD EPYC one: ``benchmarks.kernels``)."""
    return _cpuinfo("model name")


def commit() -> str | None:
    """The repository's commit (``-dirty`` with uncommitted changes outside
    ``benchmarks/results/``: results written earlier in a series change nothing measured),
    which results name; None outside a git checkout."""
    try:
        head = _git("rev-parse", "--short", "HEAD")
        dirty = _git(
            "status", "--porcelain", "--untracked-files=no", "--", ":/",
            ":(top,exclude)benchmarks/results",
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("-dirty" if dirty else "")


def _git(*args: str) -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    done = subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def device_tag() -> str:
    """``cpu`` or the accelerator's kind, e.g. ``nvidia_h100_80gb_hbm3``: the results' suffix."""
    if jax.default_backend() == "cpu":
        return "cpu"
    return jax.devices()[0].device_kind.lower().replace(" ", "_").replace("-", "_")


def result_path(stem: str) -> str:
    """``benchmarks/results/<stem>_<device>.json``: where a benchmark writes by default."""
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.join(here, "results", f"{stem}_{device_tag()}.json")


def write_json(path: str, payload: dict[str, Any]) -> None:
    """Writes ``payload`` to ``path`` atomically (``opd_jax.files.atomic_write_text``)."""
    atomic_write_text(path, json.dumps(payload, indent=2, default=float) + "\n")


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    """Prints ``rows`` as a Markdown table with the given ``columns``."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return "-" if value is None else str(value)

    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(cell(row.get(c)) for c in columns) + " |")


def merge_runs(out: str, runs: dict[str, dict[str, Any]], benchmark: str) -> None:
    """Adds ``runs`` to the JSON at ``out`` (``{"benchmark", "runs"}``): a run's rows replace
    those of the same case and join the others (a ladder may be measured over several
    commands); its other keys (machine, settings) replace the old ones."""
    payload = {"benchmark": benchmark, "runs": {}}
    if os.path.exists(out):
        with open(out) as f:
            payload = json.load(f)
    for name, run in runs.items():
        old = payload["runs"].get(name, {}).get("rows", [])
        cases = {row["case"] for row in run["rows"]}
        rows = [row for row in old if row.get("case") not in cases] + run["rows"]
        payload["runs"][name] = run | {"rows": rows}
    write_json(out, payload)
