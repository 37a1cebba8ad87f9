"""Release-aware sampling against sampling to the end: step time, sampled, scored and kept
tokens, and where the online cut lands against the offline one.

Two sessions of one config, ``sampling.stop_at_release`` false (offline: the rule cuts the
finished rollouts in the step) and true (online: rows stop once their cut is certain), run the
same steps on the same prompts and keys, alternating, and each step is timed whole (rollouts,
segments, the update). Then, untimed, the online session samples the same rows to their end
with its watcher scoring every token and stopping none, and
:func:`opd_jax.core.replay_online` finds on those rollouts where each row would have stopped
and at which sentence it would have been cut, against the offline rule on the whole rows (a
row's tokens are a function of the key, its index and its position: the stopped rollout is a
prefix of the whole one).

Usage: ``python3 -m benchmarks.stop_at_release [CONFIG] [--set KEY=VALUE ...] [--steps N]
[--warmup N] [--case NAME] [--out FILE]``; prints tables and writes
``benchmarks/results/stop_at_release_<case>_<device>.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter

import jax
import numpy as np
from flax import nnx

from benchmarks import common
from opd_jax import core, data, sampling
from opd_jax.config import load_config
from opd_jax.models import pad_id
from opd_jax.train.session import Session

NEVER = 1e30  # a BIC gain no series reaches: the watcher scores every token, stops no row


def timed_step(session: Session, tokens, mask, key, rule_key) -> dict[str, float]:
    """One whole step (rollouts, segments, update) and its token counts."""
    start = time.perf_counter()
    rollout = session.rollout(tokens, mask, key)
    sampled = time.perf_counter()
    seg, _ = session.segments(rollout)
    batch = session.device_batch(rollout, seg)
    segmented = time.perf_counter()
    metrics = jax.device_get(session.update(batch, rule_key))
    end = time.perf_counter()
    phases = {"sample_s": sampled - start, "segment_s": segmented - sampled}
    phases["update_s"], seconds = end - segmented, end - start
    counts = session.token_counts(rollout, seg, metrics)
    # decoding runs until its last row ends: its iterations are the longest row's tokens
    longest = float(rollout[1].sum(-1).max())
    return {"step_s": seconds, **phases, **counts, "longest_row": longest}


def replayed_cuts(session: Session, tokens, mask, key) -> dict[str, np.ndarray]:
    """The online rule replayed on rollouts sampled to their end: per row, whether it would
    have stopped, the sentences complete then, its online and offline cuts (kept tokens)."""
    c = session.config
    watch = session.release_watch()
    watch.online = tuple((k, NEVER if k == "min_gain" else v) for k, v in watch.online)
    rollout = session.rollout(tokens, mask, key, watch=watch)
    p = session.prompt_len
    seg = session.segments(rollout)[0]["seg"]
    response = rollout[1][:, p:]
    _, changepoint = sampling.split_release_options(c.rule.options)
    means, count = sampling.release_watch.segment_means_host(watch.margin, seg, seg.shape[1])
    online = dict(confirm=c.sampling.stop_confirm, min_gain=c.sampling.stop_min_gain)
    replay = jax.device_get(core.replay_online(means, count, **online, **changepoint))
    offline_tau, released, _ = jax.device_get(core.bic_split(means, count, **changepoint))
    length = response.sum(-1)
    first = sampling.release_watch.first_token_of
    return {
        "means": means,
        "count": count,
        "seg": seg,
        "length": length,
        "stopped": replay.stopped,
        # a stopped row samples at least its complete sentences (and up to a look more)
        "sampled_at_least": np.where(replay.stopped, first(seg, replay.seen, length), length),
        "released": released | replay.stopped,
        "online_tau": replay.tau,
        "offline_tau": offline_tau,
        "online_keep": np.where(replay.stopped | released, first(seg, replay.tau, length), length),
        "offline_keep": np.where(released, first(seg, offline_tau, length), length),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python3 -m benchmarks.stop_at_release", description=__doc__.split("\n")[0]
    )
    parser.add_argument("config", nargs="?", help="a training config (default: the defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", help="the result file (default: benchmarks/results/...)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps of each session")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first steps (compiles)")
    parser.add_argument("--case", default=None, help="name in the result file (config stem)")
    args = parser.parse_args()
    overrides = [*args.overrides, "rule.kind=release"]
    offline = Session.build(
        load_config(args.config, [*overrides, "sampling.stop_at_release=false"])
    )
    online = Session.build(load_config(args.config, [*overrides, "sampling.stop_at_release=true"]))
    config = online.config
    source = data.load_source(
        config.data.source, config.data.split, config.data.data_dir, **config.data.arithmetic
    )
    prompts = data.make_prompt_iterator(source, batch_size=config.data.batch_size, seed=config.seed)
    steps, replays = {"offline": [], "online": []}, []
    for i in range(args.warmup + args.steps):
        tokens, mask = online.encode(next(prompts)["prompt"])
        key, rule_key = jax.random.split(jax.random.key(i))
        with jax.set_mesh(online.mesh):
            replays.append(replayed_cuts(online, tokens, mask, key))
            for name, session in (("offline", offline), ("online", online)):
                row = timed_step(session, tokens, mask, key, rule_key)
                if i >= args.warmup:
                    steps[name].append(row)
        print(f"step {i + 1}: " + ", ".join(f"{n} {steps[n][-1]['step_s']:.2f} s" for n in steps
                                             if i >= args.warmup), flush=True)  # fmt: skip
    med = {
        name: {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        for name, rows in steps.items()
    }
    table = [{"session": name, **values} for name, values in med.items()]
    columns = ["session", "step_s", "sample_s", "segment_s", "update_s", "sampled_tokens"]
    columns += ["scored_tokens", "kept_tokens", "longest_row"]
    common.print_table(table, columns)
    agreement = agreement_summary(replays)
    _, changepoint = sampling.split_release_options(config.rule.options)
    options = sweep(replays, config.sampling.compact_every, changepoint)
    columns = ["confirm", "min_gain", "stopped", "same_cut", "kept_ratio", "sampled_fraction"]
    common.print_table(options, columns)
    reduction = 1 - med["online"]["sampled_tokens"] / med["offline"]["sampled_tokens"]
    step_saving = 1 - med["online"]["step_s"] / med["offline"]["step_s"]
    print(
        f"sampled_tokens_reduction {reduction:.3f}, step time saved {step_saving:.3f}; online "
        f"cut = offline cut on {agreement['same_cut_of_released']:.3f} of released rows; kept "
        f"tokens online/offline {agreement['kept_ratio']:.3f}"
    )
    case = args.case or (args.config or "defaults").rsplit("/", 1)[-1].removesuffix(".yaml")
    out = args.out or common.result_path(f"stop_at_release_{case}")
    common.write_json(
        out,
        {
            "benchmark": "stop_at_release",
            "config": args.config,
            "overrides": args.overrides,
            "batch_size": config.data.batch_size,
            "max_new_tokens": config.sampling.max_new_tokens,
            "stop_confirm": config.sampling.stop_confirm,
            "stop_min_gain": config.sampling.stop_min_gain,
            "steps": args.steps,
            "median": med,
            "per_step": steps,
            "sampled_tokens_reduction": reduction,
            "step_time_saved": step_saving,
            "agreement": agreement,
            "options_sweep": options,
            "machine": common.machine(),
            "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
    )
    print(f"wrote {out}")


def sweep(replays: list[dict[str, np.ndarray]], compact_every: int, changepoint) -> list[dict]:
    """The online rule's options against what they cost and keep, replayed on the same whole
    rollouts: rows stopped, the same cut as offline (of rows either releases), kept tokens
    online / offline, and the sampled fraction (a row stops at the first look, every
    ``compact_every`` tokens, after its deciding sentence has begun)."""
    cat = {k: np.concatenate([r[k] for r in replays]) for k in ("means", "count", "seg", "length")}
    means, count, seg, length = cat["means"], cat["count"], cat["seg"], cat["length"]
    first = sampling.release_watch.first_token_of
    offline_tau, released, _ = jax.device_get(core.bic_split(means, count, **changepoint))
    offline_keep = np.where(released, first(seg, offline_tau, length), length)
    rows = []
    for confirm in (0, 1, 2):
        for min_gain in (0.0, 3.0, 5.0, 8.0, 12.0):
            r = jax.device_get(
                core.replay_online(means, count, confirm=confirm, min_gain=min_gain, **changepoint)
            )
            either = r.stopped | released
            keep = np.where(either, first(seg, r.tau, length), length)
            begun = first(seg, r.seen, length)
            look = 1 + compact_every * -(-begun // compact_every)
            sampled = np.where(r.stopped, np.minimum(look, length), length)
            rows.append(
                {
                    "confirm": confirm,
                    "min_gain": min_gain,
                    "stopped": float(r.stopped.mean()),
                    "same_cut": (
                        float((r.tau == offline_tau)[either].mean()) if either.any() else np.nan
                    ),
                    "kept_ratio": float(keep.sum() / max(offline_keep.sum(), 1)),
                    "sampled_fraction": float(sampled.sum() / max(length.sum(), 1)),
                }
            )
    return rows


def agreement_summary(replays: list[dict[str, np.ndarray]]) -> dict[str, object]:
    """Over all replayed rows: how often the online cut is the offline one (among rows either
    releases), the distribution of the difference in sentences, and kept tokens compared."""
    keys = ("length", "stopped", "released", "online_tau", "offline_tau", "online_keep",
            "offline_keep", "sampled_at_least")  # fmt: skip
    cat = {k: np.concatenate([r[k] for r in replays]) for k in keys}
    released = cat["released"]
    diff = (cat["online_tau"] - cat["offline_tau"])[released]
    per_step = [r["online_keep"].sum() / max(r["offline_keep"].sum(), 1) for r in replays]
    return {
        "rows": int(len(released)),
        "released_rows": int(released.sum()),
        "stopped_rows": int(cat["stopped"].sum()),
        "same_cut_of_released": float(np.mean(diff == 0)) if diff.size else float("nan"),
        "cut_difference_sentences": {int(k): int(v) for k, v in sorted(Counter(diff).items())},
        "kept_ratio": float(cat["online_keep"].sum() / max(cat["offline_keep"].sum(), 1)),
        "kept_ratio_per_step": [float(x) for x in per_step],
        "sampled_fraction_at_least": float(
            cat["sampled_at_least"].sum() / max(cat["length"].sum(), 1)
        ),
    }


if __name__ == "__main__":
    main()
