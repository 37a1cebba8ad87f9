"""Where an OPD step's time goes: sampling, scoring, and the update, for a run's config.

Builds the models, data and jitted functions of ``opd-jax train CONFIG`` and times, on one
fixed batch of prompts (median of repeats after a compiling warm-up):

- ``sample``: the student's rollouts (jitted prefill + while_loop decode);
- ``segment``: host decoding and NLTK sentence segmentation;
- ``score``: teacher and student forward passes, chunked scoring and the rule (no gradient);
- ``step``: the whole jitted update (scoring + backward + AdamW); ``update = step - score``.

Usage: ``python3 benchmarks/step_time.py [CONFIG] [--set KEY=VALUE ...] [--repeats N]``
(default ``configs/quickstart.yaml``); prints a table and writes
``benchmarks/results/step_time_<config>_<device>.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import jax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from opd_jax import core, data, sampling  # noqa: E402
from opd_jax.config import load_config  # noqa: E402
from opd_jax.train.loop import (  # noqa: E402
    _Batches,
    init_opt_state,
    load_pair,
    mesh_from_config,
    sampling_method,
    step_settings,
)
from opd_jax.train.optimizer import make_optimizer  # noqa: E402
from opd_jax.train.rollouts import encode_prompts, eos_ids, pad_id, response_segments  # noqa: E402
from opd_jax.train.step import make_train_step, response_hidden  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config", nargs="?", default="configs/quickstart.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    config = load_config(args.config, args.overrides)
    mesh = mesh_from_config(config)
    student, teacher, tokenizer = load_pair(config, mesh)
    graphdef, params = nnx.split(student, nnx.Param)
    teacher_graphdef, teacher_params = nnx.split(teacher, nnx.Param)
    tx = make_optimizer(config.optim, config.train.steps)
    opt_state = init_opt_state(tx, params, mesh)
    settings = step_settings(config)
    step_fn = make_train_step(graphdef, teacher_graphdef, tx, settings)
    batches = _Batches(mesh)
    source = data.load_source(
        config.data.source, config.data.split, config.data.data_dir, **config.data.arithmetic
    )
    prompts = next(
        data.make_prompt_iterator(source, batch_size=config.data.batch_size, seed=config.seed)
    )["prompt"]
    p = config.data.max_prompt_tokens
    tokens, mask = encode_prompts(tokenizer, prompts, p, chat_template=config.data.chat_template)
    key = jax.random.key(config.seed)

    def sample():
        return sampling.sample(
            student,
            *batches.to_device((tokens, mask)),
            key=key,
            max_new_tokens=config.sampling.max_new_tokens,
            method=sampling_method(config),
            eos_ids=eos_ids(tokenizer, student.config.eos_token_id),
            pad_id=pad_id(tokenizer),
            mesh=mesh,
        )

    rollout = sample()
    host = batches.to_host((rollout.tokens, rollout.response_mask, rollout.prompt_mask))

    def segment():
        return response_segments(
            tokenizer, host[0][:, p:], host[1][:, p:], config.segments.kind, config.segments.tokens
        )

    seg, _ = segment()
    batch = batches.to_device(
        {
            "tokens": host[0],
            "attention_mask": host[1] | host[2],
            "response_mask": host[1],
            "seg": seg,
        }
    )

    @jax.jit
    def score(params, teacher_params, batch):
        model, teach = nnx.merge(graphdef, params), nnx.merge(teacher_graphdef, teacher_params)
        h_s = response_hidden(model, batch["tokens"], batch["attention_mask"], p)
        h_t = response_hidden(teach, batch["tokens"], batch["attention_mask"], p)
        scored = core.score_chunked(
            h_s, model.unembed_matrix(), h_t, teach.unembed_matrix(), batch["tokens"][:, p:],
            k=settings.k, loss_kind=settings.loss, chunk_size=settings.chunk_size,
        )  # fmt: skip
        rule_batch = core.RuleBatch(scored.stats, batch["response_mask"][:, p:], batch["seg"])
        return core.RULES[settings.rule](
            rule_batch, key, **dict(settings.rule_options)
        ), scored.token_loss

    state = {"params": params, "opt_state": opt_state}

    def step():
        state["params"], state["opt_state"], metrics = step_fn(
            state["params"], state["opt_state"], teacher_params, batch, key
        )
        return metrics

    with jax.set_mesh(mesh):
        times = {
            "sample": common.median_seconds(sample, args.repeats),
            "segment": common.median_seconds(segment, args.repeats),
            "score": common.median_seconds(
                lambda: score(state["params"], teacher_params, batch), args.repeats
            ),
            "step": common.median_seconds(step, args.repeats),
        }
    times["update"] = max(times["step"] - times["score"], 0.0)
    total = times["sample"] + times["segment"] + times["step"]
    response_tokens = int(host[1].sum())
    rows = [
        {"phase": name, "seconds": times[name], "share": times[name] / total}
        for name in ("sample", "segment", "score", "update")
    ]
    rows.append({"phase": "total", "seconds": total, "share": 1.0})
    common.print_table(rows, ["phase", "seconds", "share"])
    rate = response_tokens / total
    print(f"{response_tokens} response tokens per step: {rate:.1f} tokens/s end to end")
    out = (
        Path(__file__).parent
        / "results"
        / f"step_time_{Path(args.config).stem}_{common.device_tag()}.json"
    )
    common.write_json(
        str(out),
        {
            "benchmark": "step_time",
            "config": args.config,
            "overrides": args.overrides,
            "batch_size": config.data.batch_size,
            "max_new_tokens": config.sampling.max_new_tokens,
            "response_tokens": response_tokens,
            "machine": common.machine(),
            "rows": rows,
            "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
