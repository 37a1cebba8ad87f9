"""The experiment's two models, made offline by the project's own code.

A byte-level BPE tokenizer (digits split) is trained on the task's text; a teacher and a
smaller student (Qwen3-style decoders from scratch, :class:`~opd_jax.config.ModelShape`) are
fine-tuned on the task's reference solutions, the teacher for longer: a clearly stronger
teacher and a weak but sensible student, the strong-to-weak setting of the paper.

Each model is written as a Hugging Face directory (``models/teacher``, ``models/student`` in
the run directory) through a temporary directory renamed into place, with ``sft.json`` (its
settings and training log): a stage that finished is never redone, one cut short is redone.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from opd_jax import data, models
from opd_jax.config import Config, ModelShape, SFTConfig
from opd_jax.experiment.layout import ROLES, model_dirs, tokenizer_dir
from opd_jax.experiment.workers import Pool
from opd_jax.files import atomic_write_text
from opd_jax.models.tokenizer import train_bpe_tokenizer
from opd_jax.sft import SFTSettings, sft

DONE = "sft.json"


def hf_config(shape: ModelShape, tokenizer: models.Tokenizer, max_positions: int) -> dict:
    """A Qwen3 ``config.json`` dict of ``shape`` over ``tokenizer``'s vocabulary."""
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": len(tokenizer),
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "head_dim": shape.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": max_positions,
        "tie_word_embeddings": True,
        "bos_token_id": None,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _source(config: Config, split: str):
    c = config.data
    return data.load_source(c.source, split, c.data_dir, **c.arithmetic)


def task_tokenizer(config: Config) -> models.Tokenizer:
    """The BPE tokenizer trained on the first ``tokenizer_examples`` training examples."""
    source = _source(config, "train")
    count = min(config.experiment.tokenizer_examples, len(source))
    texts = [
        bytes(source[i][field]).decode("utf-8")
        for i in range(count)
        for field in ("prompt", "solution")
    ]
    return train_bpe_tokenizer(texts, config.experiment.vocab_size, split_digits=True)


def max_positions(config: Config) -> int:
    """RoPE positions the models must cover: prompt plus the longest response budget."""
    response = max(config.sampling.max_new_tokens, config.experiment.eval_max_new_tokens)
    return config.data.max_prompt_tokens + response


def train_model(
    config: Config, role: str, tokenizer: models.Tokenizer, path: Path, seed: int
) -> dict[str, Any]:
    """Fine-tunes a fresh model of ``experiment.<role>`` and saves it at ``path``; returns
    its ``sft.json`` record (settings, log, seconds)."""
    spec: SFTConfig = getattr(config.experiment, role)
    model_config = models.ModelConfig.from_hf(
        hf_config(spec.shape, tokenizer, max_positions(config))
    )
    model = models.Decoder(model_config, rngs=nnx.Rngs(seed))
    batches = data.make_prompt_iterator(
        _source(config, "train"), batch_size=spec.batch_size, seed=seed
    )
    settings = SFTSettings(
        steps=spec.steps,
        optim=spec.optim,
        prompt_len=config.data.max_prompt_tokens,
        target_len=config.sampling.max_new_tokens,
        chunk_size=config.score.chunk_size,
        chat_template=config.data.chat_template,
    )
    log: list[dict[str, float]] = []

    def record(step: int, metrics: dict[str, float]) -> None:
        log.append({"step": step, **metrics})
        print(
            f"  {role} sft step {step}/{spec.steps}: loss {metrics['loss']:.4f} "
            f"({metrics['tokens_per_s']:.0f} target tokens/s)",
            flush=True,
        )

    print(f"training the {role} ({spec.shape})", flush=True)
    start = time.perf_counter()
    sft(model, tokenizer, batches, settings, log=record, log_every=max(spec.steps // 5, 1))
    seconds = time.perf_counter() - start
    params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    report = {
        "role": role,
        "seed": seed,
        "parameters": int(params),
        "settings": dataclasses.asdict(spec),
        "log": log,
        "seconds": seconds,
    }
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    models.save_hf(model, tokenizer, tmp)
    atomic_write_text(tmp / DONE, json.dumps(report, indent=2) + "\n")
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return report


def train_role(config: Config, role: str, seed: int) -> dict[str, Any]:
    """Trains ``role``'s model with the experiment's tokenizer (a job of
    :class:`~opd_jax.experiment.workers.Pool`); returns its ``sft.json`` record."""
    tokenizer = models.load_tokenizer(tokenizer_dir(config))
    return train_model(config, role, tokenizer, model_dirs(config)[role], seed)


def prepare_models(config: Config) -> dict[str, Path]:
    """``{"teacher": path, "student": path}``, training each model unless already done (the
    two at once with ``experiment.workers`` > 1)."""
    paths = model_dirs(config)
    missing = [role for role, path in paths.items() if not (path / DONE).is_file()]
    if not missing:
        return paths
    shared = tokenizer_dir(config)
    if not (shared / "tokenizer.json").is_file():  # both models share the first one made
        task_tokenizer(config).save_pretrained(str(shared))
    jobs = [(config, role, config.seed + offset) for offset, role in enumerate(ROLES)]
    with Pool(config) as pool:
        for (_, role, _), report, _ in pool.run(train_role, [j for j in jobs if j[1] in missing]):
            shape = getattr(config.experiment, role).shape
            print(
                f"  {role} ({shape}): {report['parameters']:,} parameters, "
                f"{report['seconds']:.0f} s",
                flush=True,
            )
    return paths
