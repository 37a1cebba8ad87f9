"""On a CUDA GPU only (skipped elsewhere): cuDNN's fused attention against the masked scores.

Run on a GPU machine with ``python3 -m pytest tests/test_gpu.py``; CI has no GPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from opd_jax.models import Decoder, ModelConfig, resolve_attention
from opd_jax.models.testing import tiny_hf_config

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU")


def _model(dtype):
    config = tiny_hf_config(
        "qwen3", num_hidden_layers=2, hidden_size=128, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64,
    )  # fmt: skip
    return Decoder(ModelConfig.from_hf(config, dtype=dtype), rngs=nnx.Rngs(0))


def test_auto_attention_is_cudnn_in_bfloat16_and_xla_in_float32():
    assert resolve_attention("auto", (jnp.bfloat16, jnp.bfloat16)) == "cudnn"
    assert resolve_attention("auto", (jnp.bfloat16, jnp.float32)) == "xla"
    assert resolve_attention("flash", (jnp.float32,)) == "flash"
    assert resolve_attention("auto", (jnp.bfloat16,), query_chunk=64) == "xla"


def _relative_errors(a, b) -> list[float]:
    return [
        float(np.linalg.norm(np.float32(x) - np.float32(y)) / (np.linalg.norm(np.float32(y))))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    ]


@pytest.mark.parametrize("length", [37, 1024])
def test_cudnn_attention_is_as_accurate_as_masked_scores(length):
    """Both bfloat16 kernels against the float32 masked scores: cuDNN's hidden states and
    gradients on real tokens are as close to them as XLA's bfloat16 ones."""
    B = 3
    tokens = jax.random.randint(jax.random.key(1), (B, length), 0, 320)
    mask = (
        jnp.ones((B, length), jnp.int32)
        .at[0, : length // 4].set(0)  # left padding (a prompt)
        .at[1, -length // 3 :].set(0)  # right padding (after EOS)
        .at[2, :3].set(0).at[2, -5:].set(0)  # both
    )  # fmt: skip
    real = np.asarray(mask, bool)

    def run(dtype, attention):
        graphdef, params = nnx.split(_model(dtype), nnx.Param)

        def loss(p):
            h = nnx.merge(graphdef, p).hidden(tokens, attention_mask=mask, attention=attention)
            h = jnp.where(mask[..., None], h, 0).astype(jnp.float32)
            return (h**2).mean(), h

        (_, h), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        return np.asarray(h)[real], g

    truth = run(jnp.float32, "xla")
    errors = {kind: _relative_errors(run(jnp.bfloat16, kind), truth) for kind in ("xla", "cudnn")}
    print({kind: f"{max(e[1:]):.2e} (hidden {e[0]:.2e})" for kind, e in errors.items()})
    assert errors["cudnn"][0] < 0.02
    assert max(errors["cudnn"][1:]) < 2 * max(errors["xla"][1:]) + 0.01
