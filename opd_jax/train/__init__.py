"""Training: the jitted OPD step, the loop, checkpoints, metrics, memory plans, conversion.

``train(load_config("configs/smollm2_layers.yaml"))`` runs (or resumes) a run from Python, as
``opd-jax train`` does from the shell.
"""

from opd_jax.train.loop import train

__all__ = ["train"]
