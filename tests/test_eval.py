"""Evaluation: answer extraction/equivalence, avg@k and pass@k, tables, and the runner."""

import json
import math
import re
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from opd_jax import cli, models
from opd_jax.config import ConfigError, load_tree
from opd_jax.eval import (
    BenchmarkSpec,
    EvalConfig,
    accuracy,
    answers,
    evaluate,
    load_eval_config,
    read_problem_file,
    tables,
)
from opd_jax.eval.answers import extract_answer, is_correct
from opd_jax.models.scratch import init_checkpoint
from opd_jax.models.testing import tiny_hf_config, train_tiny_tokenizer

# One sampling shape for every runner test, so the sampler compiles once.
SAMPLING = dict(batch_size=4, max_new_tokens=6, max_prompt_tokens=40, temperature=1.0)
ARITHMETIC_SIZES = {"train_size": 8, "test_size": 4, "test_long_size": 1, "test_unseen_op_size": 1}


# --- answers -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("12 + 30 = 42. The answer is 42.", "42"),
        ("answer is 42. Let me check: 12 + 30 = 42.", "42"),
        ("so \\boxed{1} then \\boxed{\\frac{1}{\\sqrt{2}}}.", "\\frac{1}{\\sqrt{2}}"),
        ("The answer is $\\frac{3}{4}$.", "\\frac{3}{4}"),
        ("The answer is 3.5.", "3.5"),
        ("The answer is \\boxed{5}. Done", "5"),
        ("answer: 0.50", "0.50"),
        ("Final Answer: **7**", "7"),
        ("#### 1,000", "1,000"),
        ("first 3, then \u22123", "-3"),
        ("I think 1/2 of 10 is 5", "5"),
        ("I get 1/2", "1/2"),
        ("\\boxed{} but 12 earlier", "12"),
        ("\\boxed{\\frac{1}{2}", "2"),  # an unclosed box is not an answer: the last number is
    ],
)
def test_extract_answer_prefers_last_box_then_stated_answer_then_last_number(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("text", ["", "   ", "\\boxed{}", "The answer is", "no digits", "answer:"])
def test_extract_answer_is_none_when_nothing_is_stated(text):
    assert extract_answer(text) is None


@pytest.mark.parametrize(
    "response, gold",
    [
        ("answer: 0.50", "1/2"),
        ("-3", "\u22123"),
        ("1,000", "1000"),
        ("12 + 30 = 42. The answer is 42.", "42"),
        ("\\boxed{\\dfrac{1}{2}}", "0.5"),
        ("The answer is $\\frac{1}{2}$.", "\\frac12"),
        ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}"),
        ("\\boxed{(3, \\frac{\\pi}{2})}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("\\boxed{42.0}", "42"),
        ("The answer is 79.", "12 + 30 = 42. 42 * 2 = 84. 84 - 5 = 79. The answer is 79."),
        ("so \\boxed{7}", "We add: $3 + 4 = \\boxed{7}$."),
    ],
)
def test_is_correct_accepts_equivalent_answers(response, gold):
    assert is_correct(response, gold)


@pytest.mark.parametrize(
    "response, gold",
    [
        ("\\boxed{}", "0"),
        ("\\boxed{\\frac{1}{2}", "1/2"),
        ("The answer is", "5"),
        ("The answer is \\frac{1}{2", "\\frac{1}{2}"),
        ("\\boxed{3}", "4"),
        ("", "1"),
        ("\\boxed{1}", ""),
        ("}}{{ \\boxed{ $$ \\frac{", "1"),
        ("\\boxed{9^9^9^9^9}", "1"),
    ],
)
def test_is_correct_rejects_wrong_or_malformed_answers(response, gold):
    assert not is_correct(response, gold)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            ["\\boxed{", "\\frac", "{", "}", "$", "1", "2", "/", ".", ",", "-", "\u2212", "^", " "]
            + ["The answer is", "answer:", "\\sqrt", "x", "=", "(", ")", "\\", "\n", "\u00e9"]
        ),
        max_size=12,
    ).map("".join),
    st.sampled_from(["1", "1/2", "\\frac{1}{2}", "", "{", "x=2"]),
)
def test_is_correct_never_raises_on_garbage(response, gold):
    assert is_correct(response, gold) in (True, False)


def test_is_correct_works_outside_the_main_thread():
    """math-verify's signal timeouts fail off the main thread; ours are off there."""
    results = []
    thread = threading.Thread(target=lambda: results.append(is_correct("\\boxed{2/4}", "0.5")))
    thread.start()
    thread.join()
    assert results == [True]


def test_normalize_removes_formatting_not_content():
    assert answers.normalize(" $\\dfrac{1}{2}$. ") == "\\frac{1}{2}"
    assert answers.normalize("\u22121,000.50") == "-1000.5"
    assert answers.normalize("\\text{(A)}") == "(A)"
    assert answers.normalize("1,2") == "1,2"


# --- metrics -------------------------------------------------------------------------------

CORRECT = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=bool)  # c = 2, 1, 0


def test_avg_at_k_is_mean_accuracy_with_stderr_of_problem_means():
    # per-problem accuracy 0.5, 0.25, 0 -> mean 0.25; sample std 0.25 -> stderr 0.25 / sqrt 3
    estimate = accuracy.avg_at_k(CORRECT)
    assert estimate.value == pytest.approx(0.25)
    assert estimate.stderr == pytest.approx(0.25 / math.sqrt(3))


def test_pass_at_k_matches_hand_computation():
    # n = 4. pass@2: c=2 -> 1 - C(2,2)/C(4,2) = 5/6; c=1 -> 1 - C(3,2)/C(4,2) = 1/2; c=0 -> 0.
    assert accuracy.pass_at_k(CORRECT, 2).value == pytest.approx((5 / 6 + 1 / 2) / 3)
    # pass@3: c=2 -> 1 (C(2,3) = 0); c=1 -> 1 - C(3,3)/C(4,3) = 3/4.
    assert accuracy.pass_at_k(CORRECT, 3).value == pytest.approx((1 + 3 / 4) / 3)
    pass4 = accuracy.pass_at_k(CORRECT, 4)
    assert pass4.value == pytest.approx(2 / 3)
    assert pass4.stderr == pytest.approx(np.std([1, 1, 0], ddof=1) / math.sqrt(3))
    assert accuracy.pass_at_k(CORRECT, 1) == accuracy.avg_at_k(CORRECT)


def test_pass_at_k_estimator_equals_binomial_formula():
    rng = np.random.default_rng(0)
    n = rng.integers(1, 20, size=200)
    c = rng.integers(0, n + 1)
    k = 3
    keep = n >= k
    pairs = zip(n[keep], c[keep], strict=True)
    expected = [1 - math.comb(ni - ci, k) / math.comb(ni, k) for ni, ci in pairs]
    np.testing.assert_allclose(accuracy.pass_at_k_per_problem(n[keep], c[keep], k), expected)


def test_metrics_reject_bad_shapes_and_k():
    with pytest.raises(ValueError):
        accuracy.pass_at_k(CORRECT, 5)
    with pytest.raises(ValueError):
        accuracy.avg_at_k(np.zeros((0, 3), bool))
    with pytest.raises(ValueError):
        accuracy.avg_at_k(np.zeros(3, bool))


def test_summarize_reports_avg_and_every_pass_at_j():
    summary = accuracy.summarize(CORRECT)
    assert list(summary) == ["num_problems", "k", "avg@4", "pass@1", "pass@2", "pass@3", "pass@4"]
    assert summary["num_problems"] == 3 and summary["k"] == 4
    assert summary["pass@4"]["value"] == pytest.approx(2 / 3)
    single = accuracy.summarize(np.array([[True, False]]))
    assert single["avg@2"] == {"value": 0.5, "stderr": 0.0}


# --- tables --------------------------------------------------------------------------------


def test_benchmark_table_averages_values_and_combines_stderrs(tmp_path):
    results = {
        "base": {"a": accuracy.Estimate(0.5, 0.1), "b": {"value": 0.25, "stderr": 0.2}},
        "distilled": {"a": accuracy.Estimate(0.75, 0.05)},
    }
    table = tables.benchmark_table(results, ["a", "b"], metric="avg@4")
    assert table["columns"] == ["a", "b", "average"]
    average = table["rows"]["base"]["average"]
    assert average["value"] == pytest.approx(0.375)
    assert average["stderr"] == pytest.approx(math.sqrt(0.1**2 + 0.2**2) / 2)
    assert table["rows"]["distilled"]["b"] is None
    assert table["rows"]["distilled"]["average"] is None

    markdown = tables.to_markdown(table)
    assert "| model | a | b | average |" in markdown
    assert "| base | 50.0 ± 10.0 | 25.0 ± 20.0 | 37.5 ± 11.2 |" in markdown
    assert "| distilled | 75.0 ± 5.0 | – | – |" in markdown

    md_path, json_path = tables.write_table(table, tmp_path / "out")
    assert md_path.read_text() == markdown
    assert json.loads(json_path.read_text()) == table
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["table.json", "table.md"]


def test_atomic_write_replaces_the_file_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "results.json"
    tables.atomic_write_text(path, "old")
    tables.atomic_write_text(path, "new")
    assert path.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


# --- runner --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "tiny"
    return init_checkpoint(path, tiny_hf_config(), train_tiny_tokenizer(), seed=0)


@pytest.fixture(scope="module")
def tiny(checkpoint):
    return models.load(checkpoint)


PROBLEMS = [
    {"prompt": "What is 12 + 30?", "answer": "42"},
    {"prompt": "Start with 3. Add 4. What is the result?", "answer": "7"},
    {"prompt": "Half of one?", "answer": "\\frac{1}{2}"},
]


def test_evaluate_samples_k_responses_per_problem_deterministically(tiny):
    model, tokenizer = tiny
    first = evaluate(model, tokenizer, PROBLEMS, k=3, seed=0, **SAMPLING)
    again = evaluate(model, tokenizer, PROBLEMS, k=3, seed=0, **SAMPLING)
    other = evaluate(model, tokenizer, PROBLEMS, k=3, seed=1, **SAMPLING)
    assert first == again
    assert [r["responses"] for r in other["records"]] != [r["responses"] for r in first["records"]]
    assert set(first["metrics"]) == {"num_problems", "k", "avg@3", "pass@1", "pass@2", "pass@3"}
    assert first["metrics"]["num_problems"] == 3
    for problem, record in zip(PROBLEMS, first["records"], strict=True):
        assert record["prompt"] == problem["prompt"] and record["gold"] == problem["answer"]
        assert len(record["responses"]) == len(record["extracted"]) == len(record["correct"]) == 3
        assert record["extracted"] == [extract_answer(r) for r in record["responses"]]
        assert all(isinstance(c, bool) for c in record["correct"])
    correct = np.array([r["correct"] for r in first["records"]])
    assert first["metrics"]["avg@3"]["value"] == pytest.approx(correct.mean())


def test_read_problem_file_accepts_problem_and_solution_fields(tmp_path):
    path = tmp_path / "math.jsonl"
    rows = [
        {"problem": "Compute 1/2 + 0.", "solution": "Clearly $\\boxed{\\frac{1}{2}}$."},
        {"prompt": "AIME-style", "answer": 204, "id": "aime-1"},
        {"question": "Olympiad", "final_answer": ["$3$"]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    problems = read_problem_file(path)
    assert [p["prompt"] for p in problems] == ["Compute 1/2 + 0.", "AIME-style", "Olympiad"]
    assert [p["answer"] for p in problems] == [rows[0]["solution"], "204", "$3$"]
    assert problems[1]["id"] == "aime-1"
    assert is_correct("The answer is 0.5.", problems[0]["answer"])
    parquet = tmp_path / "olympiad.parquet"
    pq.write_table(pa.Table.from_pylist([{"question": "Q", "final_answer": ["1", "2"]}]), parquet)
    assert read_problem_file(parquet) == [{"prompt": "Q", "answer": "1, 2", "id": "olympiad-0"}]
    for text, message in [
        (json.dumps({"text": "no prompt"}), "line 1: needs a non-empty string field"),
        ("[1, 2]", "line 1: expected a JSON object, got list"),
        ('{"problem": "cut', "line 1: invalid JSON"),
    ]:
        path.write_text(text + "\n")
        with pytest.raises(ValueError, match=message):
            read_problem_file(path)


def _write_config(tmp_path, checkpoint, **extra):
    math_file = tmp_path / "math500.jsonl"
    rows = [
        {"problem": "What is 1 + 1?", "solution": "$1 + 1 = \\boxed{2}$"},
        {"problem": "What is 2 + 2?", "solution": "$2 + 2 = \\boxed{4}$"},
    ]  # 2 problems x k=2 samples fill one batch of 4: the sampler's shape is reused
    math_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {
        "seed": 0,
        "out_dir": str(tmp_path / "eval"),
        "data_dir": str(tmp_path / "data"),
        "k": 2,
        "batch_size": SAMPLING["batch_size"],
        "max_prompt_tokens": SAMPLING["max_prompt_tokens"],
        "sampling": {"temperature": 1.0, "max_new_tokens": SAMPLING["max_new_tokens"]},
        "models": {"tiny": str(checkpoint)},
        "benchmarks": {
            "arith": {"source": "arithmetic", "split": "test", "limit": 2,
                      "arithmetic": ARITHMETIC_SIZES},
            "math500": {"source": str(math_file),
                        "template": "{prompt} Put the answer in \\boxed{}."},
        },
    } | extra  # fmt: skip
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_cli_eval_writes_results_tables_and_samples(tmp_path, checkpoint, capsys):
    config_path = _write_config(tmp_path, checkpoint)
    # the arithmetic prompts are cut to 40 tokens: the warning names the eval config's key
    with pytest.warns(UserWarning, match="cut to max_prompt_tokens=40 .* raise max_prompt_tokens"):
        assert cli.main(["eval", str(config_path), "--set", "benchmarks.arith.limit=3"]) == 0
    out = tmp_path / "eval"
    results = json.loads((out / "results.json").read_text())
    assert set(results["results"]["tiny"]) == {"arith", "math500"}
    assert results["results"]["tiny"]["arith"]["num_problems"] == 3
    assert results["results"]["tiny"]["math500"]["k"] == 2
    table = json.loads((out / "table.json").read_text())
    assert table["columns"] == ["arith", "math500", "average"]
    assert table["rows"]["tiny"]["average"] is not None
    markdown = (out / "table.md").read_text()
    assert markdown in capsys.readouterr().out
    samples = (out / "samples" / "tiny__math500.jsonl").read_text().splitlines()
    assert len(samples) == 2
    record = json.loads(samples[0])
    assert record["prompt"] == "What is 1 + 1? Put the answer in \\boxed{}."
    assert record["gold"] == "$1 + 1 = \\boxed{2}$" and len(record["responses"]) == 2
    assert len((out / "samples" / "tiny__arith.jsonl").read_text().splitlines()) == 3


def test_eval_config_names_the_nearest_key_for_a_typo(tmp_path, checkpoint):
    config_path = _write_config(tmp_path, checkpoint)
    with pytest.raises(ConfigError, match="benchmarks.arith.limit"):
        load_eval_config(config_path, ["benchmarks.arith.limt=3"])
    with pytest.raises(ConfigError, match="max_prompt_tokens"):
        load_eval_config(config_path, ["max_prompt_token=3"])
    with pytest.raises(ConfigError, match="no local checkpoint"):
        load_eval_config(config_path, ["models.tiny=missing/dir"])
    assert cli.main(["eval", str(config_path), "--set", "k=0"]) == 2


@pytest.mark.parametrize(
    "override, message",
    [
        ("benchmarks.arith.limt=3", "Did you mean 'benchmarks.arith.limit'"),
        ("zzz=3", "Unknown config key 'zzz'. The keys: seed, out_dir, data_dir"),
        ("benchmarks.arith.limit=three", "benchmarks.arith.limit must be int, got 'three'"),
        ("benchmarks.arith.limit=-1", "benchmarks.arith.limit must be >= 0"),
        ("benchmarks.arith.source=7", "benchmarks.arith.source must be str, got 7"),
        ("benchmarks.arith.source=a.csv", "must be 'arithmetic' or a .jsonl/.parquet file"),
        ("benchmarks.arith.source=missing.jsonl", "benchmarks.arith.source: no file at"),
        ("benchmarks.arith=[1]", "benchmarks.arith.source must be str"),
        ("benchmarks=[1]", "benchmarks must be a mapping of names to BenchmarkSpec"),
        ("benchmarks.a/b=arithmetic", "benchmark name 'a/b' must match"),
    ],
)
def test_benchmark_errors_name_the_key_and_the_fix(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_eval_config(None, ["models.m=.", override])


def test_a_bare_benchmark_source_is_its_spec():
    config = load_tree(EvalConfig, None, ["benchmarks.arith=arithmetic", "benchmarks.b.limit=2"])
    assert config.benchmarks == {"arith": BenchmarkSpec(), "b": BenchmarkSpec(limit=2)}


def test_example_config_uses_only_known_keys():
    config = load_tree(EvalConfig, Path(__file__).parents[1] / "configs" / "eval_example.yaml")
    assert config.k == 16 and config.benchmarks["math500"].template.endswith("within \\boxed{}.")
