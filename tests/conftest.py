"""Test-wide settings and fixtures.

float32 matmuls at full precision: accelerators otherwise use TF32 (or bf16 passes) for
float32 dots, and the tests compare kernels against references to 1e-5. malloc as the system
has it: the command line sets it up for its process (`opd_jax.heap`), and tests call the command
line inside the test workers (tests/test_heap.py checks the setting in processes of its own).
XLA:CPU compiles with LLVM's optimisations off (`tests/xla_flags.py`), in the test workers and
the processes they start: most of the suite's time is compilation.
"""

import os

from tests.xla_flags import FAST_COMPILE

os.environ["XLA_FLAGS"] = f"{FAST_COMPILE} {os.environ.get('XLA_FLAGS', '')}".strip()
os.environ.setdefault("OPD_JAX_HEAP", "system")

import jax  # noqa: E402  (after XLA_FLAGS)
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

TINY = dict(num_hidden_layers=1, hidden_size=32, intermediate_size=48)


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory):
    """A 1-layer Qwen3 student and a wider 1-layer Llama teacher sharing one byte-level BPE
    tokenizer, saved as Hugging Face directories ``student/`` and ``teacher/`` (no torch)."""
    from opd_jax.models.scratch import init_checkpoint
    from opd_jax.models.testing import tiny_hf_config, train_tiny_tokenizer

    root = tmp_path_factory.mktemp("pair")
    tokenizer = train_tiny_tokenizer()
    init_checkpoint(root / "student", tiny_hf_config("qwen3", **TINY), tokenizer, seed=0)
    teacher = tiny_hf_config("llama", **TINY | {"hidden_size": 48})
    init_checkpoint(root / "teacher", teacher, tokenizer, seed=1)
    return root
