"""Where an OPD step's time goes: sampling, scoring, and the update, for a run's config.

Builds the models, data and jitted functions of ``opd-jax train CONFIG`` and times, on one
fixed batch of prompts (median of repeats after a compiling warm-up):

- ``sample``: the student's rollouts (jitted prefill + while_loop decode);
- ``segment``: host decoding and NLTK sentence segmentation;
- ``score``: teacher and student forward passes, chunked scoring and the rule (no gradient);
- ``step``: the whole jitted update (scoring + backward + AdamW); ``update = step - score``.

Usage: ``python3 -m benchmarks.step_time [CONFIG] [--set KEY=VALUE ...] [--repeats N]``
(default ``configs/smollm2_layers.yaml``); prints a table and writes
``benchmarks/results/step_time_<config>_<device>.json``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
from flax import nnx

from benchmarks import common
from opd_jax import core, data
from opd_jax.config import load_config
from opd_jax.train.session import Session, step_settings


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python3 -m benchmarks.step_time", description=__doc__.split("\n")[0]
    )
    parser.add_argument("config", nargs="?", default="configs/smollm2_layers.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    config = load_config(args.config, args.overrides)
    session = Session.build(config)
    source = data.load_source(
        config.data.source, config.data.split, config.data.data_dir, **config.data.arithmetic
    )
    iterator = data.make_prompt_iterator(
        source, batch_size=config.data.batch_size, seed=config.seed
    )
    tokens, mask = session.encode(next(iterator)["prompt"])
    key = jax.random.key(config.seed)
    p = session.prompt_len
    rollout = session.rollout(tokens, mask, key)
    seg, _ = session.segments(rollout)
    batch = session.device_batch(rollout, seg)
    graphdef = session.graphdef

    objective = step_settings(config).objective

    @jax.jit
    def score(params, teacher_params, batch):
        """Both forwards and the objective (scoring, rule, loss, diagnostics), no gradient."""
        model = nnx.merge(graphdef, params)
        teach = nnx.merge(session.teacher_graphdef, teacher_params)
        h_s = model.response_hidden(batch["tokens"], batch["attention_mask"], p)
        h_t = teach.response_hidden(batch["tokens"], batch["attention_mask"], p)
        return core.opd_objective(
            h_s, model.unembed_matrix(), h_t, teach.unembed_matrix(), batch["tokens"][:, p:],
            batch["response_mask"][:, p:], batch["seg"], key, objective,
        )  # fmt: skip

    with jax.set_mesh(session.mesh):
        times = {
            "sample": common.median_seconds(
                lambda: session.rollout(tokens, mask, key), args.repeats
            ),
            "segment": common.median_seconds(lambda: session.segments(rollout), args.repeats),
            "score": common.median_seconds(
                lambda: score(session.params, session.teacher_params, batch), args.repeats
            ),
            "step": common.median_seconds(lambda: session.update(batch, key), args.repeats),
        }
    times["update"] = max(times["step"] - times["score"], 0.0)
    total = times["sample"] + times["segment"] + times["step"]
    response_tokens = int(rollout[1].sum())
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
