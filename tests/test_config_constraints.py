"""Every config value is checked where it is declared, before any model loads: ranges, NaN,
empty paths, mesh sizes, repeated YAML keys and sections of the wrong kind, each a one-line
message naming the key, the value and what is allowed (exit 2 from the command line)."""

import pytest
from test_faults import cli_train, no_models
from test_train import overrides

from opd_jax import cli
from opd_jax.config import ConfigError, load_config


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.learning_rate=.nan", "optim.learning_rate must be a finite number, got nan"),
        ("sampling.temperature=.nan", "sampling.temperature must be a finite number, got nan"),
        ("sampling.temperature=.inf", "sampling.temperature must be a finite number, got inf"),
        ("optim.b1=5", r"optim.b1 must be in \[0, 1\), got 5"),
        ("optim.b2=-0.1", r"optim.b2 must be in \[0, 1\), got -0.1"),
        ("loss.options.beta=0.5", "loss 'sampled_reverse_kl' has no option 'beta'"),
        ("optim.clip_norm=-1", r"optim.clip_norm must be >= 0 \(global-norm clipping; 0 disables"),
        ("optim.weight_decay=-0.5", "optim.weight_decay must be >= 0, got -0.5"),
        ("run.dir=''", "run.dir must not be empty"),
        ("data.data_dir=''", "data.data_dir must not be empty"),
        ("mesh.data=0", "mesh.data must be >= 1, or -1 for the remaining devices; got 0"),
        ("mesh.tensor=-2", r"mesh.tensor must be >= -1 \(-1: the remaining devices\), got -2"),
        ("mesh.data=-1", "at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1"),
        ("train.steps=true", "train.steps must be int, got True"),
        ("train.steps=2.5", "train.steps must be int, got 2.5"),
        ("run.keep_checkpoints=0", "run.keep_checkpoints must be >= 1, got 0"),
        ("experiment.eval_k=0", "experiment.eval_k must be >= 1, got 0"),
        ("experiment.teacher.optim.b1=1", r"experiment.teacher.optim.b1 must be in \[0, 1\)"),
    ],
)
def test_values_out_of_their_declared_range_are_refused(tiny_pair, tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides(tiny_pair, tmp_path, override))


def test_a_range_error_is_one_line_and_exit_2_before_any_model_loads(
    tiny_pair, tmp_path, monkeypatch, capsys
):
    no_models(monkeypatch)
    assert cli_train(tiny_pair, tmp_path / "run", "mesh.data=0") == cli.EXIT_USAGE
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("opd-jax train: error: mesh.data must be >= 1")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "run:\n  dir: a\n  dir: b\n",
            r"line 3, column 3: the key 'dir' appears twice \(first at line 2\)",
        ),
        ("seed: 1\nseed: 2\n", "the key 'seed' appears twice"),
        ("run: 0\n", "run must be a mapping, got 0"),
        ("optim: [1, 2]\n", r"optim must be a mapping, got \[1, 2\]"),
        ("sampling: fast\n", "sampling must be a mapping, got 'fast'"),
    ],
)
def test_malformed_yaml_is_an_error_not_a_guess(tmp_path, text, message):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_an_empty_section_takes_its_defaults(tiny_pair, tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("run:\noptim:\n")
    config = load_config(path, overrides(tiny_pair, tmp_path / "run"))
    assert config.optim.learning_rate == 0.01 and config.run.keep_checkpoints == 3


def test_mesh_sizes_that_do_not_match_the_devices_name_the_fix(tiny_pair, tmp_path, capsys):
    assert cli_train(tiny_pair, tmp_path / "run", "mesh.data=3", "mesh.fsdp=1") == 2
    err = capsys.readouterr().err
    assert "does not use the 1 training devices" in err and "Traceback" not in err
