"""Hugging Face checkpoints: safetensors in, safetensors out, one tensor at a time.

Loading builds the model skeleton abstractly (`nnx.eval_shape`, no memory), then reads each
tensor, converts it from the HF layout (`[out, in]` linear weights) to ours and puts it
straight into its target sharding, so no second full copy of the model exists on the host.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import safetensors
import safetensors.numpy
from flax import nnx

from opd_jax.errors import InputError
from opd_jax.models.architecture import ModelConfig
from opd_jax.models.decoder import Decoder
from opd_jax.sharding import DEFAULT_RULES, ShardingRules

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One HF tensor: its path in our model, its HF shape and the layout conversion."""

    path: tuple[str | int, ...]
    hf_shape: tuple[int, ...]
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


def _same(shape: tuple[int, ...], path: tuple[str | int, ...]) -> _Entry:
    return _Entry(path, shape, lambda w: w, lambda w: w)


def _transposed(shape: tuple[int, ...], path: tuple[str | int, ...]) -> _Entry:
    return _Entry(path, shape, lambda w: w.T, lambda w: w.T)


def _heads_in(heads: int, head_dim: int, dim: int, path: tuple[str | int, ...]) -> _Entry:
    """HF `[heads * head_dim, dim]` <-> ours `[dim, heads, head_dim]`."""
    return _Entry(
        path,
        (heads * head_dim, dim),
        lambda w: w.reshape(heads, head_dim, dim).transpose(2, 0, 1),
        lambda w: w.transpose(1, 2, 0).reshape(heads * head_dim, dim),
    )


def _heads_out(heads: int, head_dim: int, dim: int, path: tuple[str | int, ...]) -> _Entry:
    """HF `[dim, heads * head_dim]` <-> ours `[heads, head_dim, dim]`."""
    return _Entry(
        path,
        (dim, heads * head_dim),
        lambda w: w.T.reshape(heads, head_dim, dim),
        lambda w: w.reshape(heads * head_dim, dim).T,
    )


def _bias(heads: int, head_dim: int, path: tuple[str | int, ...]) -> _Entry:
    """HF `[heads * head_dim]` <-> ours `[heads, head_dim]`."""
    return _Entry(
        path,
        (heads * head_dim,),
        lambda b: b.reshape(heads, head_dim),
        lambda b: b.reshape(heads * head_dim),
    )


def hf_layout(c: ModelConfig) -> dict[str, _Entry]:
    """Every HF tensor name of a checkpoint with config `c`, mapped to our parameter."""
    D, F, V, N, K, H = (
        c.hidden_size,
        c.intermediate_size,
        c.vocab_size,
        c.num_heads,
        c.num_kv_heads,
        c.head_dim,
    )
    out = {
        "model.embed_tokens.weight": _same((V, D), ("embed",)),
        "model.norm.weight": _same((D,), ("norm", "scale")),
    }
    if not c.tie_word_embeddings:
        out["lm_head.weight"] = _transposed((V, D), ("lm_head",))
    for i in range(c.num_layers):
        hf, us = f"model.layers.{i}.", ("layers", i)
        out |= {
            hf + "input_layernorm.weight": _same((D,), us + ("attn_norm", "scale")),
            hf + "post_attention_layernorm.weight": _same((D,), us + ("mlp_norm", "scale")),
            hf + "self_attn.q_proj.weight": _heads_in(N, H, D, us + ("attn", "q_proj")),
            hf + "self_attn.k_proj.weight": _heads_in(K, H, D, us + ("attn", "k_proj")),
            hf + "self_attn.v_proj.weight": _heads_in(K, H, D, us + ("attn", "v_proj")),
            hf + "self_attn.o_proj.weight": _heads_out(N, H, D, us + ("attn", "o_proj")),
            hf + "mlp.gate_proj.weight": _transposed((F, D), us + ("mlp", "gate_proj")),
            hf + "mlp.up_proj.weight": _transposed((F, D), us + ("mlp", "up_proj")),
            hf + "mlp.down_proj.weight": _transposed((D, F), us + ("mlp", "down_proj")),
        }
        if c.out_bias:
            out[hf + "self_attn.o_proj.bias"] = _same((D,), us + ("attn", "o_bias"))
        if c.qkv_bias:
            out |= {
                hf + f"self_attn.{p}_proj.bias": _bias(n, H, us + ("attn", f"{p}_bias"))
                for p, n in (("q", N), ("k", K), ("v", K))
            }
        if c.qk_norm:
            out |= {
                hf + f"self_attn.{p}_norm.weight": _same((H,), us + ("attn", f"{p}_norm", "scale"))
                for p in ("q", "k")
            }
    return out


def _variable(model: nnx.Module, path: tuple[str | int, ...]) -> nnx.Variable:
    node: Any = model
    for key in path:
        node = (
            node[key] if isinstance(key, int) or isinstance(node, Mapping) else getattr(node, key)
        )
    return node


def model_from_tensors(
    config: ModelConfig,
    get_tensor: Callable[[str], np.ndarray],
    names: Iterable[str],
    *,
    dtype: Any = None,
    shardings: nnx.State | None = None,
    rules: ShardingRules = DEFAULT_RULES,
) -> Decoder:
    """Builds a `Decoder` from tensors keyed by HF names in HF layouts.

    Args:
      config: the model config (e.g. `ModelConfig.from_hf(config_json)`).
      get_tensor: returns one tensor (numpy, HF layout, any float dtype) by HF name,
        e.g. `model.layers.0.self_attn.q_proj.weight` as `[out, in]`.
      names: the tensor names available; missing or unexpected names raise `InputError`
        (a tied checkpoint may carry `lm_head.weight`; it is ignored).
      dtype: parameter and compute dtype (float32 or bfloat16); default: the config's.
      shardings: an `nnx.State` of `NamedSharding`s (`opd_jax.sharding.param_shardings`);
        each tensor is `device_put` straight into its sharding. Default: the default device.
      rules: the model's activation sharding rules (see `Decoder`).
    """
    if dtype is not None:
        config = dataclasses.replace(config, param_dtype=dtype, dtype=dtype)
    layout = hf_layout(config)
    names = set(names)
    missing = sorted(set(layout) - names)
    if missing:
        raise InputError(
            f"{len(missing)} tensors missing from the checkpoint, e.g. {missing[:5]}; the "
            "checkpoint does not match its config (num_hidden_layers, tie_word_embeddings, "
            "attention_bias?)."
        )
    ignorable = {"lm_head.weight"} if config.tie_word_embeddings else set()
    unexpected = sorted(
        n for n in names - set(layout) if n not in ignorable and not n.endswith(_IGNORED_SUFFIXES)
    )
    if unexpected:
        raise InputError(
            f"{len(unexpected)} unexpected tensors in the checkpoint, e.g. {unexpected[:5]}; "
            f"is it really a {config.model_type} model with this config?"
        )
    model = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0), rules=rules))
    for name, entry in layout.items():
        tensor = np.asarray(get_tensor(name))
        if tensor.shape != entry.hf_shape:
            raise InputError(
                f"Tensor {name} has shape {tensor.shape} but the config expects "
                f"{entry.hf_shape}; the checkpoint and its config.json disagree."
            )
        value = np.ascontiguousarray(entry.to_ours(tensor).astype(config.param_dtype))
        sharding = None if shardings is None else _variable(shardings, entry.path)
        _variable(model, entry.path).set_value(jax.device_put(value, sharding))
        del tensor, value
    return model


class CheckpointFileError(InputError):
    """A checkpoint file that cannot be read; the message names the file and the fix."""


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except ValueError as error:
        raise CheckpointFileError(
            f"{path} is not valid JSON ({error}); it may be truncated: copy or save the "
            "checkpoint again."
        ) from None


def _safe_open(file: Path) -> Any:
    """`safetensors.safe_open(file, "np")`, or `CheckpointFileError` for a damaged file."""
    try:
        return safetensors.safe_open(file, "np")
    except safetensors.SafetensorError as error:
        raise CheckpointFileError(
            f"{file} is not a readable safetensors file ({error}); it may be truncated (an "
            "interrupted download or copy): copy or save the checkpoint again."
        ) from None


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The `config.json` dict of a HF checkpoint directory."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"{path} is not a directory; pass a local Hugging Face checkpoint directory "
            "(config.json + model.safetensors) or a .gguf file."
        )
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"No config.json in {path}; is it a Hugging Face checkpoint?")
    config = _read_json(path / "config.json")
    if not isinstance(config, dict):
        raise CheckpointFileError(f"{path / 'config.json'} holds no JSON object.")
    return config


def _weight_files(path: Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file holding it (single file or sharded index)."""
    if (path / SAFETENSORS_INDEX).is_file():
        weight_map = _read_json(path / SAFETENSORS_INDEX)["weight_map"]
        files = {name: path / file for name, file in weight_map.items()}
        for file in set(files.values()):
            if not file.is_file():
                raise FileNotFoundError(f"{file} is listed in {SAFETENSORS_INDEX} but missing.")
        return files
    if (path / SAFETENSORS).is_file():
        with _safe_open(path / SAFETENSORS) as f:
            return {name: path / SAFETENSORS for name in f.keys()}
    raise FileNotFoundError(
        f"No {SAFETENSORS} or {SAFETENSORS_INDEX} in {path}; only safetensors checkpoints "
        "are read (convert a pytorch_model.bin with transformers' save_pretrained)."
    )


def load_hf_weights(
    path: str | os.PathLike,
    config: ModelConfig,
    *,
    dtype: Any = None,
    shardings: nnx.State | None = None,
    rules: ShardingRules = DEFAULT_RULES,
) -> Decoder:
    """Reads a HF safetensors checkpoint directory tensor by tensor into a `Decoder`.

    Raises:
      FileNotFoundError: no weights, or a shard its index lists is missing.
      InputError: a damaged file (`CheckpointFileError`), or weights that do not match
        `config` (missing, unexpected or wrongly shaped tensors), naming `path`.
    """
    files = _weight_files(Path(path))
    with contextlib.ExitStack() as stack:
        handles = {f: stack.enter_context(_safe_open(f)) for f in set(files.values())}
        try:
            return model_from_tensors(
                config,
                lambda n: handles[files[n]].get_tensor(n),
                files,
                dtype=dtype,
                shardings=shardings,
                rules=rules,
            )
        except InputError as error:
            raise InputError(f"{path}: {error}") from None


def save_hf(
    model: Decoder, tokenizer: Any, path: str | os.PathLike, *, max_shard_bytes: int = 4 * 2**30
) -> None:
    """Writes `config.json`, safetensors weights (sharded with an index above
    `max_shard_bytes`) and the tokenizer files, loadable by `transformers`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for stale in [*path.glob("model*.safetensors"), path / SAFETENSORS_INDEX]:
        stale.unlink(missing_ok=True)  # a previous save with another sharding
    config = model.config
    layout = hf_layout(config)
    itemsize = np.dtype(config.param_dtype).itemsize
    shards: list[list[str]] = [[]]
    size = 0
    for name, entry in layout.items():
        nbytes = int(np.prod(entry.hf_shape)) * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    files = (
        [SAFETENSORS]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    for file, names in zip(files, shards, strict=True):
        tensors = {
            n: np.ascontiguousarray(
                layout[n].to_hf(np.asarray(jax.device_get(_variable(model, layout[n].path)[...])))
            )
            for n in names
        }
        safetensors.numpy.save_file(tensors, str(path / file), metadata={"format": "pt"})
        del tensors
    if len(shards) > 1:
        total = sum(int(np.prod(e.hf_shape)) * itemsize for e in layout.values())
        index = {
            "metadata": {"total_size": total},
            "weight_map": {n: f for f, names in zip(files, shards, strict=True) for n in names},
        }
        (path / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2))
    (path / "config.json").write_text(json.dumps(config.to_hf(), indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
