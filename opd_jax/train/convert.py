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

import jax
import orbax.checkpoint as ocp
from flax import nnx

from opd_jax import models
from opd_jax.config import load_config
from opd_jax.models import Decoder, ModelConfig
from opd_jax.train.checkpoint import Checkpointer
from opd_jax.train.optimizer import make_optimizer
from opd_jax.train.pair import load_model

MARKER = "opd_jax_orbax.json"


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


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
            (src / "params").absolute(), _abstract(nnx.to_pure_dict(params))
        )
    nnx.replace_by_pure_dict(params, pure)
    nnx.update(model, params)
    return model, models.load_tokenizer(src)


def run_student(run_dir: Path) -> tuple[Decoder, object]:
    """A run's student at its last good checkpoint."""
    config = load_config(run_dir / "config.yaml")
    model, tokenizer = load_model(config.student)
    params = nnx.state(model, nnx.Param)
    opt_state = make_optimizer(config.optim, config.train.steps).init(params)
    with Checkpointer(run_dir, keep=config.run.keep_checkpoints) as checkpointer:
        restored = checkpointer.restore(_abstract({"params": params, "opt_state": opt_state}))
    if restored is None:
        raise FileNotFoundError(f"{run_dir} has no checkpoint yet: train first, then convert.")
    nnx.update(model, restored.state["params"])
    return model, tokenizer


def convert(src: str | Path, dst: str | Path) -> None:
    """Converts ``src`` to ``dst`` (see the module docstring for the directions)."""
    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise FileNotFoundError(f"No checkpoint or run directory at {src}.")
    if src.resolve() == dst.resolve():
        raise ValueError("convert needs a destination different from its source.")
    if (src / "config.yaml").is_file() and (src / "checkpoints").is_dir():
        models.save_hf(*run_student(src), dst)
    elif (src / MARKER).is_file():
        models.save_hf(*from_orbax(src), dst)
    else:
        model, tokenizer = models.load(src)
        if dst.exists() and any(dst.iterdir()):
            shutil.rmtree(dst / "params", ignore_errors=True)
        to_orbax(model, tokenizer, dst)
