"""Run configuration: the typed sections of a run, their checks, and what a resume compares.

``load_config("configs/smollm2_layers.yaml", ["rule.kind=full", "train.steps=10"])`` returns a
:class:`Config`. Every key is checked before any compute: an unknown or mistyped key fails
with the nearest valid key, a value of the wrong type names the key and the expected type
(:mod:`opd_jax.typed_yaml`). Rule options (``rule.options.*``) are checked against the chosen
rule's options and their defaults' types.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from opd_jax.core import LOSS_KINDS, REDUCTIONS, RULES, rule_options
from opd_jax.typed_yaml import ConfigError, all_keys, coerce, load_tree  # noqa: F401 (re-exported)


@dataclasses.dataclass
class RunConfig:
    dir: str = "runs/default"  # checkpoints, metrics.jsonl, TensorBoard events, plots, tables
    log_every: int = 1  # steps between metric lines
    checkpoint_every: int = 50  # steps between checkpoints (and one at the end)
    keep_checkpoints: int = 3  # the last k are kept
    async_checkpoint: bool = True  # write checkpoints in the background where orbax can
    tensorboard: bool = True  # also write TensorBoard event files
    progress: bool = True  # a progress bar on the terminal
    # XLA's persistent compilation cache for the command line ("": off): a rerun or a resume
    # loads the compiled step instead of compiling it again
    compilation_cache: str = "~/.cache/opd_jax/xla"
    # resume even though keys that change the training trajectory differ from the checkpoint's
    # (warned, and recorded in the checkpoints' meta as config_changes)
    allow_changes: bool = False


@dataclasses.dataclass
class ModelSpec:
    path: str = ""  # a local Hugging Face directory or .gguf file (never a hub id)
    dtype: str = "float32"  # float32 or bfloat16 (parameters and compute)
    layers: list[int] = dataclasses.field(default_factory=list)  # keep only these layers ([]: all)


@dataclasses.dataclass
class DataConfig:
    source: str = "arithmetic"  # "arithmetic" (built-in task) or a JSONL/Parquet file or folder
    split: str = "train"
    data_dir: str = "runs/data"  # where TFDS builds are written
    batch_size: int = 8  # prompts per optimizer step, over all processes
    max_prompt_tokens: int = 96  # prompts are left-padded or truncated (from the left) to this
    chat_template: bool = True  # wrap prompts in the tokenizer's chat template
    system_prompt: str = ""
    arithmetic: dict[str, Any] = dataclasses.field(default_factory=dict)  # ArithmeticConfig fields


@dataclasses.dataclass
class SamplingConfig:
    max_new_tokens: int = 64  # response budget N
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 disables
    top_p: float = 1.0  # 1 disables
    n: int = 1  # samples per prompt, sharing its prefill: a step has data.batch_size * n rows
    compact_every: int = 16  # tokens between drops of finished rows (0: never drop them)


@dataclasses.dataclass
class ScoreConfig:
    k: int = 16  # top-K kept per position (margins, entropy, TA-OPD)
    chunk_size: int = 1024  # positions whose [chunk, V] logits are alive at once


@dataclasses.dataclass
class SegmentsConfig:
    kind: str = "sentence"  # sentence (NLTK Punkt), fixed, token
    tokens: int = 32  # block size of kind=fixed


@dataclasses.dataclass
class RuleConfig:
    kind: str = "release"  # release or a baseline of docs/method.md §6
    options: dict[str, Any] = dataclasses.field(default_factory=dict)  # the rule's own options


@dataclasses.dataclass
class LossConfig:
    kind: str = "sampled_reverse_kl"
    reduction: str = "token_mean"
    beta: float = 0.5  # jsd only


@dataclasses.dataclass
class OptimConfig:
    learning_rate: float = 1e-5
    schedule: str = "cosine"  # cosine (decays to 10%) or constant, after linear warmup
    warmup_steps: int = 0
    # the cosine's horizon: it reaches 10% at this step and stays there (0: train.steps); fix it
    # to raise train.steps of a run without changing its schedule
    decay_steps: int = 0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    clip_norm: float = 1.0  # global-norm clipping; 0 disables
    accumulate: int = 1  # micro-batches per optimizer step (gradient accumulation)


@dataclasses.dataclass
class MeshConfig:
    data: int = 1
    fsdp: int = -1  # -1: all remaining devices
    tensor: int = 1
    # devices set apart for train.async_rollouts' sampling (the last ones; rows over all of
    # them, the student's weights copied there each step); 0: rollouts on the training mesh
    rollout: int = 0


@dataclasses.dataclass
class TrainConfig:
    steps: int = 100  # optimizer steps in the run
    remat: bool = False  # recompute the student's blocks in the backward pass (long rollouts)
    # the step's attention kernel (opd_jax.models.attention): auto | xla | cudnn | flash; auto:
    # cudnn on a CUDA GPU in bfloat16, xla on other GPUs, flash on CPU and TPU
    attention: str = "auto"
    # xla: queries attended at a time (0: all; memory O(chunk*S)); flash: its block (0: 512)
    attention_chunk: int = 0
    # a step whose loss, gradient or updated parameters are not finite: stop (the run ends
    # before saving it) or skip (parameters and optimizer state stay as they were; counted)
    on_nonfinite: str = "stop"
    # one-step off-policy rollouts: step t+1's rollouts are sampled from the parameters of
    # step t while step t's update runs (off: every step samples from its own parameters)
    async_rollouts: bool = False


@dataclasses.dataclass
class ModelShape:
    """The shape of a Qwen3-style decoder made from scratch (tied embeddings)."""

    layers: int = 2
    hidden: int = 64
    heads: int = 2
    kv_heads: int = 1
    head_dim: int = 32
    intermediate: int = 192


@dataclasses.dataclass
class SFTConfig:
    """Supervised fine-tuning of one model of the experiment on the task's solutions."""

    shape: ModelShape = dataclasses.field(default_factory=ModelShape)
    steps: int = 300
    batch_size: int = 64
    learning_rate: float = 3e-3
    warmup_steps: int = 50


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
    vocab_size: int = 300  # BPE tokenizer trained on the task (digits split)
    tokenizer_examples: int = 2000  # train examples the tokenizer is trained on
    teacher: SFTConfig = dataclasses.field(default_factory=SFTConfig)
    student: SFTConfig = dataclasses.field(default_factory=SFTConfig)
    curve_every: int = 10  # OPD steps between accuracy points (accuracy against step)
    curve_problems: int = 64  # in-domain problems of each accuracy point (eval_k samples each)
    eval_splits: list[str] = dataclasses.field(
        default_factory=lambda: ["test", "test_long", "test_unseen_op"]
    )  # arithmetic splits of the final table: in-domain first, then out-of-domain
    eval_problems: int = 0  # problems per split (0 = all)
    eval_k: int = 4  # samples per problem
    eval_temperature: float = 1.0  # 0 = greedy
    eval_max_new_tokens: int = 128  # room for test_long's longer solutions
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
    "rule.kind": tuple(RULES),
    "loss.kind": LOSS_KINDS,
    "loss.reduction": REDUCTIONS,
    "optim.schedule": ("cosine", "constant"),
    "student.dtype": ("float32", "bfloat16"),
    "teacher.dtype": ("float32", "bfloat16"),
    "train.attention": ("auto", "xla", "cudnn", "flash"),
    "train.on_nonfinite": ("stop", "skip"),
}
POSITIVE = (
    "train.steps", "data.batch_size", "data.max_prompt_tokens", "sampling.max_new_tokens",
    "score.k", "score.chunk_size", "segments.tokens", "optim.accumulate", "run.log_every",
    "run.checkpoint_every", "run.keep_checkpoints",
)  # fmt: skip
NON_NEGATIVE = {  # key: what 0 means
    "train.attention_chunk": "0 attends all queries at once",
    "optim.warmup_steps": "0: no warmup",
    "optim.decay_steps": "0: train.steps",
    "optim.weight_decay": "0: none",
    "optim.learning_rate": "0: no update",
    "mesh.rollout": "0: rollouts on the training devices",
}


def validate(config: Config) -> Config:
    """Cross-field checks: choices, sizes and ranges, the data section, and the chosen rule's
    options (returned with floats coerced, e.g. ``eps: 1e-8`` read as a string by YAML)."""
    flat = _flatten(config.to_dict())
    for key, choices in CHOICES.items():
        if flat[key] not in choices:
            near = difflib.get_close_matches(str(flat[key]), choices, n=1)
            hint = f" Did you mean {near[0]!r}?" if near else ""
            raise ConfigError(f"{key}={flat[key]!r} is not one of {list(choices)}.{hint}")
    for key in POSITIVE:
        if flat[key] < 1:
            raise ConfigError(f"{key} must be >= 1, got {flat[key]}.")
    for key, zero in NON_NEGATIVE.items():
        if flat[key] < 0:
            raise ConfigError(f"{key} must be >= 0 ({zero}), got {flat[key]}.")
    check_sampling(config.sampling)
    if config.mesh.rollout and not config.train.async_rollouts:
        raise ConfigError(
            f"mesh.rollout={config.mesh.rollout} sets devices apart for asynchronous "
            "rollouts: set train.async_rollouts=true, or mesh.rollout=0."
        )
    options = _checked_rule_options(config.rule.kind, config.rule.options, config.score.k)
    if config.train.attention == "cudnn" and config.train.attention_chunk:
        raise ConfigError(
            "train.attention_chunk applies to train.attention xla and flash (cuDNN's fused "
            "attention has its own blocks): set one of them."
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
    if config.data.batch_size % config.optim.accumulate:
        raise ConfigError(
            f"data.batch_size={config.data.batch_size} must be a multiple of "
            f"optim.accumulate={config.optim.accumulate}."
        )
    return dataclasses.replace(config, rule=dataclasses.replace(config.rule, options=options))


def check_sampling(c: SamplingConfig, section: str = "sampling") -> None:
    """``max_new_tokens >= 1``, ``temperature >= 0``, ``top_k >= 0``, ``0 < top_p <= 1``,
    not both top-k and top-p, ``n >= 1``, ``compact_every >= 0``."""
    if c.max_new_tokens < 1:
        raise ConfigError(f"{section}.max_new_tokens must be >= 1, got {c.max_new_tokens}.")
    if c.temperature < 0:
        raise ConfigError(f"{section}.temperature must be >= 0 (0 is greedy), got {c.temperature}.")
    if c.top_k < 0:
        raise ConfigError(f"{section}.top_k must be >= 0 (0 disables it), got {c.top_k}.")
    if not 0 < c.top_p <= 1:
        raise ConfigError(f"{section}.top_p must be in (0, 1] (1 disables it), got {c.top_p}.")
    if c.top_k > 0 and c.top_p < 1:
        raise ConfigError(f"set {section}.top_k or {section}.top_p, not both.")
    if c.n < 1:
        raise ConfigError(f"{section}.n (samples per prompt) must be >= 1, got {c.n}.")
    if c.compact_every < 0:
        raise ConfigError(
            f"{section}.compact_every must be >= 0 (0 never drops finished rows), "
            f"got {c.compact_every}."
        )


def _checked_rule_options(kind: str, options: Mapping[str, Any], k: int) -> dict[str, Any]:
    """The rule's ``options``, each known to the rule and of its default's type (ints and
    numeric strings accepted for floats), and top-K sizes within ``score.k``."""
    valid = rule_options(kind)
    checked = {}
    for option, value in options.items():
        if option not in valid:
            near = difflib.get_close_matches(option, list(valid), n=1)
            hint = f" Did you mean 'rule.options.{near[0]}'?" if near else ""
            raise ConfigError(
                f"rule {kind!r} has no option {option!r}; its options are {sorted(valid)}.{hint}"
            )
        default = valid[option]
        hint = Any if default is None else type(default)
        checked[option] = coerce(f"rule.options.{option}", value, hint)
    for option in ("k", "margin_k"):
        value = {**valid, **checked}.get(option)
        if value is not None and value > k:
            raise ConfigError(
                f"rule.options.{option}={value} exceeds score.k={k}, the top-K kept "
                f"by scoring: raise score.k or set rule.options.{option} <= {k}."
            )
    return checked


MAPPING_LEAVES = ("rule.options", "data.arithmetic", "experiment.full")


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for name, value in tree.items():
        key = prefix + name
        is_section = isinstance(value, Mapping) and key not in MAPPING_LEAVES
        flat.update(_flatten(value, key + ".") if is_section else {key: value})
    return flat


# Keys a resumed run may change: they leave what each step computes as it was (up to float
# rounding for the kernels and micro-batches) or only say where and how often it is recorded.
FREE_SECTIONS = ("run.", "mesh.", "experiment.")
FREE_KEYS = (
    "train.steps", "train.attention", "train.attention_chunk", "train.remat",
    "train.on_nonfinite", "score.chunk_size", "optim.accumulate", "data.data_dir",
    "sampling.compact_every",
)  # fmt: skip
HORIZON = "optim.decay_steps"


def trajectory(tree: Mapping[str, Any]) -> dict[str, Any]:
    """The values of a config tree (``Config.to_dict()``, or an older run's, missing keys
    taking their defaults) that decide the training trajectory: every key but the free ones;
    the cosine's horizon stands for ``train.steps`` (``None`` for a constant schedule), and
    ``rule.options`` holds the rule's defaults too."""
    flat = _flatten(Config().to_dict()) | _flatten(tree)
    kept = {
        key: value
        for key, value in flat.items()
        if key not in FREE_KEYS and not key.startswith(FREE_SECTIONS)
    }
    cosine = flat["optim.schedule"] == "cosine"
    kept[HORIZON] = (flat[HORIZON] or flat["train.steps"]) if cosine else None
    if flat["rule.kind"] in RULES:
        kept["rule.options"] = rule_options(flat["rule.kind"]) | dict(flat["rule.options"])
    return kept


def trajectory_changes(
    old: Mapping[str, Any], new: Mapping[str, Any]
) -> dict[str, tuple[Any, Any]]:
    """``{key: (old, new)}`` of the trajectory values (:func:`trajectory`) that differ."""
    before, after = trajectory(old), trajectory(json.loads(json.dumps(new)))
    return {
        key: (before.get(key), value) for key, value in after.items() if before.get(key) != value
    }


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Reads a training config (YAML, or the defaults) and applies ``KEY=VALUE`` overrides.

    Paths in it (``student.path``, ``teacher.path``, ``data.source``, ``run.dir``) are used
    as written, relative to the current directory.
    """
    return validate(load_tree(Config, path, overrides))


def dump_config(config: Config) -> str:
    """The config as YAML (what a run directory keeps as ``config.yaml``)."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
