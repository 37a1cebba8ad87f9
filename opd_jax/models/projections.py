"""The decoder's projections: ``x @ w`` for its attention and MLP weights.

A plain weight is multiplied as a 2-D matrix (XLA:CPU's fastest form); a module that qwix
adapts (LoRA, :mod:`opd_jax.models.lora`) or quantises (:mod:`opd_jax.models.quantize`) gets one
``jax.lax.dot_general`` on the weight as stored, which qwix intercepts. The MLP's down projection
(:func:`swiglu_down`) keeps only what its backward cannot recompute cheaply.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


def dense(
    x_BxTxI: jax.Array, w_IxO: jax.Array, contract: int = 1, as_stored: bool = False
) -> jax.Array:
    """`x @ w` as one `[B T, I] @ [I, O]` matmul, `I` being `w`'s first `contract` axes and
    `O` the rest (`[B, T, *O]` out). With the rows flattened XLA:CPU's backward needs no
    transposed copies of the activations: an MLP's gradient 1.3x faster, the SmolLM2 OPD step
    7% (benchmarks/step_parts.py). Batch-sharded rows stay sharded; a mesh that shards the
    sequence alone may regather the rows here.

    `as_stored`: one `jax.lax.dot_general` on the weight as stored (never reshaped), so that
    qwix, which intercepts it, finds the parameter (LoRA adapters, `models.lora`; `w_IxO` an
    int8 weight, `models.quantize`). Otherwise a weight of several input or output axes is
    reshaped to 2-D first: XLA:CPU runs that forward and backward 3.5% faster at SmolLM2's
    shape (the multi-axis dot_general adds transposes)."""
    B, T = x_BxTxI.shape[:2]
    in_shape, out_shape = w_IxO.shape[:contract], w_IxO.shape[contract:]
    rows = x_BxTxI.reshape(B * T, *in_shape)
    if not as_stored:
        w_2d = w_IxO.reshape(math.prod(in_shape), math.prod(out_shape))
        return (rows.reshape(B * T, -1) @ w_2d).reshape(B, T, *out_shape)
    w_axes = tuple(range(contract))
    x_axes = tuple(a + 1 for a in w_axes)
    y = jax.lax.dot_general(rows, w_IxO, ((x_axes, w_axes), ((), ())))
    return y.reshape(B, T, *out_shape)


def under_qwix(module: nnx.Module) -> bool:
    """Whether qwix adapts or quantises ``module``'s matmuls (it marks such a module with its
    path): its weights must then reach ``dense`` as stored."""
    return hasattr(module, "qwix_path")


def in_dtype(w: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """`w` in the compute `dtype`. A qwix int8 weight (`models.quantize`) already dequantises
    to it (its `astype` would fail), as a plain one of that dtype is returned as it is."""
    return w if w.dtype == dtype else w.astype(dtype)


def after(x: jax.Array, y: jax.Array) -> jax.Array:
    """``x``, computed only once ``y`` is: ``x + 0 * y[0, ..., 0]`` (XLA keeps a floating
    product with zero: it is NaN for a NaN). XLA:CPU drops optimisation barriers before
    scheduling and moves a recomputation from inputs at hand into the forward pass, where its
    result is kept until the backward; this dependence holds it back."""
    return x + (0 * y[(0,) * y.ndim]).astype(x.dtype)


@jax.custom_vjp
def swiglu_down(gate_BxTxF: jax.Array, up_BxTxF: jax.Array, down_FxD: jax.Array) -> jax.Array:
    """``(silu(gate) * up) @ down`` (``[B, T, D]``) whose backward keeps ``gate`` and ``up``
    alone: it recomputes ``silu(gate) * up`` once the output's gradient has arrived.

    JAX's own differentiation keeps three more ``[B, T, F]`` arrays a layer until the backward
    (``sigmoid``, ``silu``, their product): a quarter of the SmolLM2 update's temporary memory
    (B=1, N=1,024: 0.54 of 2.34 GiB). The recomputation is elementwise, fused
    into the backward's own; it waits for the output's gradient (:func:`after`), so that
    XLA:CPU's scheduler cannot hoist it into the forward, as it hoists ``jax.checkpoint``'s.
    """
    return dense(jax.nn.silu(gate_BxTxF) * up_BxTxF, down_FxD)


def _swiglu_down_fwd(gate, up, down):
    return swiglu_down(gate, up, down), (gate, up, down)


def _swiglu_down_bwd(saved, dy_BxTxD):
    gate, up, down = saved
    gate = after(gate, dy_BxTxD)
    sigmoid = jax.nn.sigmoid(gate)
    silu = gate * sigmoid
    B, T, F = gate.shape
    dy_RxD = dy_BxTxD.reshape(B * T, -1)
    d_down = ((silu * up).reshape(B * T, F).T @ dy_RxD).astype(down.dtype)
    d_hidden = (dy_RxD @ down.T).reshape(B, T, F)
    d_gate = d_hidden * up * (sigmoid * (1 + gate * (1 - sigmoid)))
    return d_gate.astype(gate.dtype), (d_hidden * silu).astype(up.dtype), d_down


swiglu_down.defvjp(_swiglu_down_fwd, _swiglu_down_bwd)
