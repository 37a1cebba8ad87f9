"""``opd-jax``: the command line. Thin: parse, build, call.

opd-jax train CONFIG.yaml [--set KEY=VALUE ...]   run or resume an OPD run
opd-jax eval CONFIG.yaml [--set ...]              evaluate models on benchmark sets
opd-jax sample MODEL --prompt TEXT                 sample completions from a checkpoint
opd-jax convert SRC DST [--overwrite]              Hugging Face/GGUF <-> orbax
opd-jax plan CONFIG.yaml [--set ...]               memory per device, before allocating
opd-jax experiment CONFIG.yaml [--full] [--set ...] the offline strong-to-weak experiment
opd-jax profile CONFIG.yaml [--batches N] [--ideal] [--set ...]  a pair's margin profiles
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from opd_jax.compilation_cache import use_compilation_cache
from opd_jax.config import Config, all_keys, load_config
from opd_jax.distributed import initialize_from_env, is_primary
from opd_jax.errors import InputError
from opd_jax.heap import keep_freed_memory

# Exit statuses: 0 done (or nothing to do); 1 the run failed (a non-finite step, a failed
# write, no readable checkpoint, a bug; the last checkpoint is intact); 2 bad input (config,
# paths, data, a refused change on resume, a run directory in use); 75 (EX_TEMPFAIL) stopped
# early by SIGTERM, after saving; 130 stopped by Ctrl-C (SIGINT: after saving the step in
# flight; pressed twice, at once). After 75 or 130, run the same command again to resume.
EXIT_FAILED, EXIT_USAGE, EXIT_STOPPED, EXIT_INTERRUPTED = 1, 2, 75, 130
CONFIG_HELP = "a YAML config (e.g. configs/smollm2_layers.yaml)"
SET_HELP = "override a config key, e.g. --set rule.kind=full --set train.steps=10"


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help=CONFIG_HELP)
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP
    )


def _train(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    use_compilation_cache(config.run.compilation_cache)
    initialize_from_env()
    from opd_jax.train.checkpoint import CheckpointRestoreError
    from opd_jax.train.loop import RunFailed, Status, train

    try:
        result = train(config)
    except FileNotFoundError:
        raise  # Bad input (a model or data path): main reports it.
    except (RunFailed, CheckpointRestoreError, OSError) as error:
        return _error(args, error, EXIT_FAILED)
    if result.status is Status.STOPPED:  # The loop said where it stopped and how to resume.
        return EXIT_INTERRUPTED if result.interrupted else EXIT_STOPPED
    if not is_primary():
        return 0
    if result.status is Status.FINISHED:
        loss = result.metrics["loss"]
        skipped = f", {result.skipped_steps} skipped (not finite)" if result.skipped_steps else ""
        print(f"done: step {result.step}, loss {loss:.4f}{skipped}, run dir {config.run.dir}")
    else:
        print(
            f"{config.run.dir} is already at step {result.step} (train.steps="
            f"{config.train.steps}): nothing to do ({continue_hint(config)})."
        )
    return 0


def continue_hint(config: Config) -> str:
    """How to continue a finished run: more steps, on the same learning-rate schedule."""
    optim = config.optim
    if optim.schedule == "cosine" and not optim.decay_steps:
        return (
            f"to continue, raise train.steps and set optim.decay_steps={config.train.steps} "
            "to keep the cosine schedule it was trained on; or choose a new run.dir"
        )
    return "raise train.steps to continue, or choose a new run.dir"


def _eval(args: argparse.Namespace) -> int:
    initialize_from_env()
    from opd_jax.eval.run import evaluate_config

    evaluate_config(args.config, args.overrides)
    return 0


def _sample(args: argparse.Namespace) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from opd_jax import models, sampling

    model, tokenizer = models.load(args.model, jnp.float32)
    tokens, mask = models.encode_prompts(
        tokenizer,
        args.prompt,
        args.max_prompt_tokens,
        chat_template=not args.raw,
        length_key="--max-prompt-tokens",
    )
    method = sampling.Greedy() if args.temperature == 0 else sampling.Temperature(args.temperature)
    result = sampling.sample(
        model,
        jnp.asarray(tokens),
        jnp.asarray(mask),
        key=jax.random.key(args.seed),
        max_new_tokens=args.max_new_tokens,
        method=method,
        eos_ids=models.eos_ids(tokenizer, model.config.eos_token_id),
        pad_id=models.pad_id(tokenizer),
    )
    p = tokens.shape[1]
    for row, keep in zip(
        np.asarray(result.tokens)[:, p:], np.asarray(result.response_mask)[:, p:], strict=True
    ):
        print(tokenizer.decode(row[keep.astype(bool)].tolist(), skip_special_tokens=True))
        print("---")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from opd_jax.convert import convert
    from opd_jax.train.checkpoint import CheckpointRestoreError

    try:
        convert(args.src, args.dst, overwrite=args.overwrite)
    except CheckpointRestoreError as error:
        return _error(args, error, EXIT_FAILED)
    print(f"wrote {args.dst}")
    return 0


def _experiment(args: argparse.Namespace) -> int:
    from opd_jax.experiment import load_experiment_config, run_experiment

    config = load_experiment_config(args.config, args.overrides, full=args.full)
    use_compilation_cache(config.run.compilation_cache)
    return 0 if run_experiment(config) is not None else EXIT_STOPPED


def _profile(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    use_compilation_cache(config.run.compilation_cache)
    from opd_jax.experiment.margin_profile import profile

    profile(config, args.batches, label=os.path.basename(args.config), ideal=args.ideal)
    return 0


def _plan(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    initialize_from_env()
    from opd_jax.memory_plan import format_plan, plan

    report = format_plan(plan(config))
    if is_primary():
        print(report)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="opd-jax",
        description="On-policy distillation of language models in JAX, with the release rule.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser(
        "train",
        help="run (or resume) on-policy distillation from a YAML config",
        description="Run on-policy distillation from a YAML config. Running again with the "
        "same run.dir resumes from its last good checkpoint. Keys: " + ", ".join(all_keys(Config)),
    )
    _add_config(train)
    train.set_defaults(run=_train)

    evaluate = commands.add_parser(
        "eval", help="evaluate models on math benchmarks (avg@k, pass@k, a table)"
    )
    _add_config(evaluate)
    evaluate.set_defaults(run=_eval)

    sample = commands.add_parser("sample", help="sample completions from a local checkpoint")
    sample.add_argument("model", help="a Hugging Face directory or .gguf file")
    sample.add_argument("--prompt", action="append", required=True, help="a prompt (repeatable)")
    sample.add_argument("--max-new-tokens", type=int, default=64)
    sample.add_argument("--max-prompt-tokens", type=int, default=128)
    sample.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--raw", action="store_true", help="no chat template")
    sample.set_defaults(run=_sample)

    convert = commands.add_parser(
        "convert",
        help="convert checkpoints: HF/GGUF -> orbax, or a run directory -> HF",
        description="SRC a Hugging Face directory or .gguf file: DST becomes an orbax "
        "checkpoint of its parameters (and back). SRC a run directory: its student at the last "
        "good checkpoint is written to DST as a Hugging Face directory.",
    )
    convert.add_argument("src")
    convert.add_argument("dst", help="a new (or empty) directory; see --overwrite")
    convert.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a non-empty DST (never the source, a run's models or a run in use)",
    )
    convert.set_defaults(run=_convert)

    plan = commands.add_parser(
        "plan", help="parameter, optimizer and activation memory per device for the mesh"
    )
    _add_config(plan)
    plan.set_defaults(run=_plan)

    experiment = commands.add_parser(
        "experiment",
        help="the offline strong-to-weak experiment: models, OPD per rule and seed, a table",
        description="Train a teacher and a weaker student on the built-in task from scratch, "
        "run OPD of the student under each rule of experiment.rules and each seed of "
        "experiment.seeds, evaluate in and out of domain, and write the table, diagnostics and "
        "plots to run.dir. Running again resumes; finished stages are skipped.",
    )
    _add_config(experiment)
    experiment.add_argument(
        "--full", action="store_true", help="apply the config's experiment.full overrides first"
    )
    experiment.set_defaults(run=_experiment)

    measure = commands.add_parser(
        "profile",
        help="a student and teacher's margin and advantage by position and sentence (no training)",
        description="Score batches of the student's rollouts with the teacher, as a training "
        "step would, without updating: the teacher's margin over the student's top-K and the "
        "sampled advantage by relative position and by sentence index, the release rule's "
        "firing rate; writes profile.json/md and plots to run.dir.",
    )
    _add_config(measure)
    measure.add_argument("--batches", type=int, default=8, help="batches of data.batch_size")
    measure.add_argument(
        "--ideal",
        action="store_true",
        help="the arithmetic task only: also the generator's own next-token distribution, "
        "the ideal teacher, on the same rollouts (opd_jax.experiment.ideal_teacher)",
    )
    measure.set_defaults(run=_profile)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs a command; returns its exit status (see ``EXIT_*``)."""
    args = build_parser().parse_args(argv)
    keep_freed_memory()  # before JAX starts: XLA:CPU's step buffers reused, not faulted anew
    try:
        return args.run(args)
    except (InputError, FileNotFoundError, UnicodeDecodeError) as error:
        return _error(args, error, EXIT_USAGE)
    except KeyboardInterrupt:
        print(
            f"opd-jax {args.command}: interrupted; what was saved before is intact (a run: "
            "run the same command again to resume).",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    except Exception as error:  # Not bad input: a failure or a bug, said as such.
        return _error(args, error, EXIT_FAILED, bug=True)


def _error(args: argparse.Namespace, error: Exception, status: int, bug: bool = False) -> int:
    """Prints ``error`` as the command's error (or re-raises it, ``OPD_JAX_TRACEBACK=1``)."""
    if os.environ.get("OPD_JAX_TRACEBACK"):
        raise error
    if bug:
        message = (
            f"failed: {type(error).__name__}: {error} (not a problem with the input as far as "
            "opd_jax can tell: rerun with OPD_JAX_TRACEBACK=1 and report the traceback)"
        )
    else:
        message = f"error: {error}"
    print(f"opd-jax {args.command}: {message}", file=sys.stderr)
    if not bug:
        print("(set OPD_JAX_TRACEBACK=1 to see the traceback)", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
