"""Test-wide settings.

float32 matmuls at full precision: accelerators otherwise use TF32 (or bf16 passes) for
float32 dots, and the tests compare kernels against references to 1e-5.
"""

import jax

jax.config.update("jax_default_matmul_precision", "highest")
