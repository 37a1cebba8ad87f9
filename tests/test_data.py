"""Arithmetic task, prompt-file builders and the grain prompt iterator (all in tmp dirs)."""

import json
import re
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from opd_jax import data
from opd_jax.data import arithmetic
from opd_jax.eval.answers import extract_answer
from opd_jax.text_segments import sentence_spans

SMALL = {"train_size": 300, "test_size": 40, "test_long_size": 40, "test_unseen_op_size": 40}
_PROMPT_OP = re.compile(r"(Add|Subtract|Multiply by|Divide by) (\d+)\.")
_APPLY = {
    "Add": int.__add__,
    "Subtract": int.__sub__,
    "Multiply by": int.__mul__,
    "Divide by": int.__floordiv__,
}


def solve(prompt):
    """Recomputes a prompt's chain from its text alone: ``(values, ops)``."""
    value = int(re.match(r"Start with (\d+)\.", prompt).group(1))
    values, ops = [value], []
    for op, operand in _PROMPT_OP.findall(prompt):
        if op == "Divide by":
            assert value % int(operand) == 0, prompt
        value = _APPLY[op](value, int(operand))
        values.append(value)
        ops.append(op)
    return values, ops


@pytest.fixture(scope="module")
def small_config():
    return data.arithmetic_config(**SMALL)


@pytest.fixture(scope="module")
def splits(small_config):
    return {s: data.generate_split(small_config, s) for s in arithmetic.SPLITS}


@pytest.fixture(scope="module")
def arithmetic_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("arithmetic")
    data.build("arithmetic", data_dir, **SMALL)
    return data_dir


def test_generation_is_deterministic_for_a_seed_and_differs_across_seeds(small_config):
    for split in arithmetic.SPLITS:
        again = data.generate_split(data.arithmetic_config(**SMALL), split)
        other = data.generate_split(data.arithmetic_config(**SMALL, seed=1), split)
        assert data.generate_split(small_config, split) == again
        assert [e["prompt"] for e in again] != [e["prompt"] for e in other]


def test_configs_are_named_by_their_fields():
    assert data.arithmetic_config().name == "default"
    assert data.arithmetic_config(seed=1).name == data.arithmetic_config(seed=1).name
    assert data.arithmetic_config(seed=1).name != data.arithmetic_config(seed=2).name
    with pytest.raises(ValueError, match="long_min_steps"):
        data.arithmetic_config(long_min_steps=3)


def test_splits_have_the_configured_sizes_and_unique_ids(splits):
    for split, examples in splits.items():
        assert len(examples) == SMALL[f"{split}_size"]
        assert len({e["id"] for e in examples}) == len(examples)
        assert len({e["prompt"] for e in examples}) == len(examples)


def test_each_solution_splits_into_one_punkt_sentence_per_step_plus_the_answer(splits):
    for examples in splits.values():
        for e in examples:
            sentences = [e["solution"][a:b] for a, b in sentence_spans(e["solution"])]
            assert len(sentences) == e["num_steps"] + 1, sentences
            assert sentences[-1] == f"The answer is {e['answer']}."


def test_answers_and_every_solution_step_are_correct(splits):
    for examples in splits.values():
        for e in examples:
            values, ops = solve(e["prompt"])
            assert len(ops) == e["num_steps"]
            assert str(values[-1]) == e["answer"]
            assert all(0 <= v <= 999 for v in values)
            steps = re.findall(r"(\d+) ([-+*/]) (\d+) = (\d+)\.", e["solution"])
            assert [int(s[0]) for s in steps] == values[:-1]
            assert [int(s[3]) for s in steps] == values[1:]


def test_out_of_domain_splits_really_differ_from_train(splits):
    train_ops = {op for e in splits["train"] for op in solve(e["prompt"])[1]}
    assert train_ops == {"Add", "Subtract", "Multiply by"}
    assert all("Divide by" in solve(e["prompt"])[1] for e in splits["test_unseen_op"])
    assert max(e["num_steps"] for e in splits["train"]) <= 4
    assert min(e["num_steps"] for e in splits["test_long"]) >= 6
    assert not {e["prompt"] for e in splits["test"]} & {e["prompt"] for e in splits["train"]}


def test_array_record_build_and_data_source_round_trip_without_tensorflow(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        from opd_jax import data
        source = data.load_source("arithmetic", "test_long", {str(tmp_path)!r}, **{SMALL!r})
        records = [source[i] for i in range(len(source))]
        assert "tensorflow" not in sys.modules, "TensorFlow was imported"
        print(len(records), sorted(r["id"].decode() for r in records)[0])
    """)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines()[-1].split() == ["40", "test_long-00000"]
    assert list(tmp_path.glob("opd_arithmetic/custom-*/1.0.0/*.array_record-*"))


def test_built_records_equal_the_generated_ones(arithmetic_dir, splits):
    for split, expected in splits.items():
        source = data.load_source("arithmetic", split, arithmetic_dir, **SMALL)
        got = sorted(
            (
                {k: v.decode() if isinstance(v, bytes) else int(v) for k, v in r.items()}
                for r in (source[i] for i in range(len(source)))
            ),
            key=lambda r: r["id"],
        )
        assert got == expected


def test_unknown_split_is_named_in_the_error(arithmetic_dir):
    with pytest.raises(ValueError, match="test_long"):
        data.load_source("arithmetic", "validation", arithmetic_dir, **SMALL)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def texts(source):
    return sorted(
        (source[i]["prompt"].decode(), source[i]["answer"].decode()) for i in range(len(source))
    )


def test_jsonl_and_parquet_prompt_files_load_with_optional_answers(tmp_path):
    rows = [
        {"prompt": "What is 2 + 2?", "answer": 4, "source": "ignored"},
        {"prompt": "Find x.", "answer": "x = 3"},
        {"prompt": "No answer here."},
    ]
    jsonl = write_jsonl(tmp_path / "aime-2024.jsonl", rows)
    pq.write_table(
        pa.Table.from_pylist(
            [{"prompt": r["prompt"], "answer": str(r.get("answer", "")), "level": 1} for r in rows]
        ),
        tmp_path / "dapo.parquet",
    )
    expected = [("Find x.", "x = 3"), ("No answer here.", ""), ("What is 2 + 2?", "4")]
    data_dir = tmp_path / "built"
    assert texts(data.load_source(jsonl, "aime_2024", data_dir)) == expected
    assert texts(data.load_source(tmp_path / "dapo.parquet", "dapo", data_dir)) == expected
    both = {"aime": jsonl, "dapo": tmp_path / "dapo.parquet"}
    assert texts(data.load_source(both, "aime", data_dir)) == expected
    assert texts(data.load_source(tmp_path, "dapo", data_dir)) == expected


def test_a_changed_prompt_file_is_rebuilt(tmp_path):
    path = write_jsonl(tmp_path / "set.jsonl", [{"prompt": "old"}])
    assert texts(data.load_source(path, "set", tmp_path / "built")) == [("old", "")]
    write_jsonl(path, [{"prompt": "new"}, {"prompt": "newer"}])
    assert texts(data.load_source(path, "set", tmp_path / "built")) == [("new", ""), ("newer", "")]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            '{"prompt": "ok"}\n\n{"question": "no prompt"}\n',
            r"bad\.jsonl, line 3: missing field 'prompt'",
        ),
        ('{"prompt": "ok"}\n{"prompt": "cut\n', r"bad\.jsonl, line 2: invalid JSON"),
        ('{"prompt": "ok", "answer": [1]}\n', r"bad\.jsonl, line 1: field 'answer'"),
    ],
)
def test_a_malformed_jsonl_line_names_the_file_line_and_field(tmp_path, content, message):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(data.PromptFileError, match=message):
        data.load_source(tmp_path / "bad.jsonl", "bad", tmp_path / "built")


def test_a_parquet_file_without_prompts_names_the_file_and_column(tmp_path):
    pq.write_table(pa.table({"question": ["q"]}), tmp_path / "bad.parquet")
    with pytest.raises(data.PromptFileError, match=r"bad\.parquet: missing column 'prompt'"):
        data.load_source(tmp_path / "bad.parquet", "bad", tmp_path / "built")


@pytest.fixture(scope="module")
def test_source(arithmetic_dir):
    return data.load_source("arithmetic", "test", arithmetic_dir, **SMALL)


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_batches_are_fixed_size_dicts_of_strings_and_arrays(test_source):
    batch = next(
        data.make_prompt_iterator(test_source, batch_size=8, seed=0, shard_index=0, shard_count=1)
    )
    assert set(batch) == {"prompt", "answer", "solution", "num_steps", "id"}
    assert all(isinstance(p, str) for p in batch["prompt"]) and len(batch["prompt"]) == 8
    assert isinstance(batch["num_steps"], np.ndarray) and batch["num_steps"].shape == (8,)


def test_iteration_is_deterministic_for_a_seed_and_reshuffled_each_epoch(test_source):
    def ids(seed):
        it = data.make_prompt_iterator(
            test_source, batch_size=8, seed=seed, num_epochs=2, shard_index=0, shard_count=1
        )
        return [i for batch in it for i in batch["id"]]

    first = ids(seed=3)
    assert first == ids(seed=3) and first != ids(seed=4)
    epoch_1, epoch_2 = first[:40], first[40:]
    assert (
        sorted(epoch_1)
        == sorted(epoch_2)
        == sorted(r["id"] for r in data.generate_split(data.arithmetic_config(**SMALL), "test"))
    )
    assert epoch_1 != epoch_2


@pytest.mark.parametrize("shard_count", [2, 3])
def test_shards_are_disjoint_equal_and_cover_the_data(test_source, shard_count):
    shards = [
        [
            i
            for batch in data.make_prompt_iterator(
                test_source,
                batch_size=1,
                seed=0,
                num_epochs=1,
                shard_index=k,
                shard_count=shard_count,
            )
            for i in batch["id"]
        ]
        for k in range(shard_count)
    ]
    seen = [i for shard in shards for i in shard]
    assert len(set(seen)) == len(seen) == 40 // shard_count * shard_count
    assert {len(shard) for shard in shards} == {40 // shard_count}


def test_the_last_partial_batch_is_dropped(test_source):
    it = data.make_prompt_iterator(
        test_source, batch_size=16, seed=0, num_epochs=1, shard_index=0, shard_count=1
    )
    assert [len(b["id"]) for b in it] == [16, 16]


def test_a_restored_iterator_resumes_with_exactly_the_same_batches(test_source):
    kwargs = {"batch_size": 4, "seed": 7, "shard_index": 1, "shard_count": 2}
    it = data.make_prompt_iterator(test_source, **kwargs)
    take(it, 7)
    state = json.loads(json.dumps(it.get_state()))
    expected = take(it, 6)
    resumed = data.make_prompt_iterator(test_source, **kwargs)
    resumed.set_state(state)
    got = take(resumed, 6)
    for g, e in zip(got, expected, strict=True):
        assert g["id"] == e["id"] and g["prompt"] == e["prompt"]
        np.testing.assert_array_equal(g["num_steps"], e["num_steps"])


def test_default_shard_is_this_process(test_source):
    it = data.make_prompt_iterator(test_source, batch_size=40, seed=0, num_epochs=1)
    assert len(next(it)["id"]) == 40
    with pytest.raises(ValueError, match="shard_index"):
        data.make_prompt_iterator(test_source, batch_size=1, seed=0, shard_index=2, shard_count=2)


def test_recap_follows_the_answer_with_distinct_kinds_in_free_wordings():
    config = data.arithmetic_config(**SMALL, recap=3)
    for example in data.generate_split(config, "train"):
        solution = example["solution"]
        head, _, recap = solution.partition(f"The answer is {example['answer']}.")
        assert recap.strip() and head.strip()
        sentences = sentence_spans(recap.strip())
        assert len(sentences) == 3
        assert extract_answer(solution) == example["answer"]  # the recap states no other answer
        assert data.step_accuracy(solution, solution) == 1.0
    without = data.generate_split(data.arithmetic_config(**SMALL), "train")
    assert all(e["solution"].endswith(f"The answer is {e['answer']}.") for e in without)


def test_step_accuracy_counts_reference_steps_stated_in_place():
    solution = "12 + 30 = 42. 42 * 2 = 84. 84 - 5 = 79. The answer is 79. Check: 79 = 61 + 18."
    assert data.solution_steps(solution) == [(12, "+", 30, 42), (42, "*", 2, 84), (84, "-", 5, 79)]
    assert data.step_accuracy("12 + 30 = 42. 42 * 2 = 85. 85 - 5 = 80.", solution) == 1 / 3
    assert data.step_accuracy("42 * 2 = 84. 12 + 30 = 42.", solution) == 0.0  # out of place
    assert data.step_accuracy("The answer is 79.", solution) == 0.0
    assert data.step_accuracy("anything", "The answer is 3.") == 1.0
