"""Controls at the release rule's token budget, the oracle cut on arithmetic rows, and stage
timings that survive a resume."""

import json

import numpy as np
import pytest

from opd_jax import text_segments
from opd_jax.config import ConfigError, dump_config
from opd_jax.data import arithmetic_config, generate_split
from opd_jax.data.oracle import ANSWER_PATTERN, answer_end
from opd_jax.experiment import load_experiment_config, opd_runs, report, timings
from opd_jax.experiment.layout import MATCHED_FILE, run_dirs
from opd_jax.models.tokenizer import train_bpe_tokenizer

RULES = "experiment.rules=[random@release, prefix_fraction@release, release, full]"


def _config(tmp_path, *overrides):
    return load_experiment_config(None, [f"run.dir={tmp_path}", *overrides])


def _fake_run(run_dir, kept, **extra):
    """A metrics.jsonl of a finished run: one line per step with its kept fraction."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = [{"step": i + 1, "kept_fraction": k, **extra} for i, k in enumerate(kept)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def test_matched_controls_run_at_the_kept_fraction_release_had_on_the_same_seed(tmp_path):
    config = _config(tmp_path, RULES, "experiment.seeds=[0, 1]")
    dirs = run_dirs(config)
    _fake_run(dirs["release", 0], [0.6, 0.7, 0.65])
    _fake_run(dirs["release", 1], [0.5, 0.5])
    assert opd_runs.matched_fraction(config, "release", 0) is None
    for seed, want in ((0, 0.65), (1, 0.5)):
        for rule, option in (("random@release", "ratio"), ("prefix_fraction@release", "rho")):
            value = opd_runs.matched_fraction(config, rule, seed)
            assert value == pytest.approx(want)
            run_config = opd_runs.opd_config(config, rule, seed, dirs[rule, seed], value)
            assert run_config.rule.kind == rule.split("@")[0]
            assert run_config.rule.options == {option: value}
            assert f"{option}: {value}" in dump_config(run_config)
            recorded = json.loads((dirs[rule, seed] / MATCHED_FILE).read_text())
            assert recorded["value"] == value and recorded["reference"] == "release"
            assert recorded["option"] == option and recorded["reference_steps"] == 3 - seed


def test_a_started_control_keeps_the_fraction_it_started_with(tmp_path):
    config = _config(tmp_path, RULES, "experiment.seeds=[0]")
    dirs = run_dirs(config)
    _fake_run(dirs["release", 0], [0.4, 0.6])
    assert opd_runs.matched_fraction(config, "random@release", 0) == pytest.approx(0.5)
    (dirs["release", 0] / "metrics.jsonl").unlink()
    _fake_run(dirs["release", 0].parent / "elsewhere", [0.9])
    assert opd_runs.matched_fraction(config, "random@release", 0) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="no kept_fraction"):
        opd_runs.matched_fraction(config, "prefix_fraction@release", 0)


def test_every_matched_control_runs_after_its_reference(tmp_path):
    config = _config(tmp_path, RULES, "experiment.seeds=[0, 1]")
    order = list(run_dirs(config))
    assert order == [
        ("release", 0), ("release", 1), ("full", 0), ("full", 1),
        ("random@release", 0), ("random@release", 1),
        ("prefix_fraction@release", 0), ("prefix_fraction@release", 1),
    ]  # fmt: skip
    assert run_dirs(config)["random@release", 1] == tmp_path / "opd" / "random@release" / "seed1"


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ("[random@release, full]", "'release' is not in experiment.rules: add it"),
        ("[full@release, release]", "'full' has no option ratio or rho"),
        ("[random@, release]", "must name a plain rule after '@'"),
        ("[random@full@release, full, release]", "must name a plain rule"),
        ("[random@relase, release]", "must name a plain rule"),
        ("[randm@release, release]", "is not one of"),
    ],
)
def test_a_matched_control_needs_a_fraction_option_and_its_reference_in_the_rules(
    tmp_path, rules, message
):
    with pytest.raises(ConfigError, match=message):
        _config(tmp_path, f"experiment.rules={rules}")


def test_the_report_puts_each_controls_kept_fraction_beside_its_references(tmp_path):
    config = _config(tmp_path, "experiment.rules=[release, random@release]", "experiment.seeds=[0]")
    dirs = run_dirs(config)
    extra = {"released_fraction": 1.0, "margin_mean": 1.0, "advantage_mean": 0.0, "loss": 0.1}
    extra |= {"margin_by_position": [1.0] * 5}
    _fake_run(dirs["release", 0], [0.6, 0.7], **extra)
    opd_runs.matched_fraction(config, "random@release", 0)
    _fake_run(dirs["random@release", 0], [0.66, 0.68], **extra)
    rows = report.diagnostics(config)
    assert rows["random@release"]["matched"]["reference_kept"] == pytest.approx(0.65)
    line = "| random@release | release | ratio | 0.650 | 0.670 | 0.650 |"
    assert line in report.diagnostics_markdown(rows)
    evals = {report.rule_label("random@release"): {0: {"test": {"correct": [[1], [0]]}}}}
    measured = report.measures(config, evals)
    assert measured["rows"]["OPD: random@release"]["kept_fraction"] == pytest.approx(0.67)
    assert report.measures_markdown(measured).rstrip().endswith("| 67.0 |")


def test_a_bad_oracle_pattern_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="segments.oracle_pattern"):
        _config(tmp_path, "segments.oracle_pattern='The answer is ('")


@pytest.fixture(scope="module")
def arithmetic_rows():
    """Reference solutions of the task with a recap (answer first, then answer last), and a
    task tokenizer (digits split) trained on them."""
    fields = dict(train_size=24, recap=3, max_start=20, max_addend=20)
    rows = {}
    for last in (False, True):
        examples = generate_split(arithmetic_config(**fields, answer_last=last), "train")
        rows[last] = [e["solution"] for e in examples]
    return rows, train_bpe_tokenizer(rows[False] + rows[True], 300, split_digits=True)


def _responses(tokenizer, texts, width=160):
    """Right-padded response columns ``[B, width]`` of ``texts`` + EOS, and their mask."""
    tokens = np.zeros((len(texts), width), np.int32)
    mask = np.zeros((len(texts), width), np.int32)
    for b, text in enumerate(texts):
        ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
        tokens[b, : len(ids)], mask[b, : len(ids)] = ids, 1
    return tokens, mask


def test_the_oracle_cut_falls_on_the_first_token_after_the_answer_sentence(arithmetic_rows):
    rows, tokenizer = arithmetic_rows
    texts = rows[False]
    tokens, mask = _responses(tokenizer, texts)
    host, decoded = text_segments.response_segments(
        tokenizer, tokens, mask, "sentence", 32, ANSWER_PATTERN
    )
    assert host["cut"].shape == (len(texts),) and host["cut"].dtype == np.int32
    for b, (text, cut) in enumerate(zip(texts, host["cut"], strict=True)):
        ids = tokens[b, : mask[b].sum()].tolist()
        before = tokenizer.decode(ids[:cut], clean_up_tokenization_spaces=False)
        after = tokenizer.decode(ids[cut:], clean_up_tokenization_spaces=False)
        assert before == text[: answer_end(text)] and before.endswith(".")
        assert after.startswith(" ") and after.strip().endswith("<eos>")  # the recap, then EOS
        assert host["seg"][b, cut] == host["seg"][b, cut - 1] + 1  # a new sentence starts there
        assert decoded[b].startswith(before)


def test_with_the_answer_last_the_oracle_keeps_every_token(arithmetic_rows):
    rows, tokenizer = arithmetic_rows
    tokens, mask = _responses(tokenizer, rows[True])
    host, _ = text_segments.response_segments(tokenizer, tokens, mask, "token", 1, ANSWER_PATTERN)
    lengths = mask.sum(-1)
    assert all(c == -1 or c == n for c, n in zip(host["cut"], lengths, strict=True))


def test_without_an_answer_sentence_there_is_no_cut_and_other_rules_get_none():
    assert text_segments.token_cut("12 + 3 = 15. The answer is 1.5.", [(0, 31)]) == -1
    assert text_segments.token_cut("The answer is 7. Done.", [(0, 4), (4, 16), (16, 22)]) == 2
    mask = np.ones((1, 3), np.int32)
    tokenizer = train_bpe_tokenizer(["The answer is 7."], 280)
    host, _ = text_segments.response_segments(tokenizer, np.full((1, 3), 40), mask, "token", 1)
    assert set(host) == {"seg"}


def test_stage_timings_add_up_over_invocations_and_keep_each_one(tmp_path, monkeypatch):
    path = tmp_path / "timings.json"
    path.write_text(json.dumps({"models": 300.0}))  # an older file: bare seconds per stage
    ticks = iter([0.0, 120.0, 1000.0, 1000.5, 2000.0, 2002.0])
    monkeypatch.setattr(timings.time, "perf_counter", lambda: next(ticks))
    monkeypatch.setattr(timings, "git_commit", lambda: "abc123")
    first = timings.StageClock(path)
    with first("opd release seed 0"):  # stopped part-way: its time so far is kept
        pass
    second = timings.StageClock(path)  # the resume
    with second("models"):  # finished earlier: skipped in half a second
        pass
    with second("opd release seed 0"):
        pass
    saved = json.loads(path.read_text())
    assert saved["models"]["seconds"] == pytest.approx(300.5)
    assert saved["models"]["invocations"] == [
        {"seconds": 300.0, "commit": None},
        {"seconds": 0.5, "commit": "abc123"},
    ]
    assert saved["opd release seed 0"]["seconds"] == pytest.approx(122.0)
    assert [i["seconds"] for i in saved["opd release seed 0"]["invocations"]] == [120.0, 2.0]
    assert second.total() == pytest.approx(2.5)


def test_the_commit_is_the_repositorys_head_or_none():
    commit = timings.git_commit()
    assert commit is None or (len(commit) == 40 and int(commit, 16) >= 0)
