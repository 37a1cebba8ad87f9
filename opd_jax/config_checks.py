"""Cross-section checks of a config that own one feature each."""

from __future__ import annotations

from typing import TYPE_CHECKING

from opd_jax.typed_yaml import ConfigError

if TYPE_CHECKING:
    from opd_jax.config import Config


def check_stopping(config: Config) -> None:
    """``sampling.stop_at_release`` needs the release rule, looks at rows every
    ``compact_every`` tokens and runs on one mesh."""
    if not config.sampling.stop_at_release:
        return
    if config.rule.kind != "release":
        raise ConfigError(
            f"sampling.stop_at_release stops rollouts at the release rule's cut, but rule.kind "
            f"is {config.rule.kind!r}: set rule.kind=release or sampling.stop_at_release=false."
        )
    every, budget = config.sampling.compact_every, config.sampling.max_new_tokens
    if not 1 <= every < budget:
        raise ConfigError(
            f"sampling.stop_at_release decides every sampling.compact_every tokens, "
            f"{every} here: set it between 1 and sampling.max_new_tokens - 1 = {budget - 1}."
        )
    if config.mesh.rollout:
        raise ConfigError(
            "sampling.stop_at_release scores rollouts with the teacher on the training mesh: "
            "set mesh.rollout=0."
        )
