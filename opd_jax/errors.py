"""The one exception type of bad input, so that the command line tells it from a failure.

:class:`InputError` (a ``ValueError``) is raised for anything a user can fix in what they gave:
a config value (:class:`opd_jax.typed_yaml.ConfigError` is one), a model, data or prompt file,
a run directory in use. Its message names the cause (the key, or the file and line) and the
fix. ``opd-jax`` exits with 2 on it; any other exception is a failure (exit 1) and is said to
be one, never reported as bad input.
"""

from __future__ import annotations


class InputError(ValueError):
    """Input that cannot be used, with the key or file at fault and the fix."""
