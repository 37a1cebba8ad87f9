"""Where the experiment keeps what it makes, under ``run.dir``::

    tokenizer/                      the task's BPE tokenizer
    models/{teacher,student}/       Hugging Face directories, sft.json, eval.json
    opd/<rule>/seed<s>/             ordinary run directories, plus curve.json and eval.json
                                    (and matched.json for a matched control, <kind>@<reference>)
    table.*, measures.*, comparisons.*, diagnostics.*, plots/  the report
    timings.json                    wall seconds per stage, summed over the invocations

Every stage reads and writes through these names, so the report can be redone from a
finished experiment.
"""

from __future__ import annotations

from pathlib import Path

from opd_jax.config import Config
from opd_jax.core import rule_options

CURVE_FILE = "curve.json"  # in-domain accuracy against OPD step
EVAL_FILE = "eval.json"  # a model's evaluation on every split
TIMINGS_FILE = "timings.json"  # wall seconds per stage, each invocation's too
MATCHED_FILE = "matched.json"  # the fraction a matched control ran at, and where it came from
MATCH = "@"  # "random@release": random at the kept fraction release had on the same seed
ROLES = ("teacher", "student")


def model_dirs(config: Config) -> dict[str, Path]:
    """``{"teacher": path, "student": path}`` of the experiment's two models."""
    return {role: Path(config.run.dir) / "models" / role for role in ROLES}


def tokenizer_dir(config: Config) -> Path:
    """The task tokenizer both models share."""
    return Path(config.run.dir) / "tokenizer"


FRACTION_OPTIONS = ("ratio", "rho")  # what a matched control sets, the first its rule has


def fraction_option(kind: str) -> str | None:
    """The option of rule ``kind`` that sets the fraction of tokens it keeps (``ratio``,
    ``rho``), which a matched control sets; None when it has none."""
    return next((o for o in FRACTION_OPTIONS if o in rule_options(kind)), None)


def split_rule(name: str) -> tuple[str, str | None]:
    """``(kind, reference)`` of an entry of ``experiment.rules``: ``"random@release"`` ->
    ``("random", "release")`` (a matched control), ``"full"`` -> ``("full", None)``."""
    kind, _, reference = name.partition(MATCH)
    return kind, reference or None


def run_dirs(config: Config) -> dict[tuple[str, int], Path]:
    """``{(rule, seed): run directory}`` of the experiment's OPD runs, in the order they run:
    the plain rules, then the matched controls (each after the reference it reads)."""
    root = Path(config.run.dir) / "opd"
    e = config.experiment
    rules = sorted(e.rules, key=lambda rule: split_rule(rule)[1] is not None)  # stable
    return {(rule, seed): root / rule / f"seed{seed}" for rule in rules for seed in e.seeds}
