"""LoRA students (``student.lora``): only the adapters train, are checkpointed and resume
exactly; the base stays as on disk; the export merges them into weights transformers loads."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from test_train import overrides

from opd_jax import models
from opd_jax.config import ConfigError, load_config
from opd_jax.convert import convert
from opd_jax.errors import InputError
from opd_jax.memory_plan import GIB, format_plan, plan
from opd_jax.models.lora import apply_lora, has_lora
from opd_jax.train.checkpoint import restore_student
from opd_jax.train.loop import Status, train
from opd_jax.train.metrics import read_metrics
from tests.xla_flags import with_devices

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TARGETS = r".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj).*"
LORA = ("student.lora.rank=4", "student.lora.alpha=8")
TOKENS = np.arange(2, 26).reshape(2, 12)

# qwix 0.1.8 uses `Variable.value`, `VariableState` and `Module.iter_modules()`, which flax
# 0.12 deprecates.
pytestmark = [
    pytest.mark.filterwarnings("ignore:'.value' access is now deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:'VariableState' was removed:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:The 'm.iter_modules:DeprecationWarning"),
]


def numpy(tree):
    return {path: np.asarray(v[...]) for path, v in nnx.to_flat_state(tree)}


def adapter_names(model) -> set[str]:
    return {path[-1] for path, _ in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))}


def test_adapters_at_init_leave_the_logits_unchanged(tiny_pair):
    model, _ = models.load(tiny_pair / "student")
    adapted = apply_lora(model, 4, 8.0, TARGETS)
    np.testing.assert_array_equal(adapted(TOKENS), model(TOKENS))
    assert adapter_names(adapted) == {p + s for p in PROJECTIONS for s in ("_lora_a", "_lora_b")}
    for path, value in numpy(nnx.state(adapted, nnx.LoRAParam)).items():
        assert (value == 0).all() == path[-1].endswith("_lora_b")  # B zero, A random
    assert not has_lora(model) and apply_lora(model, 0, 8.0, TARGETS) is model
    # decoding multiplies an adapted projection as stored, never side by side with others
    assert adapted.fused_projections() is None and model.fused_projections() is not None


def test_targets_choose_the_projections(tiny_pair):
    model, _ = models.load(tiny_pair / "student")
    adapted = apply_lora(model, 2, 4.0, r".*mlp/(up|down)_proj")
    assert adapter_names(adapted) == {"up_proj_lora_a", "up_proj_lora_b"} | {
        "down_proj_lora_a",
        "down_proj_lora_b",
    }
    with pytest.raises(InputError, match="matches no projection"):
        apply_lora(model, 2, 4.0, "lm_head")


@pytest.fixture(scope="module")
def runs(tiny_pair, tmp_path_factory):
    """LoRA runs of 4 steps, straight and stopped after 2 then resumed, and a full
    fine-tuning run of 1 step; each with its last live session."""
    root = tmp_path_factory.mktemp("lora_runs")
    out = {}

    def run(name, *extra, stop_after=None):
        sessions = []
        config = load_config(None, overrides(tiny_pair, root / name, *extra))
        result = train(config, stop_after=stop_after, on_step=lambda n, s: sessions.append(s))
        out[name] = (root / name, sessions[-1])
        return result

    assert run("straight", *LORA, "train.steps=4").status == Status.FINISHED
    assert run("resumed", *LORA, "train.steps=4", stop_after=2).status == Status.STOPPED
    assert run("resumed", *LORA, "train.steps=4").status == Status.FINISHED
    run("full", "train.steps=1")
    return out


def test_opd_steps_train_only_the_adapters(runs, tiny_pair):
    _, session = runs["straight"]
    trained = numpy(session.state.params)
    assert {path[-1] for path in trained} == {
        p + s for p in PROJECTIONS for s in ("_lora_a", "_lora_b")
    }
    on_disk, _ = models.load(tiny_pair / "student")
    base = numpy(nnx.state(on_disk, nnx.Param))
    frozen = numpy(session.frozen)
    assert frozen.keys() == base.keys()
    for path, value in base.items():
        np.testing.assert_array_equal(frozen[path], value)
    init = numpy(nnx.state(apply_lora(on_disk, 4, 8.0, TARGETS), nnx.LoRAParam))
    for path, value in trained.items():
        assert not np.array_equal(value, init[path]), path  # every adapter moved


def test_checkpoints_hold_only_the_adapters(runs):
    def saved(run_dir):
        step = max(int(p.name) for p in (run_dir / "checkpoints").iterdir())
        directory = run_dir / "checkpoints" / str(step)
        tree = ocp.StandardCheckpointer().metadata(directory / "state").item_metadata
        paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
        size = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
        return paths, size

    lora_paths, lora_size = saved(runs["straight"][0])
    params = [p for p in lora_paths if p.startswith("['params']")]
    assert len(params) == 2 * len(PROJECTIONS)
    assert all("_lora_" in p for p in lora_paths if "['mu']" in p or "['params']" in p)
    full_paths, full_size = saved(runs["full"][0])
    assert any("['embed']" in p for p in full_paths)
    assert lora_size < full_size / 2, (lora_size, full_size)


def test_resume_matches_an_uninterrupted_run_bit_for_bit(runs):
    (straight_dir, straight), (resumed_dir, resumed) = runs["straight"], runs["resumed"]
    losses = [[line["loss"] for line in read_metrics(d)] for d in (straight_dir, resumed_dir)]
    assert losses[0] == losses[1] and len(losses[0]) == 4
    for a, b in zip(jax.tree.leaves(straight.state), jax.tree.leaves(resumed.state), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_resume_with_another_rank_is_refused_even_with_allow_changes(runs, tiny_pair, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(runs["straight"][0], run_dir)
    before = (run_dir / "config.yaml").read_text()
    extra = ("student.lora.rank=2", "train.steps=6", "run.allow_changes=true")
    with pytest.raises(ConfigError, match="student.lora.rank"):
        train(load_config(None, overrides(tiny_pair, run_dir, *extra)))
    assert (run_dir / "config.yaml").read_text() == before  # refused before anything is written


def test_export_merges_the_adapters_into_weights_transformers_loads(runs, tiny_pair, tmp_path):
    run_dir, session = runs["straight"]
    adapted = nnx.merge(session.graphdef, session.params)
    convert(run_dir, tmp_path / "hf")
    exported, _ = models.load(tmp_path / "hf")
    restored, _ = restore_student(run_dir)
    assert not has_lora(exported) and not has_lora(restored)
    want = np.asarray(adapted(TOKENS))
    np.testing.assert_allclose(exported(TOKENS), want, rtol=0, atol=2e-5)
    np.testing.assert_allclose(restored(TOKENS), want, rtol=0, atol=2e-5)
    on_disk, _ = models.load(tiny_pair / "student")
    assert not np.allclose(exported(TOKENS), on_disk(TOKENS))  # the adapters did something

    import torch
    import transformers

    torch_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        logits = torch_model(torch.as_tensor(TOKENS)).logits.numpy()
    np.testing.assert_allclose(logits, want, rtol=0, atol=1e-4)


def test_plan_counts_the_adapters_optimizer_state_against_full_fine_tuning(runs, tiny_pair):
    _, session = runs["straight"]
    result = plan(load_config(None, overrides(tiny_pair, "unused", *LORA)))
    rows, lora = result["gib_per_device"], result["lora"]
    opt_bytes = sum(x.nbytes for x in jax.tree.leaves(session.state.opt_state))
    assert round(rows["optimizer_state"] * GIB) == opt_bytes
    assert lora["optimizer_gib"] == rows["optimizer_state"]
    assert round(rows["student_params"] * GIB) == sum(
        x.nbytes for x in jax.tree.leaves(session.params)
    )
    adapters = sum(x.size for x in jax.tree.leaves(session.state.params))
    assert lora["trained_parameters"] == adapters < lora["full_parameters"] / 5
    assert lora["full_finetune_optimizer_gib"] > 5 * lora["optimizer_gib"]
    assert "LoRA rank 4" in format_plan(result)


def test_adapters_are_sharded_like_their_weights_on_a_mesh(tiny_pair):
    script = textwrap.dedent(
        f"""
        import json
        import numpy as np
        from flax import nnx
        from opd_jax import models
        from opd_jax.models.lora import apply_lora
        from opd_jax.sharding import make_mesh

        mesh = make_mesh({{"data": 2, "fsdp": 2, "tensor": 2}})
        base, _ = models.load({str(tiny_pair / "student")!r}, mesh=mesh)
        adapted = apply_lora(base, 4, 8.0, {TARGETS!r})
        specs = {{
            "/".join(map(str, path)): [str(a) for a in v[...].sharding.spec]
            for path, v in nnx.to_flat_state(nnx.state(adapted, nnx.LoRAParam))
        }}
        tokens = np.arange(2, 26).reshape(2, 12)
        same = bool((np.asarray(adapted(tokens)) == np.asarray(base(tokens))).all())
        print(json.dumps({{"specs": specs, "same": same}}))
        """
    )
    env = os.environ | {"XLA_FLAGS": with_devices(8)}
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    specs = result["specs"]
    assert result["same"]
    assert specs["layers/0/attn/q_proj_lora_a"] == ["fsdp", "None"]
    assert specs["layers/0/attn/q_proj_lora_b"] == ["None", "tensor"]
    assert specs["layers/0/attn/o_proj_lora_a"] == ["tensor", "None"]
    assert specs["layers/0/mlp/down_proj_lora_b"] == ["None", "fsdp"]
