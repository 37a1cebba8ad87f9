"""The student and teacher named by a config's ``student`` / ``teacher`` sections, paired by
their tokenizer.

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
    if spec.lora.rank:
        from opd_jax.models.lora import apply_lora  # qwix: the `qwix` extra

        model = apply_lora(model, spec.lora.rank, spec.lora.alpha, spec.lora.targets)
    if spec.quantize == "int8":
        from opd_jax.models.quantize import quantize_weights  # qwix: the `qwix` extra

        model = quantize_weights(model)
    return model, tokenizer


def spec_config(spec: ModelSpec) -> ModelConfig:
    """The :class:`ModelConfig` of ``spec`` from checkpoint metadata and tokenizer alone (no
    weights), fitted to the tokenizer's ids as :func:`opd_jax.models.load` fits a model (a
    directory without tokenizer files: its embedding's rows)."""
    path = models.resolve_path(spec.path)
    if path.suffix == ".gguf":
        from opd_jax.models.gguf import read_gguf

        hf, _, _, tokenizer = read_gguf(path)
    else:
        hf = models.read_config(path)
        try:
            tokenizer = models.load_tokenizer(path)
        except FileNotFoundError:  # a plan from config.json alone: the embedding's rows
            tokenizer = None
    config = ModelConfig.from_hf(hf, param_dtype=DTYPES[spec.dtype])
    if tokenizer is not None:
        config = config.fitted_to(models.token_vocab(tokenizer))
    return dataclasses.replace(config, num_layers=len(spec.layers)) if spec.layers else config


def load_pair(config: Config, mesh: jax.sharding.Mesh) -> tuple[Decoder, Decoder, Tokenizer]:
    """Student, teacher and tokenizer, paired by their tokenizer: the two tokenizers must be
    the same (vocabulary and special tokens), the embeddings may be padded to different sizes
    past it (:func:`opd_jax.models.fit_to_tokenizer`: both models score and sample over the
    tokenizer's ids alone). Refuses
    ``sampling.top_k`` or ``score.k`` above the vocabulary."""
    student, tokenizer = load_model(config.student, mesh)
    teacher, teacher_tokenizer = load_model(config.teacher, mesh)
    models.check_same_tokenizer(tokenizer, teacher_tokenizer)
    vocab = models.token_vocab(tokenizer)  # both models score over it (models.load fits them)
    for key, k in (("sampling.top_k", config.sampling.top_k), ("score.k", config.score.k)):
        if k > vocab:
            raise ConfigError(
                f"{key}={k} exceeds the vocabulary of {vocab} tokens ({config.student.path}): "
                f"set it to at most {vocab}."
            )
    return student, teacher, tokenizer
