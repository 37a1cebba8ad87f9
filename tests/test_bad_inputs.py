"""Bad input found on disk or in a config, before or during a run: each case ends in a clear
error (exit 2, one line naming the file or key and the fix) or just works."""

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from opd_jax import cli
from opd_jax.data.loader import DataBuildError, build_dir, load_source
from opd_jax.data.prompts import PromptFileError, read_prompt_file
from opd_jax.models import encode_prompts, load_tokenizer
from opd_jax.run_lock import hold
from opd_jax.train.metrics import METRICS_FILE, MetricsFileError, MetricsWriter, read_metrics

RUN_NAME = "run dir ü 日本"  # spaces and non-ASCII: must just work


def _config(root: Path, pair: Path, **sections: dict) -> Path:
    """A tiny OPD config under ``root`` (strings as JSON, which YAML reads as they are)."""
    base = {
        "run": {
            "dir": str(root / RUN_NAME),
            "progress": False,
            "tensorboard": False,
            "compilation_cache": str(root / "xla"),
        },
        "student": {"path": str(pair / "student")},
        "teacher": {"path": str(pair / "teacher")},
        "data": {
            "data_dir": str(root / "data"),
            "batch_size": 2,
            "max_prompt_tokens": 96,
            "arithmetic": {
                "train_size": 8,
                "test_size": 2,
                "test_long_size": 2,
                "test_unseen_op_size": 2,
            },
        },
        "sampling": {"max_new_tokens": 4, "temperature": 0},
        "score": {"chunk_size": 4},
        "train": {"steps": 1},
    }
    for name, values in sections.items():
        base[name] = base.get(name, {}) | values
    path = root / "config.yaml"
    path.write_text(json.dumps(base))
    return path


@pytest.fixture(scope="module")
def trained_run(tiny_pair, tmp_path_factory):
    """One greedy OPD step (``sampling.temperature: 0``) in a run dir named with spaces and
    non-ASCII characters; returns the config."""
    config = _config(tmp_path_factory.mktemp("bad inputs"), tiny_pair)
    assert cli.main(["train", str(config)]) == 0
    return config


def _fail(args: list[str], capsys) -> str:
    """The one-line error of a command that must exit with the bad-input status 2."""
    assert cli.main(args) == cli.EXIT_USAGE
    return capsys.readouterr().err.splitlines()[0]


# --- Run directories -------------------------------------------------------------------------


def test_a_run_dir_named_with_spaces_and_non_ascii_trains_with_greedy_rollouts(trained_run):
    run = trained_run.parent / RUN_NAME
    assert [r["step"] for r in read_metrics(run)] == [1]
    assert (run / "checkpoints" / "1").is_dir() and (run / "config.yaml").is_file()


def test_a_file_where_the_run_dir_should_be_is_bad_input(tiny_pair, tmp_path, capsys):
    config = _config(tmp_path, tiny_pair)
    (tmp_path / RUN_NAME).write_text("a file, not a directory")
    err = _fail(["train", str(config)], capsys)
    assert str(tmp_path / RUN_NAME) in err
    assert (tmp_path / RUN_NAME).read_text() == "a file, not a directory"


def test_a_read_only_run_dir_is_bad_input(tiny_pair, tmp_path, capsys, monkeypatch):
    config = _config(tmp_path, tiny_pair)
    run = tmp_path / RUN_NAME
    run.mkdir()
    run.chmod(0o555)
    if os.access(run, os.W_OK):  # root: the mode does not stop writes, so the kernel's refusal
        from opd_jax.train import preflight  # of a file in it is made here

        def refused(*args, **kwargs):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

        monkeypatch.setattr(preflight.tempfile, "TemporaryFile", refused)
    try:
        err = _fail(["train", str(config)], capsys)
        assert str(run) in err and "not writable" in err
    finally:
        run.chmod(0o755)


def test_a_run_in_use_can_be_exported_and_sampled(trained_run, tmp_path, capsys):
    """Readers take no lock: ``convert`` of a run still training and ``sample`` work."""
    run = trained_run.parent / RUN_NAME
    with hold(run, "opd-jax train"):
        assert cli.main(["convert", str(run), str(tmp_path / "student")]) == 0
        args = ["sample", str(tmp_path / "student"), "--prompt", "2 + 3?", "--max-new-tokens", "2"]
        assert cli.main(args) == 0
    assert "---" in capsys.readouterr().out


# --- Config values known only with the model -------------------------------------------------


@pytest.mark.parametrize("key", ["sampling.top_k", "score.k"])
def test_a_top_k_above_the_vocabulary_names_the_key_value_and_size(
    key, tiny_pair, tmp_path, capsys
):
    config = _config(tmp_path, tiny_pair)
    err = _fail(["train", str(config), "--set", f"{key}=1000"], capsys)
    assert f"{key}=1000 exceeds the vocabulary of 320 tokens" in err
    assert not (tmp_path / RUN_NAME / "checkpoints" / "1").exists()


def test_temperature_zero_samples_greedily(tiny_pair, capsys):
    args = ["sample", str(tiny_pair / "student"), "--prompt", "12 + 30?", "--max-new-tokens", "4"]
    outs = []
    for seed in ("0", "1"):
        assert cli.main([*args, "--temperature", "0", "--seed", seed]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1]  # greedy: no randomness


def test_an_over_long_prompt_is_cut_from_the_left_with_a_warning(tiny_pair):
    tokenizer = load_tokenizer(tiny_pair / "student")
    prompt = "The quick brown fox jumps over the lazy dog. " * 8
    full, _ = encode_prompts(tokenizer, [prompt], 1000, chat_template=False)
    with pytest.warns(UserWarning, match="cut to data.max_prompt_tokens=8"):
        tokens, mask = encode_prompts(tokenizer, [prompt], 8, chat_template=False)
    np.testing.assert_array_equal(tokens[0], full[0, -8:])  # its end is kept
    assert mask.all()


# --- Files read mid-run: prompts, metrics, data builds ----------------------------------------


def test_a_non_utf8_prompt_file_names_the_file_and_line(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(b'{"prompt": "fine"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(PromptFileError, match="not UTF-8") as error:
        list(read_prompt_file(path))
    assert str(error.value).startswith(f"{path}, line 2: not UTF-8 (byte 16 of the line is 0xe9)")


def test_a_byte_order_mark_is_read_as_utf8(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "fine"}\n')
    assert [r["prompt"] for _, r in read_prompt_file(path)] == ["fine"]


def test_a_garbage_metrics_line_names_the_file_line_and_fix(tmp_path):
    (tmp_path / METRICS_FILE).write_text('{"step": 1, "loss": 0.5}\nnot json\n{"step": 2}\n')
    with pytest.raises(MetricsFileError, match="delete that line") as error:
        read_metrics(tmp_path)
    assert str(error.value).startswith(f"{tmp_path / METRICS_FILE}, line 2: not a metrics record")
    with pytest.raises(MetricsFileError, match="line 2"), MetricsWriter(tmp_path) as writer:
        writer.truncate_after(2)  # a resume meets it too, and leaves the file as it was
    assert (tmp_path / METRICS_FILE).read_text().count("\n") == 3


def test_a_torn_last_metrics_line_is_dropped_on_resume_with_a_warning(tmp_path):
    (tmp_path / METRICS_FILE).write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]  # a reader skips it
    with MetricsWriter(tmp_path, (), enabled=True) as writer:
        with pytest.warns(RuntimeWarning, match="dropped its last line, cut short by a crash"):
            writer.truncate_after(2)
        writer.write(3, {"loss": 0.1})
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]


def _damage(directory: Path, what: str) -> None:
    if what == "dataset_info.json":
        (directory / "dataset_info.json").write_text('{"name": "opd_prompt')
        return
    (shard,) = directory.glob("*.array_record-*")
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2] if what == "truncated shard" else b"\0" * 100)


@pytest.mark.parametrize("what", ["dataset_info.json", "truncated shard", "garbled shard"])
def test_a_damaged_data_build_names_the_directory_to_delete(tmp_path, what):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    data_dir = tmp_path / "data"
    assert len(load_source(prompts, "prompts", data_dir)) == 2
    directory = build_dir(prompts, data_dir)
    _damage(directory, what)
    with pytest.raises(DataBuildError, match=f"delete {directory} and run again"):
        load_source(prompts, "prompts", data_dir)
    shutil.rmtree(directory)
    rebuilt = load_source(prompts, "prompts", data_dir)
    assert sorted(rebuilt[i]["prompt"] for i in range(2)) == [b"a", b"b"]


# --- Checkpoints ------------------------------------------------------------------------------


def _sample(model: Path) -> list[str]:
    return ["sample", str(model), "--prompt", "hi", "--max-new-tokens", "2"]


def test_a_hf_directory_without_config_json_is_bad_input(tiny_pair, tmp_path, capsys):
    model = shutil.copytree(tiny_pair / "student", tmp_path / "student")
    (model / "config.json").unlink()
    assert f"No config.json in {model}" in _fail(_sample(model), capsys)


def test_a_config_json_that_disagrees_with_the_weights_names_the_directory(
    tiny_pair, tmp_path, capsys
):
    model = shutil.copytree(tiny_pair / "student", tmp_path / "student")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(config | {"hidden_size": 64}))
    err = _fail(_sample(model), capsys)
    assert err.startswith(f"opd-jax sample: error: {model}: ") and "disagree" in err


def test_a_truncated_config_json_names_the_file(tiny_pair, tmp_path, capsys):
    model = shutil.copytree(tiny_pair / "student", tmp_path / "student")
    text = (model / "config.json").read_text()
    (model / "config.json").write_text(text[: len(text) // 2])
    assert f"{model / 'config.json'} is not valid JSON" in _fail(_sample(model), capsys)


def test_a_truncated_safetensors_file_names_the_file(tiny_pair, tmp_path, capsys):
    model = shutil.copytree(tiny_pair / "student", tmp_path / "student")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    err = _fail(_sample(model), capsys)
    assert f"{weights} is not a readable safetensors file" in err and "truncated" in err


def test_a_truncated_gguf_file_names_the_file(tmp_path, capsys):
    from tests.gguf_checkpoints import ARCH_HEAD_DIM, tiny_hf_tensors, write_tiny_gguf

    path = tmp_path / "tiny.gguf"
    head_dim = ARCH_HEAD_DIM["qwen2"]
    write_tiny_gguf(path, "qwen2", tiny_hf_tensors("qwen2", head_dim), head_dim)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    err = _fail(_sample(path), capsys)
    assert f"{str(path)!r} cannot be read as GGUF" in err and "truncated" in err
