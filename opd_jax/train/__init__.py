"""Training: the jitted OPD step, the loop, checkpoints, metrics, memory plans, conversion.

``train(load_config("configs/smollm2_layers.yaml"))`` runs (or resumes) a run from Python, as
``opd-jax train`` does from the shell.
"""

__all__ = ["train"]


def __getattr__(name: str):
    # The loop (TFDS, grain, TensorBoard) is imported on first use: plan, session and the step
    # import without them.
    if name == "train":
        from opd_jax.train.loop import train

        return train
    raise AttributeError(f"module 'opd_jax.train' has no attribute {name!r}")
