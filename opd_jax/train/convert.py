"""``opd-jax convert``: Hugging Face / GGUF checkpoints <-> orbax, and a run's student -> HF.

- SRC a Hugging Face directory or ``.gguf`` file: DST becomes an orbax directory holding the
  parameters (``params/``), ``config.json`` and the tokenizer files.
- SRC such an orbax directory: DST becomes a Hugging Face directory.
- SRC a run directory (``config.yaml`` + ``checkpoints/``): its student at the last good
  checkpoint is written to DST as a Hugging Face directory (loadable by transformers, vLLM).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import orbax.checkpoint as ocp
from flax import nnx

from opd_jax import models
from opd_jax.models import Decoder, ModelConfig
from opd_jax.train.state import abstract_like, restore_student

MARKER = "opd_jax_orbax.json"


def to_orbax(model: Decoder, tokenizer, dst: Path) -> None:
    """Writes ``model``'s parameters with orbax beside its config and tokenizer."""
    dst.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(
            (dst / "params").absolute(), nnx.to_pure_dict(nnx.state(model, nnx.Param)), force=True
        )
    (dst / "config.json").write_text(json.dumps(model.config.to_hf(), indent=2))
    tokenizer.save_pretrained(str(dst))
    (dst / MARKER).write_text(json.dumps({"format": "opd_jax orbax params", "version": 1}))


def from_orbax(src: Path) -> tuple[Decoder, object]:
    """The model and tokenizer of a directory written by :func:`to_orbax`."""
    config = ModelConfig.from_hf(json.loads((src / "config.json").read_text()))
    model = Decoder(config, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    with ocp.StandardCheckpointer() as checkpointer:
        pure = checkpointer.restore(
            (src / "params").absolute(), abstract_like(nnx.to_pure_dict(params))
        )
    nnx.replace_by_pure_dict(params, pure)
    nnx.update(model, params)
    return model, models.load_tokenizer(src)


def convert(src: str | Path, dst: str | Path) -> None:
    """Converts ``src`` to ``dst`` (see the module docstring for the directions)."""
    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise FileNotFoundError(f"No checkpoint or run directory at {src}.")
    if src.resolve() == dst.resolve():
        raise ValueError("convert needs a destination different from its source.")
    if (src / "config.yaml").is_file() and (src / "checkpoints").is_dir():
        models.save_hf(*restore_student(src), dst)
    elif (src / MARKER).is_file():
        models.save_hf(*from_orbax(src), dst)
    else:
        model, tokenizer = models.load(src)
        if dst.exists() and any(dst.iterdir()):
            shutil.rmtree(dst / "params", ignore_errors=True)
        to_orbax(model, tokenizer, dst)
