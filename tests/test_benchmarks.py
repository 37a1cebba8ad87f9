"""The step profile of ``python3 -m benchmarks.opd_step --part profile`` accounts for the step.

On the tiny smoke shapes: every part of the update is timed, the parts and the remainder add
up to the whole step, and the step row carries XLA's memory of the compiled step (the
benchmark reports memory, it never guesses an out-of-memory). No timing is asserted.
"""

import json
import os
import signal
import subprocess
import sys

import pytest
from flax import nnx

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)  # where ``-m benchmarks.NAME`` runs
PARTS = (
    "teacher forward", "student forward", "student forward+backward", "scoring forward",
    "scoring forward+backward", "rule, loss, diagnostics", "optimizer", "matmul [BN,D]@[D,V]",
    "step - parts", "step",
)  # fmt: skip
SUMMED = (
    "teacher forward", "student forward+backward", "scoring forward+backward",
    "rule, loss, diagnostics", "optimizer", "step - parts",
)  # fmt: skip


@pytest.fixture(scope="module")
def profile_rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "opd_step.json"
    command = [sys.executable, "-m", "benchmarks.opd_step", "--smoke"]
    command += ["--part", "profile", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| part | seconds |" in done.stdout  # the table is printed
    (run,) = json.loads(out.read_text())["runs"].values()
    return {row["part"]: row for row in run["rows"]}


def test_opd_jax_scores_the_whole_vocabulary_as_its_peer_does(tmp_path):
    """The checkpoints' tiny tokenizer must not shrink opd_jax's logits (``models.load`` fits
    a model to its tokenizer): both frameworks score every row of the embedding."""
    sys.path.insert(0, ROOT)
    from benchmarks.opd_sides import SHAPES, JaxSide, build_checkpoints

    dirs = build_checkpoints(str(tmp_path), "tiny", "float32")
    side = JaxSide(dirs, "float32", chunk=0, remat=False, attention="auto")
    student = nnx.merge(side.graphdef, side.fresh_params())
    teacher = nnx.merge(side.teacher_graphdef, side.teacher_params)
    for model in (student, teacher):
        assert model.unembed_matrix().shape[1] == SHAPES["tiny-llama"]["vocab_size"] == 2048


def test_every_part_of_the_step_is_timed(profile_rows):
    assert tuple(profile_rows) == PARTS
    assert all(profile_rows[p]["seconds"] > 0 for p in PARTS if p != "step - parts")


def test_the_parts_and_the_remainder_add_up_to_the_step(profile_rows):
    total = sum(profile_rows[p]["seconds"] for p in SUMMED)
    assert total == pytest.approx(profile_rows["step"]["seconds"], rel=1e-9)
    assert profile_rows["step"]["step_frac"] == 1.0


def test_the_step_row_reports_xla_memory(profile_rows):
    step = profile_rows["step"]
    assert step["xla_peak_gib"] > step["xla_temp_gib"] > 0


def test_the_release_aware_sampling_benchmark_compares_both_sessions(tiny_pair, tmp_path):
    """``python3 -m benchmarks.stop_at_release`` on the tiny pair (a setting where the rule
    fires): both sessions' medians, fewer tokens sampled online, the replayed agreement and the
    options sweep. No timing is asserted."""
    out = tmp_path / "stop.json"
    sets = [
        f"student.path={tiny_pair / 'student'}", f"teacher.path={tiny_pair / 'teacher'}",
        f"data.data_dir={tiny_pair / 'data'}", f"run.dir={tmp_path / 'run'}",
        "data.batch_size=4", "data.max_prompt_tokens=96", "sampling.max_new_tokens=24",
        "data.arithmetic={train_size: 32, test_size: 4, test_long_size: 4, test_unseen_op_size: 4}",
        "sampling.compact_every=4", "segments.kind=token", "sampling.stop_min_gain=0",
        "rule.options={min_segments: 1, penalty: 0.0}", "score.chunk_size=16",
    ]  # fmt: skip
    command = [sys.executable, "-m", "benchmarks.stop_at_release", "--steps", "1"]
    command += ["--warmup", "0", "--out", str(out)] + [f"--set={x}" for x in sets]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    offline, online = result["median"]["offline"], result["median"]["online"]
    assert online["sampled_tokens"] < offline["sampled_tokens"]
    assert online["kept_tokens"] <= online["sampled_tokens"]
    assert result["sampled_tokens_reduction"] > 0 and result["agreement"]["rows"] == 4
    assert len(result["options_sweep"]) == 15


@pytest.fixture(scope="module")
def isolated_run(tmp_path_factory):
    """One smoke case of ``--part scaling`` on the CPU preset (isolated by default), run with
    ``OPD_JAX_HEAP=system``, which the workers inherit."""
    out = tmp_path_factory.mktemp("bench") / "opd_step.json"
    command = [sys.executable, "-m", "benchmarks.opd_step", "--smoke", "--part", "scaling"]
    command += ["--pair", "tiny-qwen3", "--only", "batch", "--batches", "2", "--out", str(out)]
    env = os.environ | {"OPD_JAX_HEAP": "system"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "peak_rss_ratio |" in done.stdout  # the table shows the peaks
    (run,) = json.loads(out.read_text())["runs"].values()
    return run


def test_isolated_rows_carry_each_frameworks_peak_rss_and_their_ratio(isolated_run):
    (row,) = isolated_run["rows"]
    assert isolated_run["settings"]["isolate"] is True
    assert row["opd_jax_status"] == row["torch_status"] == "ok"
    for name in ("opd_jax", "torch"):
        result = row[f"{name}_result"]
        assert 0 < result["rss_before_gib"] <= row[f"{name}_peak_rss_gib"]
        assert 0 < result["steps_peak_rss_gib"] <= row[f"{name}_peak_rss_gib"]
        assert row[f"{name}_malloc"] == "system"  # each worker's own, from the environment
    ratio = row["opd_jax_peak_rss_gib"] / row["torch_peak_rss_gib"]
    assert row["peak_rss_ratio"] == pytest.approx(ratio)
    assert row["opd_jax_peak_gib"] > 0  # XLA's analysis, as before


def test_a_worker_killed_by_the_kernel_is_recorded_as_out_of_memory():
    from benchmarks import isolated_workers

    worker = isolated_workers.Worker()
    worker.process.send_signal(signal.SIGKILL)  # as the kernel's out-of-memory killer does
    assert worker.ask("run")["status"] == "oom"
    worker.close()


def test_the_kernels_benchmark_times_both_frameworks_per_kernel(tmp_path):
    out = tmp_path / "kernels.json"
    command = [sys.executable, "-m", "benchmarks.kernels", "--quick", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    ((key, run),) = json.loads(out.read_text())["runs"].items()
    assert key.startswith("quick/") and "commit" in run["machine"]
    kinds = {row["kind"] for row in run["rows"]}
    assert kinds == {"gemm", "attention", "stream"}
    for row in run["rows"]:
        assert row["opd_jax_gflop_s"] > 0 and row["torch_gflop_s"] > 0
