"""The ``opd-jax`` command line: help, plan, convert, sample, stop signals, shipped configs."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from opd_jax import cli
from opd_jax.config import load_config
from opd_jax.models import load
from opd_jax.train.metrics import read_metrics

CONFIG_DIR = Path(__file__).parent.parent / "configs"
# configs of `opd-jax experiment` (it trains their models)
EXPERIMENTS = ("quickstart", "quickstart_long_recap")
CONFIGS = sorted(
    p
    for p in CONFIG_DIR.glob("*.yaml")
    if not p.stem.startswith("eval") and p.stem not in EXPERIMENTS
)


@pytest.fixture(scope="module")
def tiny_config(tiny_pair, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    config = root / "tiny.yaml"
    config.write_text(
        f"""
run: {{dir: {root / "run"}, progress: false, tensorboard: false, checkpoint_every: 1,
      compilation_cache: {root / "xla"}}}
student: {{path: {tiny_pair / "student"}}}
teacher: {{path: {tiny_pair / "teacher"}}}
data: {{data_dir: {root / "data"}, batch_size: 2, max_prompt_tokens: 96,
        arithmetic: {{train_size: 32, test_size: 4, test_long_size: 4, test_unseen_op_size: 4}}}}
sampling: {{max_new_tokens: 8}}
score: {{chunk_size: 8}}
train: {{steps: 2}}
"""
    )
    return config


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for command in ("train", "eval", "sample", "convert", "plan", "experiment", "profile"):
        assert command in out


def test_config_errors_exit_cleanly_with_the_nearest_key(tiny_config, capsys):
    assert cli.main(["train", str(tiny_config), "--set", "rule.knid=full"]) == 2
    assert "Did you mean 'rule.kind'" in capsys.readouterr().err


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path, capsys):
    config = tmp_path / "broken.yaml"
    config.write_text("run:\n  dir: runs/x\n  log_every: [1\ntrain: {steps: 2}\n")
    assert cli.main(["train", str(config)]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert f"{config}: invalid YAML, line 4" in err and "at line 3, column 14" in err


def test_values_as_users_type_them_are_read(tmp_path):
    config = tmp_path / "typed.yaml"
    config.write_text("optim: {learning_rate: 1e-4}\nrule: {kind: release, options: {eps: 1e-6}}\n")
    overrides = ["student.path=s", "teacher.path=t", "loss.kind=jsd", "loss.options.beta=5e-1"]
    typed = load_config(config, overrides)
    assert typed.optim.learning_rate == 1e-4 and typed.rule.options == {"eps": 1e-6}
    assert typed.loss.options == {"beta": 0.5}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_training_configs_are_valid(path):
    config = load_config(path)
    assert config.train.steps >= 1
    for spec in (config.student, config.teacher):
        assert "://" not in spec.path or spec.path.startswith("pkg://"), "hub ids are not allowed"


@pytest.mark.parametrize("full", [False, True])
def test_shipped_experiment_configs_are_valid(full):
    from opd_jax.experiment import load_experiment_config

    for name in ("quickstart",) if full else EXPERIMENTS:  # only the quickstart has a --full
        config = load_experiment_config(CONFIG_DIR / f"{name}.yaml", full=full)
        assert config.student.path.endswith("models/student")
        assert "release" in config.experiment.rules
        if name == "quickstart":
            assert "full" in config.experiment.rules
        if full:  # the complete table: every rule of docs/method.md's comparison, 3 seeds
            assert len(config.experiment.rules) >= 5 and len(config.experiment.seeds) >= 3
    # the long recap's experiment, stopped at the cut: the same config with one key set
    stop = ["sampling.stop_at_release=true"]
    config = load_experiment_config(CONFIG_DIR / "quickstart_long_recap.yaml", stop)
    assert config.sampling.stop_at_release and len(config.experiment.seeds) >= 3


def test_shipped_eval_config_parses_up_to_its_placeholder_checkpoints():
    from opd_jax.config import ConfigError
    from opd_jax.eval.run import load_eval_config

    with pytest.raises(ConfigError, match="models.base: no local checkpoint"):
        load_eval_config(CONFIG_DIR / "eval_example.yaml")


def test_plan_prints_memory_per_device(tiny_config, capsys):
    assert cli.main(["plan", str(tiny_config)]) == 0
    out = capsys.readouterr().out
    for row in ("student_params", "optimizer_state", "teacher_params", "step_temporaries", "total"):
        assert row in out


def test_convert_round_trips_hf_and_orbax_and_exports_a_trained_run(tiny_config, tmp_path):
    root = tiny_config.parent
    student = load_config(tiny_config).student.path
    assert cli.main(["convert", student, str(tmp_path / "orbax")]) == 0
    assert cli.main(["convert", str(tmp_path / "orbax"), str(tmp_path / "hf")]) == 0
    original, _ = load(student)
    back, _ = load(tmp_path / "hf")
    for a, b in zip(
        jax.tree.leaves(nnx.state(original)), jax.tree.leaves(nnx.state(back)), strict=True
    ):
        np.testing.assert_array_equal(a, b)

    assert cli.main(["train", str(tiny_config)]) == 0
    assert cli.main(["convert", str(root / "run"), str(tmp_path / "student_hf")]) == 0
    trained, _ = load(tmp_path / "student_hf")
    tokens = np.arange(6)[None]
    assert not np.allclose(trained(tokens), original(tokens))

    import torch
    import transformers

    torch_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "student_hf").eval()
    with torch.no_grad():
        want = torch_model(torch.as_tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(np.asarray(trained(tokens)), want, atol=1e-4)


def test_profile_measures_the_pair_by_position_and_sentence_without_training(
    tiny_config, tmp_path, capsys
):
    import json

    run = tmp_path / "profile"
    args = ["profile", str(tiny_config), "--batches", "2", "--set", f"run.dir={run}"]
    assert cli.main(args) == 0
    summary = json.loads((run / "profile.json").read_text())["summary"]
    assert len(summary["margin_by_position"]) == 20 and len(summary["margin_by_sentence"]) == 16
    assert summary["rows_by_sentence"][0] == 4  # two batches of two rollouts
    assert 0 <= summary["released_fraction"] <= 1
    assert sorted(p.name for p in (run / "plots").iterdir()) == [
        "margin_advantage.png",
        "margin_by_sentence.png",
    ]
    assert not (run / "checkpoints").exists()  # nothing trained, nothing saved
    assert "By sentence index" in capsys.readouterr().out


def test_sample_prints_completions(tiny_config, capsys):
    student = load_config(tiny_config).student.path
    args = ["sample", student, "--prompt", "What is 2 + 3?", "--max-new-tokens", "4"]
    assert cli.main(args) == 0
    assert "---" in capsys.readouterr().out


@pytest.mark.parametrize(
    "signum, status", [(signal.SIGTERM, cli.EXIT_STOPPED), (signal.SIGINT, cli.EXIT_INTERRUPTED)]
)
def test_a_stop_signal_saves_a_checkpoint_and_exits_with_its_status(
    tiny_config, tmp_path, signum, status, capsys
):
    """A launcher tells a preempted run (SIGTERM: 75, EX_TEMPFAIL) from a finished one (0);
    Ctrl-C (SIGINT) saves the same way and exits 130, with no traceback and no partial save
    left. While it trains, a second `opd-jax train` on its directory is refused. (In a fresh
    process, which also fills `run.compilation_cache`.)"""
    run = tmp_path / "run"
    args = ["train", str(tiny_config), "--set", f"run.dir={run}", "--set", "train.steps=500"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "opd_jax.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=os.environ | {"PYTHONUNBUFFERED": "1"},
    )
    deadline = time.time() + 240
    while not (run / "metrics.jsonl").exists() or not read_metrics(run):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
        time.sleep(0.5)
    # A second run on the same directory, while the first trains: refused, naming the holder.
    second = ["train", str(tiny_config), "--set", f"run.dir={run}", "--set", "train.steps=3"]
    assert cli.main(second) == cli.EXIT_USAGE
    assert f"is in use by `opd-jax train` (PID {proc.pid} on host" in capsys.readouterr().err
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == status, out
    assert "stopped: saved step" in out and "done:" not in out and "Traceback" not in out
    assert not list((run / "checkpoints").glob("*tmp*"))
    steps = [line["step"] for line in read_metrics(run)]
    assert 1 <= steps[-1] < 500
    saved = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert saved[-1] == steps[-1]
    assert load_config(run / "config.yaml").train.steps == 500
    assert any((tiny_config.parent / "xla").iterdir()), "nothing in run.compilation_cache"
