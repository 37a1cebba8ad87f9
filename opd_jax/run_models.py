"""The student and teacher named by a config's ``student`` / ``teacher`` sections.

A :class:`~opd_jax.config.ModelSpec` is a local checkpoint (``path``), its ``dtype`` and,
optionally, the ``layers`` to keep: a student derived from a larger checkpoint by dropping
decoder layers (e.g. every other layer of SmolLM2-135M), sharing its embeddings and norms.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
from flax import nnx

from opd_jax import models
from opd_jax.config import Config, ConfigError, ModelSpec
from opd_jax.errors import InputError
from opd_jax.models import DTYPES, Decoder, ModelConfig, Tokenizer


def keep_layers(model: Decoder, layers: Sequence[int]) -> Decoder:
    """``model`` restricted to the decoder ``layers`` (in the given order)."""
    n = model.config.num_layers
    if not layers or any(not 0 <= i < n for i in layers):
        raise InputError(f"layers {list(layers)} must be non-empty indices in [0, {n}).")
    config = dataclasses.replace(model.config, num_layers=len(layers))
    derived = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0), rules=model.rules))
    derived.embed = model.embed
    derived.norm = model.norm
    derived.layers = nnx.List([model.layers[i] for i in layers])
    if not config.tie_word_embeddings:
        derived.lm_head = model.lm_head
    return derived


def load_model(spec: ModelSpec, mesh: jax.sharding.Mesh | None = None) -> tuple[Decoder, Tokenizer]:
    """The model and tokenizer of ``spec``, placed on ``mesh`` by the default rules."""
    model, tokenizer = models.load(spec.path, DTYPES[spec.dtype], mesh=mesh)
    if spec.layers:
        model = keep_layers(model, spec.layers)
    return model, tokenizer


def spec_config(spec: ModelSpec) -> ModelConfig:
    """The :class:`ModelConfig` of ``spec`` from checkpoint metadata alone (no weights)."""
    path = models.resolve_path(spec.path)
    if path.suffix == ".gguf":
        from opd_jax.models.gguf import read_gguf

        hf = read_gguf(path)[0]
    else:
        hf = models.read_config(path)
    config = ModelConfig.from_hf(hf, param_dtype=DTYPES[spec.dtype])
    return dataclasses.replace(config, num_layers=len(spec.layers)) if spec.layers else config


def load_pair(config: Config, mesh: jax.sharding.Mesh) -> tuple[Decoder, Decoder, Tokenizer]:
    """Student, teacher and tokenizer; refuses pairs that do not share a vocabulary, and
    ``sampling.top_k`` or ``score.k`` above its size."""
    student, tokenizer = load_model(config.student, mesh)
    teacher, teacher_tokenizer = load_model(config.teacher, mesh)
    models.check_same_tokenizer(tokenizer, teacher_tokenizer)
    if student.config.vocab_size != teacher.config.vocab_size:
        raise InputError(
            f"student vocabulary {student.config.vocab_size} != teacher vocabulary "
            f"{teacher.config.vocab_size}: OPD needs one tokenizer and one embedding size."
        )
    vocab = student.config.vocab_size
    for key, k in (("sampling.top_k", config.sampling.top_k), ("score.k", config.score.k)):
        if k > vocab:
            raise ConfigError(
                f"{key}={k} exceeds the vocabulary of {vocab} tokens ({config.student.path}): "
                f"set it to at most {vocab}."
            )
    return student, teacher, tokenizer
