"""Config trees of older opd_jax versions, read in today's keys."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def upgrade_tree(tree: Mapping[str, Any]) -> dict[str, Any]:
    """A config tree of an older opd_jax in today's keys: ``loss.beta`` (one global option)
    became ``loss.options.beta``, the ``jsd`` loss's own option (dropped for other losses, which
    never read it); ``run.tensorboard: false`` became ``run.loggers: []``."""
    tree = dict(tree)
    run = tree.get("run")
    if isinstance(run, Mapping) and "tensorboard" in run:
        run = dict(run)
        if not run.pop("tensorboard"):
            run.setdefault("loggers", [])
        tree["run"] = run
    loss = tree.get("loss")
    if isinstance(loss, Mapping) and "beta" in loss:
        loss = dict(loss)
        beta = loss.pop("beta")
        if loss.get("kind") == "jsd":
            loss["options"] = {"beta": beta, **(loss.get("options") or {})}
        tree["loss"] = loss
    return tree
