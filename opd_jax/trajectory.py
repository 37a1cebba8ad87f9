"""What a resumed run compares: the config keys that decide the training trajectory.

A resume with other values of these keys is refused unless ``run.allow_changes`` is set
(:func:`opd_jax.train.preflight.check_resume`); the free keys only say where and how often
things are recorded, or change what a step computes by float rounding at most.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from opd_jax.config import Config, flatten
from opd_jax.config_upgrade import upgrade_tree
from opd_jax.core import LOSSES, RULES, loss_options, rule_options

# Keys a resumed run may change: they leave what each step computes as it was (up to float
# rounding for the kernels and micro-batches) or only say where and how often it is recorded.
FREE_SECTIONS = ("run.", "mesh.", "experiment.")
FREE_KEYS = (
    "train.steps", "train.attention", "train.attention_chunk", "train.remat",
    "train.on_nonfinite", "score.chunk_size", "optim.accumulate", "data.data_dir",
    "sampling.compact_every",
)  # fmt: skip
HORIZON = "optim.decay_steps"


def trajectory(tree: Mapping[str, Any]) -> dict[str, Any]:
    """The values of a config tree (``Config.to_dict()``, or an older run's, missing keys
    taking their defaults) that decide the training trajectory: every key but the free ones;
    the cosine's horizon stands for ``train.steps`` (``None`` for a constant schedule), and
    ``rule.options`` holds the rule's defaults too."""
    flat = flatten(Config().to_dict()) | flatten(upgrade_tree(tree))
    kept = {
        key: value
        for key, value in flat.items()
        if key not in FREE_KEYS and not key.startswith(FREE_SECTIONS)
    }
    cosine = flat["optim.schedule"] == "cosine"
    kept[HORIZON] = (flat[HORIZON] or flat["train.steps"]) if cosine else None
    if flat["rule.kind"] in RULES:
        kept["rule.options"] = rule_options(flat["rule.kind"]) | dict(flat["rule.options"])
    if flat["loss.kind"] in LOSSES:
        kept["loss.options"] = loss_options(flat["loss.kind"]) | dict(flat["loss.options"])
    return kept


def trajectory_changes(
    old: Mapping[str, Any], new: Mapping[str, Any]
) -> dict[str, tuple[Any, Any]]:
    """``{key: (old, new)}`` of the trajectory values (:func:`trajectory`) that differ."""
    before, after = trajectory(old), trajectory(json.loads(json.dumps(new)))
    return {
        key: (before.get(key), value) for key, value in after.items() if before.get(key) != value
    }
