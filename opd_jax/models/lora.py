"""Low-rank adapters (LoRA) on a loaded :class:`~opd_jax.models.Decoder`, with qwix.

:func:`apply_lora` gives each projection ``W`` whose path (``layers/3/attn/q_proj``) matches
``targets`` two adapters, ``W_lora_a [I, r]`` (he-uniform) and ``W_lora_b [r, O]`` (zeros),
``I`` / ``O`` the weight's input / output axes flattened: the adapted projection is
``x @ W + (alpha / r) (x @ A) @ B``, equal to the base model's at init. The adapters are
``nnx.LoRAParam`` (a subclass of ``nnx.Param``): :func:`split_student` separates them, the
trained parameters, from the frozen base. :func:`merge_lora` folds them into a plain Decoder
(``W + (alpha / r) A B``) for export.

Why qwix rather than ``nnx.LoRA`` layers: qwix (Google's, maintained; what tunix trains LoRA
with) intercepts the ``jax.lax.dot_general`` / ``jnp.einsum`` of an unchanged NNX model and adds
the adapters beside the weight it finds there, so the Decoder keeps its raw ``nnx.Param``
projections (3-D attention weights, logical axes, HF conversion, checkpoints) and gains no
LoRA code path; ``nnx.LoRA`` / ``nnx.LoRALinear`` would mean rebuilding every projection as a
``Linear`` module (2-D kernels, other parameter paths) or writing our own wrapper. The one
requirement on the Decoder: each projection is a ``dot_general`` on the parameter as stored
(``projections.dense``). The same interception serves the int8 teacher (qwix PTQ).

Adapters are sharded like their weight: ``A`` takes the weight's first input axis, ``B`` its
first output axis (``q_proj [D, N, H]``: ``A ("embed", None)``, ``B (None, "q_heads")``), the
rank axis replicated.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re

import jax
import jax.numpy as jnp
from flax import nnx

from opd_jax.errors import InputError
from opd_jax.models.decoder import Decoder
from opd_jax.sharding import mesh_of, param_shardings

A_SUFFIX, B_SUFFIX = "_lora_a", "_lora_b"  # qwix's names: W's adapters are W_lora_a, W_lora_b


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    """The adapters a Decoder carries (kept on it for :func:`merge_lora`)."""

    rank: int
    alpha: float
    targets: str

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def has_lora(model: nnx.Module) -> bool:
    """Whether :func:`apply_lora` gave ``model`` adapters."""
    return isinstance(getattr(model, "lora", None), LoraSettings)


def apply_lora(model: Decoder, rank: int, alpha: float, targets: str, *, seed: int = 0) -> Decoder:
    """``model`` with rank-``rank`` adapters on the projections whose path matches
    ``targets`` (a regex, fully matched against e.g. ``layers/0/mlp/up_proj``); ``model``
    itself at rank 0. The adapted model's outputs equal ``model``'s until the adapters train.

    Call it on a loaded model, after its placement on a mesh: the adapters are placed on the
    same mesh, sharded like their weights (``model.rules``). ``model`` is left unchanged (the
    result shares its weights). Works on an abstract model too (``nnx.eval_shape``).

    Raises:
      InputError: ``targets`` matches no projection, the model already has adapters, or
        qwix (the ``qwix`` extra) is not installed.
    """
    if rank == 0:
        return model
    if has_lora(model):
        raise InputError("the model already has LoRA adapters: apply_lora applies once.")
    try:
        import qwix
    except ImportError as error:
        raise InputError("student.lora.rank needs qwix: pip install 'opd_jax[qwix]'.") from error

    provider = _provider_class()(targets, rank=rank, alpha=alpha)
    tokens = jnp.zeros((1, 1), jnp.int32)
    # _forward: every entry point (hidden, hidden_cached, response_hidden, __call__) runs it.
    adapted = qwix.apply_lora_to_model(
        model, provider, tokens, None, None, None, methods=("_forward",), rngs=nnx.Rngs(seed)
    )
    adapters = nnx.state(adapted, nnx.LoRAParam)
    if not jax.tree.leaves(adapters):
        raise InputError(
            f"student.lora.targets={targets!r} matches no projection (paths such as "
            "layers/0/attn/q_proj, layers/0/mlp/down_proj): fix the regex."
        )
    _name_axes(adapted)
    adapted.lora = LoraSettings(rank, float(alpha), targets)
    mesh = mesh_of(model)
    if mesh is not None:
        adapters = nnx.state(adapted, nnx.LoRAParam)
        nnx.update(adapted, jax.device_put(adapters, param_shardings(adapters, mesh, model.rules)))
    return adapted


def split_student(model: Decoder) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """``(graphdef, trained, frozen)``: with adapters, the adapters and the frozen base; without,
    every parameter and an empty state. ``nnx.merge(graphdef, trained, frozen)`` (or, with
    adapters, ``nnx.merge(graphdef, nnx.merge_state(trained, frozen))``) is the model."""
    if has_lora(model):
        return nnx.split(model, nnx.LoRAParam, nnx.Param)
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, params, nnx.State({})


def merge_lora(model: Decoder) -> Decoder:
    """A plain Decoder (no adapters, no qwix) whose weights are ``W + (alpha / r) A B``,
    computed in float32 and cast to ``W``'s dtype; ``model`` itself when it has no adapters."""
    if not has_lora(model):
        return model
    scale = model.lora.scale
    _, adapters, base = split_student(model)
    flat, pairs = dict(nnx.to_flat_state(base)), dict(nnx.to_flat_state(adapters))
    for path, a in pairs.items():
        if not path[-1].endswith(A_SUFFIX):
            continue
        stem = path[-1][: -len(A_SUFFIX)]
        b, w = pairs[(*path[:-1], stem + B_SUFFIX)], flat[(*path[:-1], stem)]
        delta = jnp.matmul(
            a[...].astype(jnp.float32),
            b[...].astype(jnp.float32),
            precision=jax.lax.Precision.HIGHEST,
        )
        merged = w[...].astype(jnp.float32) + scale * delta.reshape(w.shape)
        flat[(*path[:-1], stem)] = w.replace(merged.astype(w.dtype))
    plain = nnx.eval_shape(lambda: Decoder(model.config, rngs=nnx.Rngs(0), rules=model.rules))
    nnx.update(plain, nnx.from_flat_state(flat))
    return plain


@functools.cache
def _provider_class() -> type:
    """qwix's LoRA provider, restricted to the weights whose ``module/param`` path matches
    the targets (qwix's own rules match module paths; our projections are parameters)."""
    import qwix
    from qwix._src.providers import ptq
    from qwix._src.utils import flax_util

    class TargetedLoraProvider(qwix.LoraProvider):
        def __init__(self, targets: str, *, rank: int, alpha: float):
            super().__init__(module_path=".*", rank=rank, alpha=alpha)
            self._targets = re.compile(targets)

        def _targeted(self, rhs) -> bool:
            name = flax_util.find_param(rhs, ptq.WithAux)
            if name is None or name.endswith((A_SUFFIX, B_SUFFIX)):
                return False
            module = "/".join(map(str, flax_util.get_current_module_path()))
            return self._targets.fullmatch(f"{module}/{name}") is not None

        def dot_general(self, lhs, rhs, *args, **kwargs):
            if self._targeted(rhs):
                return super().dot_general(lhs, rhs, *args, **kwargs)
            return ptq.PtqProvider.dot_general(self, lhs, rhs, *args, **kwargs)

        def einsum(self, einsum_str, *operands, **kwargs):
            if len(operands) == 2 and self._targeted(operands[1]):
                return super().einsum(einsum_str, *operands, **kwargs)
            return ptq.PtqProvider.einsum(self, einsum_str, *operands, **kwargs)

    return TargetedLoraProvider


def _name_axes(model: nnx.Module) -> None:
    """Sets each adapter's ``logical_axes`` from its weight's: ``A`` (first input axis, None),
    ``B`` (None, first output axis); the input axes are those whose sizes multiply to ``A``'s
    rows."""
    for _, module in nnx.iter_modules(model):
        for name, a in list(vars(module).items()):
            if not (isinstance(a, nnx.LoRAParam) and name.endswith(A_SUFFIX)):
                continue
            stem = name[: -len(A_SUFFIX)]
            w, b = getattr(module, stem), getattr(module, stem + B_SUFFIX)
            axes = w.get_metadata().get("logical_axes") or (None,) * len(w.shape)
            rows = [k for k in range(1, len(w.shape)) if math.prod(w.shape[:k]) == a.shape[0]]
            inputs = rows[0] if rows else 1
            a.set_metadata("logical_axes", (axes[0], None))
            b.set_metadata("logical_axes", (None, axes[inputs]))
