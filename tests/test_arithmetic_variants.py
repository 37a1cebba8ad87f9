"""The arithmetic task's variants: the answer last, long recaps, and the oracle cut."""

import hashlib
import json
import re

import numpy as np
import pytest

from opd_jax import data
from opd_jax.data import arithmetic, oracle, recap
from opd_jax.eval.answers import extract_answer, is_correct
from opd_jax.experiment.evaluation import _ANSWER_SENTENCE, _kl_parts
from opd_jax.text_segments import sentence_spans

SMALL = {"train_size": 300, "test_size": 40, "test_long_size": 40, "test_unseen_op_size": 40}
QUICKSTART = {  # configs/quickstart.yaml's data.arithmetic
    "train_size": 10000,
    "test_size": 200,
    "test_long_size": 200,
    "test_unseen_op_size": 200,
    "min_steps": 3,
    "max_steps": 5,
    "long_min_steps": 6,
    "long_max_steps": 7,
    "max_start": 20,
    "max_addend": 20,
    "max_factor": 5,
    "max_value": 99,
    "recap": 3,
}
# Recorded from the code before answer_last and recap_kinds existed: config name and the
# sha256 of json.dumps({split: generate_split(config, split)}, sort_keys=True).
BEFORE = {
    "quickstart": (
        QUICKSTART,
        "custom-1d9ef23bcfe4",
        "693750feb9eaf4b73d05d927da896cc6a18ad8de1a6fab967904592c4a958156",
    ),
    "recap0": (
        SMALL,
        "custom-8a56dba65f97",
        "8b0036fdf884ae0916b998ea0f4c16eff515e7cac6504420479e7a1c8267c569",
    ),
    "recap1": (
        SMALL | {"recap": 1},
        "custom-8eb99eef2bdd",
        "830fe6e1b1e419881333990f55282e13d235f4a3042d616e1121f5c2ad906e0c",
    ),
    "recap3": (
        SMALL | {"recap": 3},
        "custom-7034af175457",
        "652db10a07a601f0d8e6202263cdd90b9db9268271b25fd260cb11920ce0d256",
    ),
    "recap4": (
        SMALL | {"recap": 4},
        "custom-8b39fa518214",
        "dece74f46855415630c1022445e6815da816f3a2e3d3a5a8ec98c8420ae6b98a",
    ),
    "recap2_seed7": (
        SMALL | {"recap": 2, "seed": 7},
        "custom-7e99cece9010",
        "af2acaf403a6b56fd5f85a1de1f51e557106122e49a6ef3af3883ff03f209ae5",
    ),
}
_OPS = {"Add": "add", "Subtract": "subtract", "Multiply by": "multiply", "Divide by": "divide"}
_APPLY = {
    "add": int.__add__,
    "subtract": int.__sub__,
    "multiply": int.__mul__,
    "divide": int.__floordiv__,
}


def chain_of(prompt):
    """Recomputes a prompt's chain from its text alone: ``(values, ops, operands)``."""
    values = [int(re.match(r"Start with (\d+)\.", prompt).group(1))]
    ops, operands = [], []
    for verb, operand in re.findall(r"(Add|Subtract|Multiply by|Divide by) (\d+)\.", prompt):
        ops.append(_OPS[verb])
        operands.append(int(operand))
        values.append(_APPLY[ops[-1]](values[-1], operands[-1]))
    return values, ops, operands


def _wording_regex(wording):
    return "^" + re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>.+?)", re.escape(wording)) + "$"


def recap_kind(sentence):
    """The kind and fields of a recap sentence; exactly one wording must match."""
    found = [
        (kind, match.groupdict())
        for kind, wordings in recap.WORDINGS.items()
        for wording in wordings
        if (match := re.match(_wording_regex(wording), sentence))
    ]
    assert len(found) == 1, (sentence, found)
    return found[0]


def is_true(kind, fields, prompt):
    """Whether a recap sentence of ``kind`` with ``fields`` is true of ``prompt``'s chain."""
    values, ops, operands = chain_of(prompt)
    nouns = {
        "add": "an addition",
        "subtract": "a subtraction",
        "multiply": "a multiplication",
        "divide": "a division",
    }
    n = {name: int(v) for name, v in fields.items() if re.fullmatch(r"-?\d+", v)}
    if kind == "check":
        plus = "low" in n and n["low"] >= 0 and n["low"] + n["rest"] == n["answer"]
        minus = "high" in n and 1 <= n["extra"] <= 20 and n["high"] - n["extra"] == n["answer"]
        return n["answer"] == values[-1] and n.get("rest", 0) >= 0 and (plus or minus)
    if kind == "step":
        return 1 <= n["k"] <= len(ops) and values[n["k"]] == n["value"]
    expected = {
        "start": values[0],
        "count": len(ops),
        "peak": max(values),
        "least": min(values),
        "first_op": nouns[ops[0]],
        "last_op": nouns[ops[-1]],
        "adds": ops.count("add"),
        "mults": ops.count("multiply"),
        "operands": sum(operands),
        "parity": "odd" if values[-1] % 2 else "even",
    }[kind]
    (stated,) = fields.values()
    return stated == str(expected)


def split_recap(example, answer_last):
    """The recap sentences of a generated example, cut off its chain and answer."""
    solution, answer = example["solution"], f"The answer is {example['answer']}."
    steps_end = max(m.end() for m in re.finditer(r"\d+ [-+*/] \d+ = \d+\.", solution))
    if answer_last:
        assert solution.endswith(" " + answer)
        free = solution[steps_end : -len(answer)]
    else:
        assert solution[steps_end:].startswith(" " + answer)
        free = solution[steps_end + 1 + len(answer) :]
    return [free.strip()[a:b] for a, b in sentence_spans(free.strip())] if free.strip() else []


def digest(config):
    splits = {s: data.generate_split(config, s) for s in arithmetic.SPLITS}
    return hashlib.sha256(json.dumps(splits, sort_keys=True).encode()).hexdigest()


@pytest.mark.parametrize("case", sorted(BEFORE))
def test_default_variant_generates_and_names_exactly_as_before(case):
    fields, name, expected = BEFORE[case]
    config = data.arithmetic_config(**fields)
    assert config.name == name
    assert digest(config) == expected
    same = data.arithmetic_config(**fields, recap_kinds=4, answer_last=False)
    assert same.name == name


def test_first_generated_examples_are_unchanged():
    train = data.generate_split(data.arithmetic_config(**SMALL, recap=3), "train")
    assert [e["solution"] for e in train[:2]] == [
        "32 - 9 = 23. 23 + 3 = 26. 26 + 1 = 27. 27 + 41 = 68. The answer is 68. "
        "The start was 32. Check: 68 = 79 - 11. There were 4 steps.",
        "1 - 1 = 0. 0 * 6 = 0. 0 + 39 = 39. 39 * 8 = 312. The answer is 312. "
        "Check: 312 = 6 + 306. We started from 1. The largest value was 312.",
    ]


def test_new_fields_enter_the_name_only_when_set():
    names = {
        data.arithmetic_config(**SMALL, recap=3).name,
        data.arithmetic_config(**SMALL, recap=3, answer_last=True).name,
        data.arithmetic_config(**SMALL, recap=3, recap_kinds=12).name,
    }
    assert len(names) == 3
    assert data.arithmetic_config(answer_last=True).name.startswith("custom-")


def test_recap_longer_than_its_kinds_is_refused_with_the_fix_named():
    with pytest.raises(ValueError, match="recap_kinds"):
        data.arithmetic_config(recap=8)
    with pytest.raises(ValueError, match="recap_kinds <= 12"):
        data.arithmetic_config(recap=8, recap_kinds=13)
    assert data.arithmetic_config(recap=12, recap_kinds=12).recap == len(recap.KINDS) == 12


@pytest.mark.parametrize("split", arithmetic.SPLITS)
def test_answer_last_reorders_the_same_sentences_and_ends_with_the_answer(split):
    first = data.generate_split(data.arithmetic_config(**SMALL, recap=3), split)
    last = data.generate_split(data.arithmetic_config(**SMALL, recap=3, answer_last=True), split)
    for a, b in zip(first, last, strict=True):
        assert {k: v for k, v in a.items() if k != "solution"} == {
            k: v for k, v in b.items() if k != "solution"
        }
        assert split_recap(a, answer_last=False) == split_recap(b, answer_last=True)
        assert b["solution"].endswith(f"The answer is {b['answer']}.")
        assert extract_answer(b["solution"]) == b["answer"]
        assert is_correct(b["solution"], b["answer"])
        assert data.solution_steps(b["solution"]) == data.solution_steps(a["solution"])
        assert len(data.solution_steps(b["solution"])) == b["num_steps"]
        assert data.step_accuracy(b["solution"], b["solution"]) == 1.0
        assert data.step_accuracy(a["solution"], b["solution"]) == 1.0


@pytest.mark.parametrize("answer_last", [False, True])
@pytest.mark.parametrize("count", [8, 12])
def test_long_recaps_state_only_true_facts_of_distinct_kinds(count, answer_last):
    config = data.arithmetic_config(**SMALL, recap=count, recap_kinds=12, answer_last=answer_last)
    seen = set()
    for split in ("train", "test_unseen_op"):
        for e in data.generate_split(config, split):
            sentences = split_recap(e, answer_last)
            assert len(sentences) == count
            assert len(sentence_spans(e["solution"])) == e["num_steps"] + 1 + count
            kinds = [recap_kind(s) for s in sentences]
            assert len({kind for kind, _ in kinds}) == count
            for (kind, fields), sentence in zip(kinds, sentences, strict=True):
                assert is_true(kind, fields, e["prompt"]), (sentence, e["prompt"])
            assert is_correct(e["solution"], e["answer"])
            assert data.step_accuracy(e["solution"], e["solution"]) == 1.0
            seen |= {kind for kind, _ in kinds}
    assert seen == set(recap.KINDS)


def test_every_wording_of_every_kind_is_drawn():
    config = data.arithmetic_config(**SMALL, recap=12, recap_kinds=12)
    drawn = set()
    for e in data.generate_split(config, "train"):
        for sentence in split_recap(e, answer_last=False):
            kind, _ = recap_kind(sentence)
            wordings = recap.WORDINGS[kind]
            drawn.add(next(w for w in wordings if re.match(_wording_regex(w), sentence)))
    assert drawn == {w for wordings in recap.WORDINGS.values() for w in wordings}


@pytest.mark.parametrize(
    "text, end",
    [
        ("12 + 30 = 42. The answer is 42.", 31),  # answer last, at the end of the text
        ("12 + 30 = 42. The answer is 42. We began with 12.", 31),  # answer first
        ("The answer is 42.\nCheck: 42 = 40 + 2.", 17),
        ("12 + 30 = 42. The answer is -7. The answer is 42.", 31),  # negative, first counts
        ("12 + 30 = 42. That took 1 steps.", None),  # no answer
        ("", None),
        ("The answer is 42", None),  # unfinished sentence
        ("The answer is 4.2.", None),  # malformed numbers are not an answer sentence
        ("The answer is 12a.", None),
        ("The answer is --3.", None),
        ("The answer is .", None),
        ("the answer is 42.", None),
        ("The answer is 4.2. The answer is 42.", 36),  # the first well-formed one
    ],
)
def test_answer_end_is_just_after_the_first_answer_sentence(text, end):
    assert oracle.answer_end(text) == end
    if end is not None:
        assert re.search(r"The answer is -?\d+\.$", text[:end])


def test_answer_end_takes_any_task_pattern():
    text = r"So x = 3, hence \boxed{3}. Done."
    assert oracle.answer_end(text, r"\\boxed\{[^}]*\}") == len(r"So x = 3, hence \boxed{3}")
    assert oracle.answer_end(text, re.compile("#### .*")) is None


@pytest.mark.parametrize("answer_last", [False, True])
def test_solution_ranges_leave_exactly_the_recap_out(answer_last):
    config = data.arithmetic_config(**SMALL, recap=8, recap_kinds=12, answer_last=answer_last)
    for e in data.generate_split(config, "test"):
        text = e["solution"]
        ranges = data.arithmetic.solution_ranges(text, answer_last)
        inside = "".join(text[a:b] for a, b in ranges)
        outside = [c for i, c in enumerate(text) if not any(a <= i < b for a, b in ranges)]
        recap_text = " " + " ".join(split_recap(e, answer_last))
        assert "".join(outside) == recap_text
        assert data.solution_steps(inside) == data.solution_steps(text)
        assert inside.endswith(f"The answer is {e['answer']}.")


def test_solution_ranges_without_an_answer_or_steps_hold_everything():
    for answer_last in (False, True):
        assert data.arithmetic.solution_ranges("1 + 2 = 3. We began.", answer_last) == [(0, 20)]
        assert data.arithmetic.solution_ranges("Hi. The answer is 3.", answer_last) == [(0, 20)]


class _PieceTokenizer:
    """Token ``i`` decodes to ``pieces[i]``."""

    def __init__(self, pieces):
        self.pieces = pieces

    def decode(self, ids, **_):
        return "".join(self.pieces[i] for i in ids)


@pytest.mark.parametrize(
    "pieces, answer_last",
    [
        (["1 + 2 = 3.", " The", " answer is 3.", " We", " began", " with 1."], False),
        (["1 + 2 = 3.", " We", " began", " with 1.", " The", " answer is 3."], True),
        (["1 + 2 = 3.", " We", " began", " with 1."], True),  # no answer: all solution
    ],
)
def test_kl_parts_put_each_token_in_the_part_its_text_starts_in(pieces, answer_last):
    tokens_1xN = np.arange(len(pieces))[None]
    has_answer = bool(_ANSWER_SENTENCE.search("".join(pieces)))
    in_recap = np.array([has_answer and p in (" We", " began", " with 1.") for p in pieces])
    kl_1xN = np.where(in_recap, 3.0, 1.0)[None]
    parts = _kl_parts(
        kl_1xN, tokens_1xN, np.ones_like(tokens_1xN), _PieceTokenizer(pieces), answer_last
    )
    assert parts["kl_solution"][0] == 1.0
    if has_answer:
        assert parts["kl_recap"][0] == 3.0
    else:
        assert np.isnan(parts["kl_recap"][0])
    assert parts["kl"][0] == pytest.approx(kl_1xN.mean())


@pytest.mark.parametrize(
    "response, correct",
    [
        ("3 + 4 = 7. The answer is 7. We began with 3.", True),
        ("3 + 4 = 7. We began with 3. The answer is 7.", True),
        ("3 + 4 = 7. The answer is 8. The answer is 7.", False),  # the first one is graded
        ("3 + 4 = 7. We began with 3. The peak was 7.", False),  # no answer sentence
        ("3 + 4 = 7. The answer is 7", False),  # cut before its period
    ],
)
def test_the_graded_answer_is_the_first_answer_sentence(response, correct):
    from opd_jax.experiment.evaluation import graded_correct

    assert graded_correct(response, "7") is correct
