"""The offline strong-to-weak experiment (``opd-jax experiment``): a teacher and a student
trained on the built-in task by the project's own code, OPD of the student under each rule and
seed, evaluation in and out of domain, and a report with tables and plots."""

from opd_jax.experiment.stages import load_experiment_config, run_experiment

__all__ = ["load_experiment_config", "run_experiment"]
