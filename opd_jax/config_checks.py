"""Cross-section checks of a config that own one feature each (they read the sections they
check, never the :class:`~opd_jax.config.Config` type)."""

from __future__ import annotations

from typing import Any

from opd_jax.typed_yaml import ConfigError


def check_stopping(sampling: Any, rule_kind: str) -> None:
    """``sampling.stop_at_release`` needs the release rule and looks at rows every
    ``compact_every`` tokens (fewer than ``max_new_tokens``)."""
    if not sampling.stop_at_release:
        return
    if rule_kind != "release":
        raise ConfigError(
            f"sampling.stop_at_release stops rollouts at the release rule's cut, but rule.kind "
            f"is {rule_kind!r}: set rule.kind=release or sampling.stop_at_release=false."
        )
    every, budget = sampling.compact_every, sampling.max_new_tokens
    if not 1 <= every < budget:
        raise ConfigError(
            f"sampling.stop_at_release decides every sampling.compact_every tokens, "
            f"{every} here: set it between 1 and sampling.max_new_tokens - 1 = {budget - 1}."
        )
