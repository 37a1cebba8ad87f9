"""Logical-axis sharding: every parameter names its axes, a rules table maps them to a mesh.

The mesh always has the axes `("data", "fsdp", "tensor")`; scaling from one CPU to a pod
is a change of mesh shape and/or of `ShardingRules`, never of model code. Parameters carry
their logical axes in the `logical_axes` metadata of their `nnx.Param`
(e.g. `("embed", "mlp")`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
MeshAxes = str | tuple[str, ...] | None


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Logical axis -> mesh axis (or axes, or None for replicated).

    Defaults: batch over data x fsdp, weights' model dimension over fsdp (ZeRO-3 style),
    heads / mlp / vocab over tensor (Megatron style), the rest replicated.
    """

    batch: MeshAxes = ("data", "fsdp")
    embed: MeshAxes = "fsdp"
    vocab: MeshAxes = "tensor"
    mlp: MeshAxes = "tensor"
    q_heads: MeshAxes = "tensor"
    kv_heads: MeshAxes = "tensor"
    head_dim: MeshAxes = None
    norm: MeshAxes = None
    layers: MeshAxes = None
    sequence: MeshAxes = None

    def spec(self, logical_axes: Sequence[str | None]) -> PartitionSpec:
        """The `PartitionSpec` of an array whose dimensions have these logical names."""
        names = {f.name for f in dataclasses.fields(self)}
        for axis in logical_axes:
            if axis is not None and axis not in names:
                raise ValueError(f"Unknown logical axis {axis!r}; known: {sorted(names)}.")
        return PartitionSpec(*(None if a is None else getattr(self, a) for a in logical_axes))

    def sharding(
        self, mesh: jax.sharding.Mesh, logical_axes: Sequence[str | None]
    ) -> NamedSharding:
        return NamedSharding(mesh, self.spec(logical_axes))


DEFAULT_RULES = ShardingRules()


def make_mesh(shape: Mapping[str, int], devices: Sequence[Any] | None = None) -> jax.sharding.Mesh:
    """A mesh with axes `("data", "fsdp", "tensor")`; missing axes get size 1.

    Axes are `AxisType.Auto` (GSPMD propagation from the parameter/input shardings).
    """
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"Unknown mesh axes {sorted(unknown)}; mesh axes are {MESH_AXES}.")
    sizes = tuple(int(shape.get(a, 1)) for a in MESH_AXES)
    return jax.make_mesh(
        sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
    )


def constrain(x: jax.Array, logical_axes: Sequence[str | None], rules: ShardingRules) -> jax.Array:
    """`with_sharding_constraint` under the ambient mesh (`jax.set_mesh`); identity without."""
    if jax.sharding.get_abstract_mesh().empty:
        return x
    return jax.lax.with_sharding_constraint(x, rules.spec(logical_axes))


def logical_axes(tree: Any) -> Any:
    """The `logical_axes` metadata of every `nnx.Variable` in a model or state."""
    state = tree if isinstance(tree, nnx.State) else nnx.state(tree)
    return jax.tree.map(
        lambda v: v.get_metadata().get("logical_axes"),
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def param_shardings(
    tree: Any, mesh: jax.sharding.Mesh, rules: ShardingRules = DEFAULT_RULES
) -> nnx.State:
    """The `NamedSharding` of every variable of a model (abstract or concrete) or `nnx.State`.

    Returns an `nnx.State` with the structure of `nnx.state(model)` whose leaves are
    `NamedSharding`s (a variable without `logical_axes` is replicated).
    """
    state = tree if isinstance(tree, nnx.State) else nnx.state(tree)

    def one(v: nnx.Variable) -> NamedSharding:
        axes = v.get_metadata().get("logical_axes")
        return NamedSharding(mesh, PartitionSpec() if axes is None else rules.spec(axes))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(
    model: nnx.Module, mesh: jax.sharding.Mesh, rules: ShardingRules = DEFAULT_RULES
) -> nnx.Module:
    """Moves every variable of `model` to its sharding (in place); returns the model."""
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, param_shardings(state, mesh, rules)))
    return model


def mesh_of(model: nnx.Module) -> jax.sharding.Mesh | None:
    """The mesh `model`'s concrete parameters are placed on (a `NamedSharding`'s), or None
    (unplaced, on one device, or abstract)."""
    for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)):
        placement = None if isinstance(leaf, jax.core.Tracer) else getattr(leaf, "sharding", None)
        if isinstance(placement, NamedSharding):
            return placement.mesh
    return None
