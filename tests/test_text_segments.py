"""Host sentence segmentation: NLTK's trained Punkt offline, mapped to tokens by offsets."""

import re
import warnings

import numpy as np
import pytest

from opd_jax import text_segments


def word_offsets(text):
    """Offsets of tokens that carry their leading whitespace, like byte-level BPE pieces."""
    return [(m.start(), m.end()) for m in re.finditer(r"\s*\S+", text)]


def test_trained_punkt_keeps_abbreviations_inside_a_sentence():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spans = text_segments.sentence_spans("Dr. Smith went home. He slept.")
    assert spans == [(0, 20), (21, 30)]


def test_tokens_belong_to_the_sentence_of_their_first_non_space_character():
    text = "Dr. Smith went home. He slept well. Then 12 + 30 = 42."
    seg = text_segments.token_sentences(text, word_offsets(text))
    np.testing.assert_array_equal(seg, [0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 2])


def test_whitespace_tokens_join_the_next_sentence_and_trailing_ones_the_last():
    text = "One. Two."
    offsets = [(0, 4), (4, 5), (5, 9), (9, 9), (9, 9)]  # "One.", " ", "Two.", EOS, pad-like
    np.testing.assert_array_equal(text_segments.token_sentences(text, offsets), [0, 1, 1, 1, 1])


# Pieces that stress Punkt's context rules: abbreviations, runs of end marks with no space
# between, closing punctuation after a break, numbers, newlines, Unicode spaces (Punkt's regexes
# see them, its word-before search does not), empty (EOS-like) tokens.
HARD_PIECES = [
    " the", " The", " cat", " Dr.", " Mr.", " e.g.", " i.e.", " U.S.", " No.", " 3.5", " 42", ".",
    "!", "?", "!!", "...", " (", ")", '"', ' "', "'", " '", ".)", '."', "\n", "\n\n", " ", "  ",
    " A.", " 5.", " etc.", " So", " we", " get", " x", "=", " +", "..", " Step", " 1:", " jr.",
    " vs.", " Inc.", "}", "]", "[", " a.m.", " St.", "(", ".(", "\t", "-", "--", "",
    "\u00a0", "\u202f", "\u3000", "\u2009", ".\u00a0", "\u00a0!", "\r\n", "\u201d", ")--",
]  # fmt: skip


@pytest.mark.parametrize("seed", range(4))
def test_growing_sentences_equal_a_full_split_at_every_look(seed):
    rng = np.random.default_rng(seed)
    for _ in range(150):
        pieces = [HARD_PIECES[i] for i in rng.integers(0, len(HARD_PIECES), rng.integers(1, 80))]
        ends = np.cumsum([len(p) for p in pieces])
        offsets = list(zip(ends - [len(p) for p in pieces], ends, strict=True))
        text, growing, n = "".join(pieces), text_segments.GrowingSentences(), 0
        while n < len(pieces):
            n = min(len(pieces), n + int(rng.integers(1, 12)))
            prefix = text[: ends[n - 1]]
            np.testing.assert_array_equal(
                growing.update(prefix, offsets[:n]),
                text_segments.token_sentences(prefix, offsets[:n]),
                err_msg=repr(prefix),
            )


def test_a_break_before_a_unicode_space_is_not_final():
    """Punkt finds the word before a potential end by ASCII whitespace only: after a no-break
    space, a later "!" merges the sentences again."""
    text = "Merci.\u00a0Bien\u202f! Ok"
    offsets = [(i, i + 1) for i in range(len(text))]
    growing = text_segments.GrowingSentences()
    growing.update(text[:13], offsets[:13])
    np.testing.assert_array_equal(
        growing.update(text, offsets), text_segments.token_sentences(text, offsets)
    )


def test_growing_sentences_split_again_only_the_text_after_the_last_final_break():
    text = "First we add 3. Then we add 4. So the answer is 7. Dr. Smith"
    offsets = word_offsets(text)
    growing = text_segments.GrowingSentences()
    growing.update(text, offsets)
    assert text[growing.char :] == "Dr. Smith"  # "So the ..." is followed by whitespace and more
    assert growing.sentence == 3 and growing.token == 13
    more = text + " agrees. Done."
    want = text_segments.token_sentences(more, word_offsets(more))
    np.testing.assert_array_equal(growing.update(more, word_offsets(more)), want)


def test_batch_segment_ids_place_sentences_on_the_response_tokens():
    texts = ["A b. C d.", "Only one"]
    offsets = [word_offsets(texts[0]), word_offsets(texts[1])]
    mask = np.zeros((2, 7), bool)
    mask[0, 2:6] = True
    mask[1, 1:3] = True
    seg = text_segments.segment_ids("sentence", mask, texts, offsets)
    np.testing.assert_array_equal(seg, [[-1, -1, 0, 0, 1, 1, -1], [-1, 0, 0, -1, -1, -1, -1]])


def test_fixed_and_token_kinds_need_no_text():
    mask = np.array([[0, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(
        text_segments.segment_ids("fixed", mask, tokens=2), [[-1, 0, 0, 1, 1, 2]]
    )
    np.testing.assert_array_equal(text_segments.segment_ids("token", mask), [[-1, 0, 1, 2, 3, 4]])


def test_empty_responses_and_texts_without_sentences():
    assert text_segments.token_sentences("", []).shape == (0,)
    np.testing.assert_array_equal(text_segments.token_sentences("   ", [(0, 3)]), [0])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "sentences"}, "segments.kind"),
        ({"kind": "sentence"}, "needs the decoded texts"),
        ({"kind": "sentence", "texts": ["a"], "offsets": [[(0, 1)]]}, "2 rows"),
        ({"kind": "sentence", "texts": ["a", "b"], "offsets": [[(0, 1)], []]}, "row 0 has 2"),
    ],
)
def test_bad_inputs_are_refused_with_the_fix(kwargs, message):
    mask = np.ones((2, 2), bool)
    with pytest.raises(ValueError, match=message):
        text_segments.segment_ids(response_mask=mask, **kwargs)
