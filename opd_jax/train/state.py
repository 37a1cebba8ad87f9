"""The run state: the student's parameters and optimizer state, built in one place.

Training, ``opd-jax plan``, ``opd-jax convert``, supervised fine-tuning and the benchmarks all
take the state from here, so that what a plan measures, what a checkpoint holds and what a
step updates are placed on the mesh by one method:

- :func:`abstract_model`: a model's graph and ``ShapeDtypeStruct`` parameters in their
  shardings, trained and frozen apart (``student.lora``), without allocating (plans);
- :func:`opt_shardings`: the optimizer state's shardings, moments following their parameter
  (``optax.tree_map_params``) and everything else (step counts) replicated;
- :func:`init_state` / :func:`abstract_state`: a :class:`RunState` made on the mesh, or its
  abstract twin;
- :func:`abstract_like`: the abstract twin of live arrays (a checkpoint's restore target);
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from opd_jax.config import LoraSpec
from opd_jax.models import Decoder, ModelConfig
from opd_jax.models.lora import apply_lora, split_student
from opd_jax.sharding import DEFAULT_RULES, param_shardings

PyTree = Any


class RunState(NamedTuple):
    """What a step updates and a checkpoint holds: the trained parameters (the student's
    LoRA adapters with ``student.lora.rank``, else all of its parameters) and their optimizer
    state. A LoRA student's frozen base is neither: it is read from ``student.path``."""

    params: nnx.State
    opt_state: optax.OptState


def abstract_model(
    config: ModelConfig,
    mesh: jax.sharding.Mesh,
    lora: LoraSpec | None = None,
    quantize: str = "none",
) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """``(graphdef, trained, frozen)`` of a fresh model (with ``lora``'s adapters when its rank
    is set; :func:`~opd_jax.models.lora.split_student`; its weights in int8 with ``quantize``,
    :func:`~opd_jax.models.quantize.quantize_weights`), ``ShapeDtypeStruct`` leaves in their
    shardings."""

    def make() -> Decoder:
        model = Decoder(config, rngs=nnx.Rngs(0))
        if quantize != "none":
            from opd_jax.models.quantize import quantize_weights  # qwix: the `qwix` extra

            model = quantize_weights(model, quantize)
        return apply_lora(model, lora.rank, lora.alpha, lora.targets) if lora else model

    graphdef, trained, frozen = split_student(nnx.eval_shape(make))

    def place(params: nnx.State) -> nnx.State:
        return jax.tree.map(
            lambda v, s: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s)),
            params,
            param_shardings(params, mesh, DEFAULT_RULES),
            is_leaf=lambda x: isinstance(x, nnx.Variable),
        )

    return graphdef, place(trained), place(frozen)


def opt_shardings(
    tx: optax.GradientTransformation, params: nnx.State, mesh: jax.sharding.Mesh | None
) -> PyTree:
    """Shardings of ``tx.init(params)``: a moment takes its parameter's, the rest (counts,
    schedules) is replicated on ``mesh`` (None: on the default device). ``params`` may be live
    or abstract (with shardings)."""
    if mesh is None:
        replicated = SingleDeviceSharding(jax.devices()[0])
    else:
        replicated = NamedSharding(mesh, PartitionSpec())
    return optax.tree_map_params(
        tx,
        lambda _, p: p.sharding,
        jax.eval_shape(tx.init, params),
        params,
        transform_non_params=lambda _: replicated,
    )


def init_state(
    tx: optax.GradientTransformation, params: nnx.State, mesh: jax.sharding.Mesh | None = None
) -> RunState:
    """``RunState(params, tx.init(params))`` with the optimizer state made in place on the mesh."""
    init = jax.jit(tx.init, out_shardings=opt_shardings(tx, params, mesh))
    return RunState(params, init(params))


def abstract_state(
    tx: optax.GradientTransformation, params: nnx.State, mesh: jax.sharding.Mesh | None = None
) -> RunState:
    """The abstract twin of :func:`init_state` (nothing allocated)."""
    opt_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        jax.eval_shape(tx.init, params),
        opt_shardings(tx, params, mesh),
    )
    return RunState(abstract_like(params), opt_state)


def abstract_like(tree: PyTree) -> PyTree:
    """``ShapeDtypeStruct`` leaves with the shapes, dtypes and shardings of ``tree``'s."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        tree,
    )
