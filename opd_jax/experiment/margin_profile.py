"""``opd-jax profile``: where a teacher stops discriminating among a student's candidates.

For a run config's student and teacher (no training), ``batches`` batches of the student's
rollouts on the config's prompts are scored by the OPD objective, and its diagnostics
(docs/method.md §7) are gathered: the teacher's margin over the student's top-K and the sampled
advantage, against relative position in the response and by sentence index; how often the
release rule fires and where it cuts. Written to ``run.dir``:

- ``profile.json``: the summary and every batch's diagnostics;
- ``profile.md``: the two profiles as tables;
- ``plots/margin_advantage.png``, ``plots/margin_by_sentence.png``.

With ``ideal`` (the arithmetic task only) the same rollouts are also scored by the task's
ideal teacher, the generator's own next-token distribution ``p*``
(:mod:`opd_jax.experiment.ideal_teacher`): its margin and advantage by sentence beside the
trained teacher's on the same (covered) tokens, how much of each sentence is on the
generator's support and where ``p*`` is one token's, in ``profile.json`` (``ideal``),
``profile.md`` and ``plots/ideal_vs_teacher_by_sentence.png``. The trained teacher's margin on
the tokens where ``p*`` is one token's is free of the data's entropy: where it holds while the
margin over all tokens falls, the fall is the data's, not the teacher's.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from flax import nnx

from opd_jax import core
from opd_jax.config import Config
from opd_jax.data.arithmetic import arithmetic_config
from opd_jax.errors import InputError
from opd_jax.experiment import ideal_teacher
from opd_jax.experiment.plots import (
    ideal_vs_teacher_by_sentence,
    margin_advantage,
    margin_by_sentence,
)
from opd_jax.experiment.profile_means import by_sentence
from opd_jax.files import atomic_write_text

if TYPE_CHECKING:
    from opd_jax.train.session import Session
    from opd_jax.train.step import StepSettings

SCALARS = ("margin_mean", "advantage_mean", "released_fraction", "kept/release", "response_tokens")
# The ideal teacher's p* is mixed with this much uniform error: margins and advantages are
# finite, a margin where p* is one token's is log(1 + (1 - eps) V / eps) (13.0 nats at V = 400).
IDEAL_EPSILON = 1e-3


def _by_position(records: list[dict[str, Any]], name: str) -> np.ndarray:
    """A relative-position profile over batches, each bin weighted by its tokens."""
    values = np.asarray([r[name] for r in records], np.float64)
    counts = np.asarray([r["tokens_by_position"] for r in records], np.float64)
    with np.errstate(all="ignore"):
        return (values * counts).sum(0) / counts.sum(0)


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over batches of :data:`SCALARS`, and the four profiles (NaN where empty)."""
    summary: dict[str, Any] = {name: float(np.mean([r[name] for r in records])) for name in SCALARS}
    for name in ("margin_by_position", "advantage_by_position"):
        summary[name] = _by_position(records, name).tolist()
    for name in ("margin_by_sentence", "advantage_by_sentence"):
        summary[name] = by_sentence(records, name).tolist()
    summary["rows_by_sentence"] = np.sum([r["rows_by_sentence"] for r in records], 0).tolist()
    return summary


def _markdown(summary: dict[str, Any], label: str) -> str:
    def row(values, digits=2):
        return " | ".join("–" if not np.isfinite(v) else f"{v:.{digits}f}" for v in values)

    bins = len(summary["margin_by_position"])
    sentences = [i for i, n in enumerate(summary["rows_by_sentence"]) if n > 0]
    shown = sentences[-1] + 1 if sentences else 0
    lines = [
        f"Teachability profile of {label}: margin (gap over the student's top-K, nats) and "
        "sampled advantage log p_T(y) - log p_S(y) (nats)",
        "",
        "| " + " | ".join(f"{name}" for name in SCALARS) + " |",
        "|" + "---:|" * len(SCALARS),
        "| " + row([summary[n] for n in SCALARS], 3) + " |",
        "",
        "By relative position t / L (bin centres):",
        "",
        "| quantity | " + " | ".join(f"{(i + 0.5) / bins:.3f}" for i in range(bins)) + " |",
        "|---|" + "---:|" * bins,
        "| margin | " + row(summary["margin_by_position"]) + " |",
        "| advantage | " + row(summary["advantage_by_position"]) + " |",
        "",
        "By sentence index (rows reaching the index in the last line):",
        "",
        "| quantity | " + " | ".join(str(i + 1) for i in range(shown)) + " |",
        "|---|" + "---:|" * shown,
        "| margin | " + row(summary["margin_by_sentence"][:shown]) + " |",
        "| advantage | " + row(summary["advantage_by_sentence"][:shown]) + " |",
        "| rows | " + row(summary["rows_by_sentence"][:shown], 0) + " |",
    ]
    ideal = _ideal_markdown(summary["ideal"], shown) if "ideal" in summary else ""
    return "\n".join(lines) + "\n" + ideal


# The ideal teacher's rows of profile.md: label -> series of the summary's "ideal".
IDEAL_ROWS = {
    "ideal margin": "ideal_margin_by_sentence",
    "teacher margin": "teacher_margin_covered_by_sentence",
    "teacher margin, p* determined": "teacher_margin_determined_by_sentence",
    "teacher margin, p* open": "teacher_margin_open_by_sentence",
    "ideal margin, p* open": "ideal_margin_open_by_sentence",
    "ideal advantage": "ideal_advantage_by_sentence",
    "teacher advantage": "teacher_advantage_covered_by_sentence",
    "entropy of p*": "ideal_entropy_by_sentence",
    "coverage": "coverage_by_sentence",
    "p* determined": "determined_by_sentence",
}


def _ideal_markdown(ideal: dict[str, Any], shown: int) -> str:
    def row(values):
        return " | ".join("–" if not np.isfinite(v) else f"{v:.2f}" for v in values[:shown])

    lines = [
        "",
        "The task's ideal teacher p* (the generator's next-token distribution, mixed with "
        f"{ideal['epsilon']:g} uniform error) beside the trained teacher on the tokens where p* "
        f"is defined ({ideal['coverage']:.3f} of the response tokens): all of them, those where "
        "p* is one token's (determined) and the others (open):",
        "",
        "| quantity | " + " | ".join(str(i + 1) for i in range(shown)) + " |",
        "|---|" + "---:|" * shown,
    ]
    lines += [f"| {label} | {row(ideal[name])} |" for label, name in IDEAL_ROWS.items()]
    return "\n".join(lines) + "\n"


def _stats_step(session: Session, settings: StepSettings):
    """The jitted ``(params, teacher_params, batch) -> TokenStats [B, N, K]``: the step's
    scoring of a batch (both forward passes, :func:`~opd_jax.core.score_chunked`)."""
    o, prompt_len = settings.objective, settings.prompt_len
    forward = dict(query_chunk=settings.attention_chunk, attention=settings.attention)

    def stats(params, teacher_params, batch):
        student = nnx.merge(session.graphdef, params)
        teacher = nnx.merge(session.teacher_graphdef, teacher_params)
        tokens, mask = batch["tokens"], batch["attention_mask"]
        h_s, h_t = (
            m.response_hidden(tokens, mask, prompt_len, **forward) for m in (student, teacher)
        )
        return core.score_chunked(
            h_s, student.unembed_matrix(), h_t, teacher.unembed_matrix(), tokens[:, prompt_len:],
            k=o.k, loss_kind=o.loss, loss_options=dict(o.loss_options), chunk_size=o.chunk_size,
        ).stats  # fmt: skip

    return jax.jit(stats)


def _margin_options(objective: core.ObjectiveSettings) -> dict[str, Any]:
    """The release rule's margin as the objective computes it (its defaults, ``margin_k``
    capped at the scored K, the rule's options when it trains)."""
    options = core.rule_options("release")
    options["margin_k"] = min(options["margin_k"], objective.k)
    if objective.rule == "release":
        options |= dict(objective.rule_options)
    return {"kind": options["margin_kind"], "k": options["margin_k"],
            "renormalize": options["renormalize"]}  # fmt: skip


class _Ideal:
    """Scores each batch's rollouts with the ideal teacher beside the trained one."""

    def __init__(self, config: Config, session: Session, settings: StepSettings, epsilon: float):
        self.task = arithmetic_config(**config.data.arithmetic)
        self.session, self.settings, self.epsilon = session, settings, epsilon
        self.stats = _stats_step(session, settings)
        self.margin = _margin_options(settings.objective)
        self.vocab = nnx.merge(session.graphdef, session.params).config.vocab_size

    def record(
        self,
        prompts: list[str],
        rollout: tuple[np.ndarray, ...],
        seg: np.ndarray,
        batch: dict[str, jax.Array],
    ) -> dict[str, list[float]]:
        """:func:`~opd_jax.experiment.ideal_teacher.compare_by_sentence` of one batch: its
        ``prompts``, the host's ``rollout`` and segment ids ``seg [B, N]``, the device batch."""
        s = self.session
        teacher = jax.tree.map(np.asarray, self.stats(s.params, s.teacher_params, batch))
        p, n = s.prompt_len, s.config.sampling.n
        rows = [str(prompts[b // n]) for b in range(len(rollout[0]))]
        scores = ideal_teacher.score_rollouts(
            rows, rollout[0][:, p:], rollout[1][:, p:], teacher.student_topk_ids, self.task,
            s.tokenizer,
        )  # fmt: skip
        ideal = ideal_teacher.ideal_token_stats(scores, teacher, self.epsilon, self.vocab)
        return ideal_teacher.compare_by_sentence(
            ideal, teacher, scores, seg, rollout[1][:, p:],
            self.settings.objective.segment_bins, self.margin,
        )  # fmt: skip


def profile(
    config: Config,
    batches: int,
    label: str = "the student and teacher",
    *,
    ideal: bool = False,
    epsilon: float = IDEAL_EPSILON,
) -> dict:
    """Measures the pair of ``config`` on ``batches`` batches (module doc); returns the
    summary and writes the files. ``ideal``: also the arithmetic task's ideal teacher, its
    ``p*`` mixed with ``epsilon`` uniform error."""
    from opd_jax.train.preflight import open_data
    from opd_jax.train.session import Session, step_settings
    from opd_jax.train.step import make_score_step

    if ideal and config.data.source != "arithmetic":
        raise InputError(
            f"the ideal teacher is the arithmetic task's generator, but data.source is "
            f"{config.data.source!r}: profile without it, or set data.source=arithmetic."
        )
    # the profile reads whole rollouts and the offline rule's diagnostics: never stopped early
    config = dataclasses.replace(
        config, sampling=dataclasses.replace(config.sampling, stop_at_release=False)
    )
    source = open_data(config)
    session = Session.build(config)
    prompts, _ = session.prompt_iterator(source)
    settings = step_settings(config)
    score = make_score_step(session.graphdef, session.teacher_graphdef, settings)
    scorer = _Ideal(config, session, settings, epsilon) if ideal else None
    base = jax.random.key(config.seed)
    records = []
    start = time.perf_counter()
    with jax.set_mesh(session.mesh):
        for index in range(batches):
            key_sample, key_rule = jax.random.split(jax.random.fold_in(base, index))
            texts = next(prompts)["prompt"]
            rollout = session.rollout(*session.encode(texts), key_sample)
            segments, _ = session.segments(rollout)
            batch = session.device_batch(rollout, segments)
            _, diagnostics = score(session.params, session.teacher_params, batch, key_rule)
            records.append({k: np.asarray(v).tolist() for k, v in diagnostics.items()})
            if scorer is not None:
                records[-1]["ideal"] = scorer.record(texts, rollout, segments["seg"], batch)
            print(f"  batch {index + 1}/{batches}", flush=True)
    summary = summarise(records) | {"seconds": time.perf_counter() - start, "label": label}
    if scorer is not None:
        compared = [r["ideal"] for r in records]
        summary["ideal"] = ideal_teacher.summarise_comparison(compared) | {"epsilon": epsilon}
    root = Path(config.run.dir)
    atomic_write_text(
        root / "profile.json", json.dumps({"summary": summary, "batches": records}) + "\n"
    )
    atomic_write_text(root / "profile.md", _markdown(summary, label))
    runs = {label: [records]}
    margin_advantage(runs, root / "plots" / "margin_advantage.png")
    margin_by_sentence(runs, root / "plots" / "margin_by_sentence.png")
    if scorer is not None:
        ideal_vs_teacher_by_sentence(summary, root / "plots" / "ideal_vs_teacher_by_sentence.png")
    print(_markdown(summary, label), flush=True)
    return summary
