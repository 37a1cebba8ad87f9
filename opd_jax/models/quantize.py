"""Weight-only int8 teachers by qwix post-training quantisation (PTQ).

:func:`quantize_weights` stores the seven projection weights of every decoder block (q, k,
v, o; gate, up, down) as int8 with one scale per output channel (absmax over the contracted
axes): qwix's ``QArray`` in its PTQ ``WithAux``, with the weight's own shape. Activations,
norms, biases, the embedding and the unembedding keep the model's dtypes. The returned
model's class intercepts ``Decoder._forward`` (behind ``hidden``, ``response_hidden``, calls):
there each block's ``jax.lax.dot_general`` on such a weight (``projections.dense``) dequantises
it to the compute dtype and multiplies (qwix's ``dot_general``).

The int8 arrays and scales are ``nnx.Param``s: ``nnx.split(model, nnx.Param)`` / ``nnx.merge``,
``jax.jit`` and ``sharding.param_shardings`` take them as a float model's parameters. A model
only to be read (the teacher): neither trained nor saved.
"""

from __future__ import annotations

import jax.numpy as jnp
import qwix
from flax import nnx

from opd_jax.errors import InputError
from opd_jax.models.decoder import Decoder
from opd_jax.sharding import mesh_of, shard_model

KINDS = {"int8": jnp.int8}
# The modules whose dot_generals take quantised weights (qwix paths): every block's
# attention and MLP, so neither the embedding nor the unembedding.
BLOCK_MODULES = r"layers/\d+/(attn|mlp)"
PROJECTIONS = {
    "attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
}


def quantize_weights(model: Decoder, kind: str = "int8") -> Decoder:
    """A copy of ``model`` whose blocks' projection weights are ``kind`` (weight-only).

    Placed as ``model`` is: on the mesh of its parameters' ``NamedSharding`` under its own
    rules, or where jax puts new arrays. ``model`` itself is left as it was.
    """
    if kind not in KINDS:
        raise InputError(f"quantize kind {kind!r} is not one of {sorted(KINDS)}.")
    if hasattr(type(model), "_unquantized_type"):
        raise InputError("the model is quantised already.")
    c = model.config
    rule = qwix.QtRule(
        module_path=BLOCK_MODULES, weight_qtype=KINDS[kind], op_names=("dot_general",)
    )
    provider = qwix.PtqProvider([rule])

    def abstract(m: Decoder) -> Decoder:  # _forward(tokens, positions, attention_mask, cache)
        tokens = jnp.zeros((1, 1), jnp.int32)
        return qwix.quantize_model(m, provider, tokens, None, None, None, methods=("_forward",))

    # Traced, not run: the intercepted dot_generals record how each weight is quantised in
    # an abstract quantised model (qwix follows a traced weight back to its parameter); qwix
    # then quantises the real weights into it.
    quantized = nnx.eval_shape(abstract, model)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    for block in params["layers"].values():  # quantised as the blocks compute with them
        for module, names in PROJECTIONS.items():
            for name in names:
                block[module][name] = block[module][name].astype(c.dtype)
    nnx.update(quantized, qwix.quantize_params(params, quantized))
    _check_and_label(model, quantized)
    mesh = mesh_of(model)
    if mesh is not None:
        shard_model(quantized, mesh, model.rules)
    return quantized


def _check_and_label(model: Decoder, quantized: Decoder) -> None:
    """Every projection is a ``QArray`` of the weight's shape; its scale gets the weight's
    logical axes, unsharded along the contracted (size-1) ones."""
    for block, float_block in zip(quantized.layers, model.layers, strict=True):
        for module, names in PROJECTIONS.items():
            for name in names:
                weight = getattr(getattr(block, module), name)
                shape = getattr(getattr(float_block, module), name).shape
                qarray = getattr(weight, "array", None)
                if not isinstance(qarray, qwix.QArray) or qarray.qvalue.shape != shape:
                    raise RuntimeError(
                        f"{module}.{name} was not quantised in its stored shape {shape}: "
                        "qwix sees the blocks' weights only in `jax.lax.dot_general`s on "
                        "the parameter itself (models.projections.dense)."
                    )
                scale = qarray.scale  # the nnx.Param
                axes = scale.get_metadata().get("logical_axes")
                if axes is not None:
                    sizes = scale.shape
                    axes = tuple(None if n == 1 else a for a, n in zip(axes, sizes, strict=True))
                    scale.set_metadata("logical_axes", axes)
