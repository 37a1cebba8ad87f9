"""The offline experiment end to end at toy size: models, OPD per rule and seed, report."""

import dataclasses
import json
import shutil

import numpy as np
import pytest
from scipy import stats

from opd_jax import models
from opd_jax.cli import main
from opd_jax.config import ConfigError
from opd_jax.experiment import evaluation, load_experiment_config, report, run_experiment

TOY = [
    "data.arithmetic={train_size: 64, test_size: 4, test_long_size: 4, test_unseen_op_size: 4,"
    " min_steps: 1, max_steps: 2, long_min_steps: 3, long_max_steps: 3, max_start: 9,"
    " max_addend: 9, max_value: 20, recap: 2}",
    "data.batch_size=2",
    "data.max_prompt_tokens=64",
    "sampling.max_new_tokens=24",
    "score.chunk_size=16",
    "train.steps=2",
    "run.progress=false",
    "run.loggers=[]",
    "experiment.rules=[release, full]",
    "experiment.seeds=[0]",
    "experiment.vocab_size=280",
    "experiment.tokenizer_examples=64",
    "experiment.teacher={shape: {layers: 1, hidden: 32, heads: 2, kv_heads: 1, head_dim: 16,"
    " intermediate: 64}, steps: 3, batch_size: 4}",
    "experiment.student={shape: {layers: 1, hidden: 16, heads: 1, kv_heads: 1, head_dim: 16,"
    " intermediate: 32}, steps: 2, batch_size: 4}",
    "experiment.curve_every=1",
    "experiment.curve_problems=2",
    "experiment.eval_problems=3",
    "experiment.eval_max_new_tokens=24",
    "experiment.eval_k=2",
]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("experiment")
    overrides = [*TOY, f"run.dir={root / 'run'}", f"data.data_dir={root / 'data'}"]
    config = load_experiment_config(None, overrides)
    return config, run_experiment(config), root / "run"


def test_writes_models_runs_tables_diagnostics_and_plots(finished):
    _, report, run = finished
    for role in ("teacher", "student"):
        assert (run / "models" / role / "sft.json").is_file()
    for rule in ("release", "full"):
        seed_dir = run / "opd" / rule / "seed0"
        assert sorted(json.loads((seed_dir / "curve.json").read_text())) == ["0", "1", "2"]
    table = json.loads((run / "table.json").read_text())
    assert list(table["rows"]) == ["teacher", "student (before OPD)", "OPD: release", "OPD: full"]
    assert table["columns"] == ["test", "test_long", "test_unseen_op", "average"]
    assert len(table["seeds"]["OPD: release"]) == 1
    assert table["seed_sd"]["OPD: release"]["test"] is None  # one seed: no spread
    assert "| OPD: full |" in (run / "table.md").read_text()
    assert set(json.loads((run / "diagnostics.json").read_text())) == {"release", "full"}
    names = sorted(p.name for p in (run / "plots").iterdir())
    assert names == [
        "accuracy_vs_step.png",
        "boundary_histogram.png",
        "margin_advantage.png",
        "margin_by_sentence.png",
    ]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in (run / "plots").iterdir())
    assert report["table"]["rows"] == table["rows"]


def test_every_model_is_evaluated_per_problem_and_sample(finished):
    _, _, run = finished
    student = json.loads((run / "models" / "student" / "eval.json").read_text())
    assert set(student) == {"settings", "test", "test_long", "test_unseen_op"}
    assert student["settings"]["problems"] == 3 and student["settings"]["kl"]
    for measure in ("correct", "steps", "kl", "kl_solution", "kl_recap"):
        assert np.shape(student["test"][measure]) == (3, 2), measure  # 3 problems, k = 2
    assert np.all(np.asarray(student["test"]["kl"]) >= 0)
    assert "kl" not in student["test_long"]  # the KL is measured in domain only
    teacher = json.loads((run / "models" / "teacher" / "eval.json").read_text())
    assert "kl" not in teacher["test"]


def test_measures_and_comparisons_pair_models_problem_by_problem(finished):
    _, report, run = finished
    measures = json.loads((run / "measures.json").read_text())
    assert measures["split"] == "test"
    row = measures["rows"]["OPD: full"]
    assert set(row) >= {"correct", "correct_change", "steps", "kl", "kl_solution", "kl_recap"}
    pairs = {(c["a"], c["b"], c["split"]) for c in report["comparisons"]}
    assert ("OPD: release", "OPD: full", "test_long") in pairs
    assert ("OPD: full", "student (before OPD)", "test") in pairs
    assert all(0 <= c["problem_level"]["p"] <= 1 for c in report["comparisons"])
    one_seed = [c for c in report["comparisons"] if c["n"] == 1]
    assert len(one_seed) == len(report["comparisons"])
    assert all(c["p"] is None and c["note"] == "one seed: no error" for c in one_seed)
    assert "| OPD: release | OPD: full | test | 1 |" in (run / "comparisons.md").read_text()


def _evaluation(correct_by_problem):
    """An eval.json of one split, ``test``, with one sample per problem."""
    return {"test": {"correct": [[c] for c in correct_by_problem]}}


def test_comparisons_between_rules_take_the_training_run_as_unit():
    config = load_experiment_config(
        None,
        [
            "experiment.rules=[release, full]",
            "experiment.seeds=[0, 1, 2]",
            "experiment.eval_splits=[test]",
        ],
    )
    release = {0: [1, 1, 0, 0], 1: [1, 1, 1, 0], 2: [1, 0, 1, 0]}  # 0.5, 0.75, 0.5
    full = {0: [1, 0, 0, 0], 1: [1, 1, 0, 0], 2: [0, 1, 1, 0]}  # 0.25, 0.5, 0.5
    evals = {
        report.STUDENT: {None: _evaluation([0, 1, 0, 0])},  # 0.25
        "OPD: release": {s: _evaluation(c) for s, c in release.items()},
        "OPD: full": {s: _evaluation(c) for s, c in full.items()},
    }
    rows = {(c["a"], c["b"]): c for c in report.comparisons(config, evals)}
    between = rows["OPD: release", "OPD: full"]
    reference = stats.ttest_rel([0.5, 0.75, 0.5], [0.25, 0.5, 0.5])
    assert between["n"] == 3 and between["df"] == 2
    assert between["value"] == pytest.approx(1 / 6) and between["stderr"] == pytest.approx(1 / 12)
    assert between["p"] == pytest.approx(reference.pvalue)
    assert between["interval"]["low"] <= between["value"] <= between["interval"]["high"]
    assert between["problem_level"]["value"] == pytest.approx(1 / 6)  # pooled, over problems
    assert set(between["problem_level"]) == {"value", "stderr", "z", "p"}
    against_student = rows["OPD: full", report.STUDENT]
    np.testing.assert_allclose(against_student["differences"], [0.0, 0.25, 0.25])
    table = report.accuracy_table(config, evals)
    assert table["seed_sd"]["OPD: release"]["test"] == pytest.approx(np.sqrt(3) / 12)
    assert table["seeds"]["OPD: release"] == [0.5, 0.75, 0.5]
    assert "standard deviation over seeds" in report.table_markdown(table)
    markdown = report.comparisons_markdown(list(rows.values()))
    assert "± standard error over seeds (n = 3)" in markdown
    assert "| OPD: release | OPD: full | test | 3 | +16.7 ± 8.3 | 2.00 (2) | 0.184 |" in markdown


def test_running_again_skips_every_finished_stage(finished, capsys):
    config, report, run = finished
    mtimes = {p: p.stat().st_mtime for p in run.rglob("eval.json")}
    again = run_experiment(config)
    assert again["table"]["rows"] == report["table"]["rows"]
    assert {p: p.stat().st_mtime for p in run.rglob("eval.json")} == mtimes
    assert "sft step" not in capsys.readouterr().out


def test_an_evaluation_made_with_other_settings_is_made_again(finished, tmp_path, capsys):
    """An eval.json records its settings. Evaluating again with another setting (3 -> 2
    problems a split) makes it again rather than returning [3, k] arrays the report would pair
    with [2, k] ones; a file from before settings were recorded counts where its shapes fit."""
    config, _, run = finished
    path = tmp_path / "eval.json"
    shutil.copy(run / "models" / "student" / "eval.json", path)
    student, tokenizer = models.load(run / "models" / "student")
    teacher, _ = models.load(run / "models" / "teacher")
    assert evaluation.stored_evaluation(path, config, with_teacher=True) is not None
    assert evaluation.stored_evaluation(path, config, with_teacher=False) is None  # KL in it
    assert "was made with other evaluation settings" in capsys.readouterr().out
    legacy = json.loads(path.read_text())
    assert legacy.pop("settings")["problems"] == 3
    path.write_text(json.dumps(legacy))
    assert json.dumps(evaluation.stored_evaluation(path, config, with_teacher=True)) == (
        json.dumps(legacy)
    )
    assert "evaluating again" not in capsys.readouterr().out

    fewer = load_experiment_config(None, [*TOY, "experiment.eval_problems=2"])
    fewer = dataclasses.replace(fewer, data=config.data)
    made = evaluation.evaluate_model(student, teacher, tokenizer, fewer, path)
    assert f"{path} was made with other evaluation settings" in capsys.readouterr().out
    assert json.dumps(made) == path.read_text().strip()  # NaN KLs: compared as text
    assert made["settings"]["problems"] == 2 and np.shape(made["test"]["correct"]) == (2, 2)
    again = evaluation.evaluate_model(student, teacher, tokenizer, fewer, path)
    assert json.dumps(again) == json.dumps(made)


def test_full_applies_the_configs_full_overrides_before_set(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(
        "train: {steps: 5}\nexperiment:\n  full: {train.steps: 50, experiment.seeds: [0, 1, 2]}\n"
    )
    assert load_experiment_config(path).train.steps == 5
    full = load_experiment_config(path, full=True)
    assert full.train.steps == 50 and full.experiment.seeds == [0, 1, 2]
    assert load_experiment_config(path, ["train.steps=7"], full=True).train.steps == 7


@pytest.mark.parametrize(
    "override, message",
    [
        ("experiment.rules=[release, relase]", "'relase' is not one of"),
        ("experiment.seeds=[]", "at least one"),
        ("experiment.eval_splits=[test, valid]", "'valid' is not one of"),
        ("experiment.student.shape.kv_heads=3", "multiple of kv_heads"),
        ("experiment.teacher.stpes=3", "Did you mean 'experiment.teacher.steps'"),
    ],
)
def test_bad_experiment_settings_fail_before_any_compute(override, message):
    with pytest.raises(ConfigError, match=message):
        load_experiment_config(None, [override])


def test_full_without_a_full_section_is_refused(tmp_path, capsys):
    path = tmp_path / "exp.yaml"
    path.write_text("seed: 0\n")
    assert main(["experiment", str(path), "--full"]) == 2
    assert "no experiment.full section" in capsys.readouterr().err


def test_worker_processes_compute_what_one_process_does(finished, tmp_path):
    """experiment.workers=2 fine-tunes the two models at once and spreads the OPD runs over
    two spawned processes: every file of results equals the one-process experiment's."""
    _, _, one = finished
    overrides = [*TOY, f"run.dir={tmp_path / 'run'}", f"data.data_dir={one.parent / 'data'}"]
    config = load_experiment_config(None, [*overrides, "experiment.workers=2"])
    assert run_experiment(config) is not None
    two = tmp_path / "run"
    for path in ("models/teacher/eval.json", "models/student/eval.json", "table.json"):
        assert json.loads((two / path).read_text()) == json.loads((one / path).read_text()), path
    for rule in ("release", "full"):
        run = f"opd/{rule}/seed0"
        for name in ("eval.json", "curve.json"):
            assert (two / run / name).read_text() == (one / run / name).read_text()
        losses = [
            [json.loads(line)["loss"] for line in (root / run / "metrics.jsonl").open()]
            for root in (one, two)
        ]
        assert losses[0] == losses[1]


def test_several_pairs_each_run_the_whole_experiment_and_are_summarised(finished, tmp_path):
    """Pair 0 is the single-pair experiment (the same models and runs); pair 1's models are
    trained from other seeds; pairs.md lists every comparison on each pair."""
    _, _, one = finished
    overrides = [*TOY, f"run.dir={tmp_path / 'run'}", f"data.data_dir={one.parent / 'data'}"]
    config = load_experiment_config(None, [*overrides, "experiment.pairs=[0, 1]"])
    result = run_experiment(config)
    root = tmp_path / "run"
    table = json.loads((root / "pair0" / "table.json").read_text())
    assert table == json.loads((one / "table.json").read_text())
    sft = [json.loads((root / f"pair{p}/models/student/sft.json").read_text()) for p in (0, 1)]
    assert [s["seed"] for s in sft] == [1, 3]
    summary = json.loads((root / "pairs.json").read_text())
    assert summary["pairs"] == [0, 1] and result["summary"] == summary
    row = next(r for r in summary["rows"] if r["a"] == "OPD: release" and r["b"] == "OPD: full")
    assert set(row["per_pair"]) == {"0", "1"} and row["holds_on_each"] is None  # one seed each
    assert "| OPD: release | OPD: full | test |" in (root / "pairs.md").read_text()


def test_pairs_must_be_distinct_and_non_negative():
    for pairs in ("[]", "[0, 0]", "[-1]"):
        with pytest.raises(ConfigError, match="experiment.pairs must name distinct pair seeds"):
            load_experiment_config(None, [f"experiment.pairs={pairs}"])


def test_a_claim_holds_only_if_it_holds_on_each_pair(tmp_path):
    from opd_jax.experiment.pairs import pairs_markdown, summarise_pairs

    config = load_experiment_config(None, [f"run.dir={tmp_path}", "experiment.pairs=[0, 1]"])
    rows = {  # release - full on test: significant on pair 0 only; on test_long on both
        0: [(0.03, 0.01, "test"), (0.02, 0.001, "test_long")],
        1: [(0.01, 0.30, "test"), (0.04, 0.02, "test_long")],
    }
    for pair, comparisons in rows.items():
        (tmp_path / f"pair{pair}").mkdir()
        records = [
            {"a": "OPD: release", "b": "OPD: full", "split": split, "value": v, "stderr": 0.01,
             "p": p}
            for v, p, split in comparisons
        ]  # fmt: skip
        (tmp_path / f"pair{pair}" / "comparisons.json").write_text(json.dumps(records))
    summary = summarise_pairs(config)
    verdicts = {row["split"]: row["holds_on_each"] for row in summary["rows"]}
    assert verdicts == {"test": False, "test_long": True}
    test = next(r for r in summary["rows"] if r["split"] == "test")
    assert test["spread"] == pytest.approx(np.std([0.03, 0.01], ddof=1))
    row = "| OPD: release | OPD: full | test | +3.0 ± 1.0 (p = 0.01) | +1.0 ± 1.0 (p = 0.3) |"
    assert row + " 1.4 | no |" in pairs_markdown(summary)


def test_a_stopped_run_starts_nothing_further(tmp_path, monkeypatch):
    from opd_jax.experiment import opd_runs
    from opd_jax.experiment.timings import StageClock

    config = load_experiment_config(None, [*TOY, f"run.dir={tmp_path}", "experiment.seeds=[0, 1]"])
    started = []

    def stopped(config, rule, seed):
        started.append((rule, seed))
        return False  # as a run stopped by SIGTERM returns

    monkeypatch.setattr(opd_runs, "run_opd", stopped)
    assert opd_runs.run_all(config, StageClock(tmp_path / "timings.json")) is False
    assert started == [("release", 0)]
