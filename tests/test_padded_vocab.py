"""Pairs by tokenizer, not by embedding size: an embedding padded past the tokenizer's
vocabulary (Qwen2.5's 151,936 / 152,064 rows for 151,665 tokens) scores, ranks and samples over
the tokenizer's ids alone, and trains; pairs whose tokenizers differ are refused by name."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY
from flax import nnx
from test_train import overrides

from opd_jax import core, models, sampling
from opd_jax.config import load_config
from opd_jax.models import Decoder, ModelConfig
from opd_jax.models.testing import tiny_hf_config, train_tiny_tokenizer
from opd_jax.run_models import load_pair
from opd_jax.sharding import make_mesh
from opd_jax.train.loop import train

PAD = 24  # padding rows past the tokenizer's 320 tokens


def _padded_copy(model: Decoder, rows: int, value: float) -> Decoder:
    """``model`` with its embedding (and LM head) padded to ``rows``, padding set to ``value``:
    large enough that a padding id would win every top-K and every sample if it could."""
    config = ModelConfig.from_hf(model.config.to_hf() | {"vocab_size": rows})
    padded = Decoder(config, rngs=nnx.Rngs(0))
    params = nnx.to_flat_state(nnx.state(model, nnx.Param))
    body = [(path, v) for path, v in params if path[0] not in ("embed", "lm_head")]
    nnx.update(padded, nnx.from_flat_state(body))
    extra = rows - model.config.vocab_size
    padded.embed[...] = jnp.pad(model.embed[...], ((0, extra), (0, 0)), constant_values=value)
    if not config.tie_word_embeddings:
        head = model.lm_head[...]
        padded.lm_head[...] = jnp.pad(head, ((0, 0), (0, extra)), constant_values=value)
    return padded


@pytest.fixture(scope="module")
def padded_pair(tiny_pair, tmp_path_factory):
    """The tiny pair's teacher padded by ``PAD`` rows (its padding logits huge), saved as HF."""
    root = tmp_path_factory.mktemp("padded")
    teacher, tokenizer = models.load(tiny_pair / "teacher")
    models.save_hf(_padded_copy(teacher, teacher.config.vocab_size + PAD, 30.0), tokenizer,
                   root / "teacher")  # fmt: skip
    student, _ = models.load(tiny_pair / "student")
    models.save_hf(_padded_copy(student, student.config.vocab_size + PAD, 30.0), tokenizer,
                   root / "student")  # fmt: skip
    return root


def _config(pair_dir, student_dir, teacher_dir, run_dir, *extra):
    args = overrides(pair_dir, run_dir, *extra)
    return load_config(None, [*args, f"student.path={student_dir}", f"teacher.path={teacher_dir}"])


def _scores(student, teacher, tokens_BxT, k=8):
    mask = jnp.ones_like(tokens_BxT)
    h_s, h_t = (m.response_hidden(tokens_BxT, mask, 4) for m in (student, teacher))
    y = tokens_BxT[:, 4:]
    stats = core.score_chunked(h_s, student.unembed_matrix(), h_t, teacher.unembed_matrix(), y,
                               k=k, loss_kind="reverse_kl").stats  # fmt: skip
    kl = core.token_loss(student.logits(h_s), teacher.logits(h_t), y, "reverse_kl")
    return core.margin_from_stats(stats, "gap", k=k), kl, stats


def test_a_padded_pair_scores_as_the_unpadded_pair(tiny_pair, padded_pair, tmp_path):
    mesh = make_mesh({"data": 1})
    config = _config(tiny_pair, padded_pair / "student", padded_pair / "teacher", tmp_path)
    student, teacher, tokenizer = load_pair(config, mesh)
    assert student.config.token_vocab == teacher.config.token_vocab == 320
    assert student.unembed_matrix().shape[1] == teacher.unembed_matrix().shape[1] == 320
    base_s, base_t = models.load(tiny_pair / "student")[0], models.load(tiny_pair / "teacher")[0]
    tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, 320)
    margin, kl, stats = _scores(student, teacher, tokens)
    want_margin, want_kl, want_stats = _scores(base_s, base_t, tokens)
    np.testing.assert_allclose(margin, want_margin, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(kl, want_kl, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(stats.student_topk_ids, want_stats.student_topk_ids)
    assert int(stats.teacher_topk_ids.max()) < 320  # no padding id enters a top-K


def test_a_padded_student_never_samples_padding(tiny_pair, padded_pair):
    student, tokenizer = models.load(padded_pair / "student")
    prompts = jnp.ones((4, 6), jnp.int32)
    out = sampling.sample(student, prompts, jnp.ones_like(prompts), key=jax.random.key(0),
                          max_new_tokens=8, method=sampling.Temperature(1.0))  # fmt: skip
    assert int(jnp.max(out.tokens)) < 320


def test_a_padded_pair_trains(tiny_pair, padded_pair, tmp_path):
    config = _config(tiny_pair, padded_pair / "student", padded_pair / "teacher", tmp_path,
                     "train.steps=2")  # fmt: skip
    result = train(config)
    assert np.isfinite(result.metrics["loss"]) and result.metrics["grad_norm"] > 0


def test_tokenizers_that_differ_are_refused_naming_the_first_difference(tiny_pair):
    tokenizer = models.load_tokenizer(tiny_pair / "student")
    with pytest.raises(ValueError, match=r"the first differing id is \d+: '.*' in the student's"):
        models.check_same_tokenizer(tokenizer, train_tiny_tokenizer(vocab_size=300))
    other = train_tiny_tokenizer()
    other.pad_token = other.eos_token  # the same vocabulary, another pad token
    with pytest.raises(ValueError, match="special tokens: pad_token is '<pad>' in the student"):
        models.check_same_tokenizer(tokenizer, other)


def test_only_an_embedding_larger_than_its_tokenizer_is_cut():
    tokenizer = train_tiny_tokenizer()  # 320 tokens
    for rows, want in ((344, 320), (320, None), (300, None)):  # 300: ids past it never produced
        config = ModelConfig.from_hf(tiny_hf_config("qwen3", **TINY, vocab_size=rows))
        model = models.fit_to_tokenizer(Decoder(config, rngs=nnx.Rngs(0)), tokenizer)
        assert model.config.token_vocab == want
        assert model.unembed_matrix().shape[1] == min(rows, 320)


def test_the_plan_of_a_padded_pair_reports_the_tokenizers_vocabulary(tiny_pair, padded_pair):
    from opd_jax.memory_plan import format_plan, plan

    config = _config(tiny_pair, tiny_pair / "student", padded_pair / "teacher", "unused")
    result = plan(config)
    assert result["vocab"] == {"shared": 320, "student_rows": 320, "teacher_rows": 320 + PAD}
    assert "vocabulary 320 tokens (embedding rows: student 320, teacher 344)" in format_plan(result)
