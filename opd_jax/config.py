"""Run configuration: the typed sections of a run and their checks.

``load_config("configs/smollm2_layers.yaml", ["rule.kind=full", "train.steps=10"])`` returns a
:class:`Config`. Every key is checked before any compute: an unknown or mistyped key fails
with the nearest valid key, a value of the wrong type or out of the range its field declares
(``Positive``, ``Fraction``, ...: checked by pydantic, NaN and infinities refused) names the
key, the value and what is allowed (:mod:`opd_jax.typed_yaml`). Rule options
(``rule.options.*``) are checked against the chosen rule's options and their defaults' types.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import Field

from opd_jax.config_checks import check_stopping
from opd_jax.config_upgrade import upgrade_tree
from opd_jax.core import (
    LOSSES,
    REDUCTIONS,
    RULES,
    check_loss,
    loss_options,
    online_options,
    rule_options,
)
from opd_jax.typed_yaml import (  # noqa: F401 (re-exported)
    ConfigError,
    Decay,
    MeshSize,
    NonEmpty,
    NonNegative,
    NonNegativeFloat,
    Positive,
    PositiveFloat,
    all_keys,
    build_tree,
    coerce,
    load_tree,
    note,
)


@dataclasses.dataclass
class RunConfig:
    dir: NonEmpty = "runs/default"  # checkpoints, metrics.jsonl, TensorBoard events, plots, tables
    log_every: Positive = 1  # steps between metric lines
    checkpoint_every: Positive = 50  # steps between checkpoints (and one at the end)
    keep_checkpoints: Positive = 3  # the last k are kept
    async_checkpoint: bool = True  # write checkpoints in the background where orbax can
    # where metrics go besides metrics.jsonl: tensorboard (event files in run.dir/tensorboard),
    # wandb (Weights & Biases; the `wandb` extra, WANDB_MODE=offline for no network)
    loggers: list[str] = dataclasses.field(default_factory=lambda: ["tensorboard"])
    wandb_project: str = "opd_jax"  # the W&B project of run.loggers' wandb
    progress: bool = True  # a progress bar on the terminal
    # XLA's persistent compilation cache for the command line ("": off): a rerun or a resume
    # loads the compiled step instead of compiling it again
    compilation_cache: str = "~/.cache/opd_jax/xla"
    # resume even though keys that change the training trajectory differ from the checkpoint's
    # (warned, and recorded in the checkpoints' meta as config_changes)
    allow_changes: bool = False


@dataclasses.dataclass
class LoraSpec:
    """Low-rank adapters on the student (qwix): only they train, the base stays frozen."""

    rank: Annotated[NonNegative, note("0: no adapters, the whole student trains")] = 0
    alpha: PositiveFloat = 16.0  # the adapters' update is scaled by alpha / rank
    # regex over module paths whose matmuls get adapters (attention and MLP projections)
    targets: NonEmpty = r".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj).*"


@dataclasses.dataclass
class ModelSpec:
    path: str = ""  # a local Hugging Face directory or .gguf file (never a hub id)
    dtype: str = "float32"  # float32 or bfloat16 (parameters and compute)
    layers: list[int] = dataclasses.field(default_factory=list)  # keep only these layers ([]: all)
    lora: LoraSpec = dataclasses.field(default_factory=LoraSpec)  # student only
    quantize: str = "none"  # none or int8 (weights, via qwix): teacher only


@dataclasses.dataclass
class DataConfig:
    # "arithmetic" (the built-in task) or a JSONL/Parquet file or folder
    source: NonEmpty = "arithmetic"
    split: str = "train"
    data_dir: NonEmpty = "runs/data"  # where TFDS builds are written
    batch_size: Positive = 8  # prompts per optimizer step, over all processes
    max_prompt_tokens: Positive = 96  # prompts are left-padded or truncated (from the left) to this
    chat_template: bool = True  # wrap prompts in the tokenizer's chat template
    system_prompt: str = ""
    arithmetic: dict[str, Any] = dataclasses.field(default_factory=dict)  # ArithmeticConfig fields


@dataclasses.dataclass
class SamplingConfig:
    max_new_tokens: Positive = 64  # response budget N
    temperature: Annotated[NonNegativeFloat, note("0 is greedy")] = 1.0
    top_k: Annotated[NonNegative, note("0 disables it")] = 0
    top_p: Annotated[float, Field(gt=0, le=1), note("1 disables it")] = 1.0
    n: Positive = 1  # samples per prompt, sharing its prefill: a step has data.batch_size * n rows
    # tokens between drops of finished rows
    compact_every: Annotated[NonNegative, note("0 never drops finished rows")] = 16
    # rule.kind=release: the teacher scores rows while they are sampled, and a row stops once
    # its cut is certain (docs/method.md §3a); stop_confirm and stop_min_gain say when
    stop_at_release: bool = False
    stop_confirm: NonNegative = online_options()["confirm"]  # shorter series that must agree
    stop_min_gain: NonNegativeFloat = online_options()["min_gain"]  # least BIC gain of each


@dataclasses.dataclass
class ScoreConfig:
    k: Positive = 16  # top-K kept per position (margins, entropy, TA-OPD)
    chunk_size: Positive = 1024  # positions whose [chunk, V] logits are alive at once


@dataclasses.dataclass
class SegmentsConfig:
    kind: str = "sentence"  # sentence (NLTK Punkt), fixed, token
    tokens: Positive = 32  # block size of kind=fixed
    # rule.kind=oracle cuts each response after the first match of this regex in its text ("":
    # the arithmetic task's "The answer is N.", opd_jax.data.oracle.ANSWER_PATTERN)
    oracle_pattern: str = ""


@dataclasses.dataclass
class RuleConfig:
    kind: str = "release"  # release or a baseline of docs/method.md §6
    options: dict[str, Any] = dataclasses.field(default_factory=dict)  # the rule's own options


@dataclasses.dataclass
class LossConfig:
    kind: str = "sampled_reverse_kl"  # a loss of docs/method.md §5 (opd_jax.core.LOSSES)
    reduction: str = "token_mean"  # token_mean or sequence_mean
    options: dict[str, Any] = dataclasses.field(default_factory=dict)  # the loss's own options


@dataclasses.dataclass
class OptimConfig:
    learning_rate: Annotated[NonNegativeFloat, note("0: no update")] = 1e-5
    schedule: str = "cosine"  # cosine (decays to 10%) or constant, after linear warmup
    warmup_steps: Annotated[NonNegative, note("0: no warmup")] = 0
    # the cosine's horizon: it reaches 10% at this step and stays there (0: train.steps); fix it
    # to raise train.steps of a run without changing its schedule
    decay_steps: Annotated[NonNegative, note("0: train.steps")] = 0
    weight_decay: NonNegativeFloat = 0.0
    b1: Decay = 0.9
    b2: Decay = 0.999
    clip_norm: Annotated[NonNegativeFloat, note("global-norm clipping; 0 disables it")] = 1.0
    accumulate: Positive = 1  # micro-batches per optimizer step (gradient accumulation)


@dataclasses.dataclass
class MeshConfig:
    data: MeshSize = 1
    fsdp: MeshSize = -1  # -1: all remaining devices
    tensor: MeshSize = 1
    # devices set apart for sampling (the last ones; rows over all of them, the student's
    # weights copied there each step): with train.async_rollouts the next step samples there
    # during the update, with sampling.stop_at_release the teacher's looks run on the training
    # devices beside the decoding (2 CPU cores: JAX_NUM_CPU_DEVICES=2, mesh.rollout=1);
    # 0: rollouts on the training mesh
    rollout: Annotated[NonNegative, note("0: rollouts on the training devices")] = 0


@dataclasses.dataclass
class TrainConfig:
    steps: Positive = 100  # optimizer steps in the run
    remat: bool = False  # recompute the student's blocks in the backward pass (long rollouts)
    # the step's attention kernel (opd_jax.models.attention): auto | xla | cudnn | flash | splash;
    # auto: cudnn on a CUDA GPU in bfloat16, xla on other GPUs, splash on TPU, flash on CPU
    attention: str = "auto"
    # xla: queries attended at a time (0: all; memory O(chunk*S)); flash: its block (0: 512)
    attention_chunk: Annotated[NonNegative, note("0 attends all queries at once")] = 0
    # a step whose loss, gradient or updated parameters are not finite: stop (the run ends
    # before saving it) or skip (parameters and optimizer state stay as they were; counted)
    on_nonfinite: str = "stop"
    # one-step off-policy rollouts: step t+1's rollouts are sampled from the parameters of
    # step t while step t's update runs (off: every step samples from its own parameters)
    async_rollouts: bool = False


@dataclasses.dataclass
class ModelShape:
    """The shape of a Qwen3-style decoder made from scratch (tied embeddings)."""

    layers: Positive = 2
    hidden: Positive = 64
    heads: Positive = 2
    kv_heads: Positive = 1
    head_dim: Positive = 32
    intermediate: Positive = 192


@dataclasses.dataclass
class SFTConfig:
    """Supervised fine-tuning of one model of the experiment on the task's solutions."""

    shape: ModelShape = dataclasses.field(default_factory=ModelShape)
    steps: Positive = 300
    batch_size: Positive = 64
    # AdamW as for OPD (optim.accumulate must stay 1); a small model from scratch takes a
    # large learning rate
    optim: OptimConfig = dataclasses.field(
        default_factory=lambda: OptimConfig(learning_rate=3e-3, warmup_steps=50)
    )


@dataclasses.dataclass
class ExperimentConfig:
    """``opd-jax experiment``: train a teacher and a student, then OPD under each rule.

    Read only by ``opd-jax experiment`` (``opd-jax train`` ignores it). The models are made
    from scratch on the task (``data``), the OPD runs use every other section of the config.
    """

    rules: list[str] = dataclasses.field(
        default_factory=lambda: ["release", "full", "prefix_fraction", "ta_opd", "iw_opd"]
    )
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0, 1])  # OPD seeds per rule
    # teacher/student pairs trained independently (pair p: model seeds shifted by 2p), each a
    # whole experiment in run.dir/pair<p>; [0]: one pair, in run.dir itself
    pairs: list[int] = dataclasses.field(default_factory=lambda: [0])
    vocab_size: Positive = 300  # BPE tokenizer trained on the task (digits split)
    tokenizer_examples: Positive = 2000  # train examples the tokenizer is trained on
    teacher: SFTConfig = dataclasses.field(default_factory=SFTConfig)
    student: SFTConfig = dataclasses.field(default_factory=SFTConfig)
    # OPD steps between accuracy points (accuracy against step)
    curve_every: Annotated[NonNegative, note("0: no curve")] = 10
    curve_problems: Positive = 64  # in-domain problems of each accuracy point (eval_k samples each)
    eval_splits: list[str] = dataclasses.field(
        default_factory=lambda: ["test", "test_long", "test_unseen_op"]
    )  # arithmetic splits of the final table: in-domain first, then out-of-domain
    eval_problems: Annotated[NonNegative, note("0: all")] = 0  # problems per split
    eval_k: Positive = 4  # samples per problem
    eval_temperature: Annotated[NonNegativeFloat, note("0 is greedy")] = 1.0
    eval_max_new_tokens: Positive = 128  # room for test_long's longer solutions
    # processes that run the experiment's jobs at once (the two models' fine-tuning, the OPD
    # runs); each job computes what it would alone (opd_jax.experiment.workers)
    workers: Positive = 1
    full: dict[str, Any] = dataclasses.field(default_factory=dict)  # overrides of --full


@dataclasses.dataclass
class Config:
    seed: int = 0  # every PRNG key and the data order derive from it
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    student: ModelSpec = dataclasses.field(default_factory=ModelSpec)
    teacher: ModelSpec = dataclasses.field(default_factory=ModelSpec)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    sampling: SamplingConfig = dataclasses.field(default_factory=SamplingConfig)
    score: ScoreConfig = dataclasses.field(default_factory=ScoreConfig)
    segments: SegmentsConfig = dataclasses.field(default_factory=SegmentsConfig)
    rule: RuleConfig = dataclasses.field(default_factory=RuleConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    experiment: ExperimentConfig = dataclasses.field(default_factory=ExperimentConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


CHOICES = {
    "segments.kind": ("sentence", "fixed", "token"),
    "rule.kind": RULES,  # the registries themselves: a rule or loss added to one is a choice
    "loss.kind": LOSSES,
    "loss.reduction": REDUCTIONS,
    "optim.schedule": ("cosine", "constant"),
    "student.dtype": ("float32", "bfloat16"),
    "teacher.dtype": ("float32", "bfloat16"),
    "train.attention": ("auto", "xla", "cudnn", "flash", "splash"),
    "train.on_nonfinite": ("stop", "skip"),
    "student.quantize": ("none", "int8"),
    "teacher.quantize": ("none", "int8"),
}
LOGGERS = ("tensorboard", "wandb")


def validate(config: Config) -> Config:
    """Cross-field checks: choices, sizes and ranges, the data section, and the chosen rule's
    options (returned with floats coerced, e.g. ``eps: 1e-8`` read as a string by YAML)."""
    flat = flatten(config.to_dict())
    for key, choices in CHOICES.items():
        if flat[key] not in choices:
            near = difflib.get_close_matches(str(flat[key]), list(choices), n=1)
            hint = f" Did you mean {near[0]!r}?" if near else ""
            raise ConfigError(f"{key}={flat[key]!r} is not one of {list(choices)}.{hint}")
    check_sampling(config.sampling)
    check_stopping(config.sampling, config.rule.kind)
    check_mesh(config.mesh)
    for logger in config.run.loggers:
        if logger not in LOGGERS:
            raise ConfigError(f"run.loggers: {logger!r} is not one of {list(LOGGERS)}.")
    if config.teacher.lora.rank:
        raise ConfigError("teacher.lora: the teacher is only read; adapters train the student.")
    if config.student.quantize != "none":
        raise ConfigError(
            "student.quantize: the student trains in student.dtype; quantise the teacher "
            "(teacher.quantize=int8), or train adapters on the student (student.lora.rank)."
        )
    pattern = config.segments.oracle_pattern
    try:
        re.compile(pattern)
    except re.error as error:
        raise ConfigError(f"segments.oracle_pattern={pattern!r} is no regex: {error}.") from None
    options = _checked_rule_options(config.rule.kind, config.rule.options, config.score.k)
    loss = _checked_options(
        "loss", config.loss.kind, loss_options(config.loss.kind), config.loss.options
    )
    try:
        check_loss(config.loss.kind, loss)
    except ValueError as error:
        raise ConfigError(f"loss.options: {error}") from None
    if config.train.attention in ("cudnn", "splash") and config.train.attention_chunk:
        raise ConfigError(
            "train.attention_chunk applies to train.attention xla and flash (cuDNN's and "
            "splash's fused attention have their own blocks): set one of them."
        )
    if not config.student.path or not config.teacher.path:
        raise ConfigError(
            "student.path and teacher.path must name local checkpoints (a config with an "
            "`experiment` section trains them: run `opd-jax experiment CONFIG` instead)."
        )
    if config.data.arithmetic and config.data.source != "arithmetic":
        raise ConfigError(
            f"data.arithmetic configures the built-in task, but data.source is "
            f"{config.data.source!r}: remove the data.arithmetic section (or set "
            "data.source=arithmetic)."
        )
    for role in ("teacher", "student"):
        if getattr(config.experiment, role).optim.accumulate != 1:
            raise ConfigError(
                f"experiment.{role}.optim.accumulate must be 1: fine-tuning takes whole batches "
                f"(set experiment.{role}.batch_size instead)."
            )
    if config.data.batch_size % config.optim.accumulate:
        raise ConfigError(
            f"data.batch_size={config.data.batch_size} must be a multiple of "
            f"optim.accumulate={config.optim.accumulate}."
        )
    return dataclasses.replace(
        config,
        rule=dataclasses.replace(config.rule, options=options),
        loss=dataclasses.replace(config.loss, options=loss),
    )


def check_sampling(c: SamplingConfig, section: str = "sampling") -> None:
    """Not both top-k and top-p (each value's range is declared on its field)."""
    if c.top_k > 0 and c.top_p < 1:
        raise ConfigError(f"set {section}.top_k or {section}.top_p, not both.")


def check_mesh(c: MeshConfig) -> None:
    """Each training axis -1 or >= 1, at most one -1 (their product is checked against the
    devices when the mesh is made, :func:`opd_jax.train.session.mesh_from_config`)."""
    sizes = {"mesh.data": c.data, "mesh.fsdp": c.fsdp, "mesh.tensor": c.tensor}
    for key, size in sizes.items():
        if size == 0:
            raise ConfigError(f"{key} must be >= 1, or -1 for the remaining devices; got 0.")
    if list(sizes.values()).count(-1) > 1:
        raise ConfigError(
            f"at most one of {', '.join(sizes)} may be -1 (the remaining devices), got "
            f"{', '.join(f'{k}={v}' for k, v in sizes.items())}."
        )


def _checked_options(
    section: str, kind: str, valid: Mapping[str, Any], options: Mapping[str, Any]
) -> dict[str, Any]:
    """``options`` of ``section`` (``rule`` or ``loss``), each one of ``valid`` (the chosen
    function's options) and of its default's type (ints and numeric strings accepted for
    floats)."""
    checked = {}
    for option, value in options.items():
        if option not in valid:
            near = difflib.get_close_matches(option, list(valid), n=1)
            hint = f" Did you mean '{section}.options.{near[0]}'?" if near else ""
            raise ConfigError(
                f"{section} {kind!r} has no option {option!r}; its options are "
                f"{sorted(valid)}.{hint}"
            )
        default = valid[option]
        hint = Any if default is None else type(default)
        checked[option] = coerce(f"{section}.options.{option}", value, hint)
    return checked


def _checked_rule_options(kind: str, options: Mapping[str, Any], k: int) -> dict[str, Any]:
    """The rule's checked ``options``, with top-K sizes within ``score.k``."""
    valid = rule_options(kind)
    checked = _checked_options("rule", kind, valid, options)
    for option in ("k", "margin_k"):
        value = {**valid, **checked}.get(option)
        if value is not None and value > k:
            raise ConfigError(
                f"rule.options.{option}={value} exceeds score.k={k}, the top-K kept "
                f"by scoring: raise score.k or set rule.options.{option} <= {k}."
            )
    return checked


MAPPING_LEAVES = ("rule.options", "loss.options", "data.arithmetic", "experiment.full")


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for name, value in tree.items():
        key = prefix + name
        is_section = isinstance(value, Mapping) and key not in MAPPING_LEAVES
        flat.update(flatten(value, key + ".") if is_section else {key: value})
    return flat


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Reads a training config (YAML, or the defaults) and applies ``KEY=VALUE`` overrides.

    Paths in it (``student.path``, ``teacher.path``, ``data.source``, ``run.dir``) are used
    as written, relative to the current directory.
    """
    return validate(load_tree(Config, path, overrides, upgrade=upgrade_tree))


def config_from_dict(tree: Mapping[str, Any]) -> Config:
    """The :class:`Config` of a config tree (``Config.to_dict()``, e.g. a checkpoint's meta),
    checked as a YAML file would be; keys an older run lacks take their defaults."""
    return build_tree(Config, upgrade_tree(tree))


def dump_config(config: Config) -> str:
    """The config as YAML (what a run directory keeps as ``config.yaml``)."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
