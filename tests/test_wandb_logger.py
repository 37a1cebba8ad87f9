"""run.loggers' wandb: offline W&B runs hold metrics.jsonl's values at its steps, a resumed run
continues its W&B run, a missing package is bad input named with its extra, failures warn."""

import json
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from test_train import overrides

from opd_jax import cli
from opd_jax.config import load_config
from opd_jax.errors import InputError
from opd_jax.experiment.plots import log_to_wandb
from opd_jax.train.loggers import WANDB_EXTRA, WANDB_ID_FILE, flat_scalars
from opd_jax.train.loop import Status, train
from opd_jax.train.metrics import MetricsWriter, read_metrics

BLOCK = 32768  # W&B's transaction log: LevelDB's log format in 32 KiB blocks
HEADER = b":W&B\xe1\xbe\x00"  # ident, magic 0xBEE1, version 0
FULL, LAST = 1, 4


@pytest.fixture
def wandb(tmp_path, monkeypatch):
    """The wandb module (the test is skipped without it), offline and quiet, its own files
    under ``tmp_path``."""
    module = pytest.importorskip("wandb")
    for key, value in {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_CONSOLE": "off",
        "WANDB_DIR": tmp_path / "wandb-home",
        "WANDB_CONFIG_DIR": tmp_path / "wandb-home" / "config",
        "WANDB_CACHE_DIR": tmp_path / "wandb-home" / "cache",
        "WANDB_DATA_DIR": tmp_path / "wandb-home" / "data",
    }.items():
        monkeypatch.setenv(key, str(value))
    return module


def read_records(path: Path) -> list:
    """The records of a ``run-<id>.wandb`` file (W&B's LevelDB-format log of protobufs)."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert data[: len(HEADER)] == HEADER
    records, chunks, pos = [], [], len(HEADER)
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        chunks.append(data[pos + 7 : pos + 7 + length])
        pos += 7 + length
        if kind in (FULL, LAST):
            records.append(Record.FromString(b"".join(chunks)))
            chunks = []
    return records


def offline_runs(run_dir: Path) -> list[dict]:
    """Each offline W&B run under ``run_dir/wandb``, in start order: its id, name, project,
    config and history rows (``{"_step": ..., key: value}``, nested keys joined by ``/``)."""
    runs = []
    for path in run_dir.glob("wandb/offline-run-*/run-*.wandb"):
        run = {"history": []}
        for record in read_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                r = record.run
                config = {u.key: json.loads(u.value_json) for u in r.config.update}
                run |= dict(id=r.run_id, name=r.display_name, project=r.project, config=config)
                run["start"] = r.start_time.ToNanoseconds()
            elif kind == "history":
                items = record.history.item
                row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}
                run["history"].append(row)
        runs.append(run)
    return sorted(runs, key=lambda run: run["start"])


def logged_scalars(rows: list[dict]) -> dict[int, dict[str, float]]:
    """``{step: {key: value}}`` of history rows, W&B's own ``_*`` keys left out."""
    return {row["_step"]: {k: v for k, v in row.items() if not k.startswith("_")} for row in rows}


def jsonl_scalars(run_dir: Path) -> dict[int, dict[str, float]]:
    """``{step: {key: value}}`` of metrics.jsonl, arrays as per-bin scalars ``<name>/<bin>``."""
    out = {}
    for record in read_metrics(run_dir):
        scalars = {k: v for k, v in record.items() if not isinstance(v, list)}
        arrays = {k: v for k, v in record.items() if isinstance(v, list)}
        del scalars["step"], scalars["time"]
        out[record["step"]] = dict(flat_scalars(scalars, arrays))
    return out


def test_a_resumed_run_continues_its_offline_wandb_run_with_metrics_jsonl_values(
    wandb, tiny_pair, tmp_path
):
    run_dir = tmp_path / "run"
    args = overrides(tiny_pair, run_dir, "train.steps=4", "run.loggers=[tensorboard,wandb]")
    stopped = train(load_config(None, args), stop_after=2)
    assert (stopped.status, stopped.step) == (Status.STOPPED, 2)
    assert train(load_config(None, args)).status is Status.FINISHED

    run_id = (run_dir / WANDB_ID_FILE).read_text().strip()
    first, resumed = offline_runs(run_dir)
    assert first["id"] == resumed["id"] == run_id
    assert first["name"] == run_dir.name and first["project"] == "opd_jax"
    assert first["config"]["train"] == {**first["config"]["train"], "steps": 4}
    assert sorted(logged_scalars(first["history"])) == [1, 2]
    assert sorted(logged_scalars(resumed["history"])) == [3, 4]
    logged = logged_scalars(first["history"]) | logged_scalars(resumed["history"])
    expected = jsonl_scalars(run_dir)
    assert logged.keys() == expected.keys() and "margin_by_position/19" in logged[4]
    for step, values in expected.items():
        assert logged[step].keys() == values.keys()
        np.testing.assert_allclose([logged[step][k] for k in values], list(values.values()))
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))  # both loggers


def test_without_the_wandb_package_asking_for_it_is_bad_input_before_models_load(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    missing = tmp_path / "no-model"  # loading it would fail: the logger check comes first
    args = [f"student.path={missing}", f"teacher.path={missing}", f"run.dir={tmp_path / 'run'}"]
    with pytest.raises(InputError, match=WANDB_EXTRA.replace("[", r"\[").replace("]", r"\]")):
        train(load_config(None, [*args, "run.loggers=[wandb]"]))
    config = tmp_path / "train.yaml"
    config.write_text(f"run: {{dir: {tmp_path / 'run'}, loggers: [wandb]}}\n")
    student, teacher = (f"{role}.path={missing}" for role in ("student", "teacher"))
    assert cli.main(["train", str(config), "--set", student, "--set", teacher]) == 2
    assert WANDB_EXTRA in capsys.readouterr().err
    with pytest.raises(InputError, match="wandb"):
        MetricsWriter(tmp_path / "direct", ["wandb"], enabled=True)


def test_wandb_is_imported_only_when_asked_for(tmp_path):
    code = f"""
import sys
from opd_jax.train.loop import train
from opd_jax.experiment import stages, plots
from opd_jax.train.metrics import MetricsWriter
with MetricsWriter({str(tmp_path)!r}, ["tensorboard"], enabled=True) as writer:
    writer.write(1, {{"loss": 1.0}})
assert "wandb" not in sys.modules, "wandb was imported"
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)


def test_a_run_started_again_from_step_0_starts_a_new_wandb_run(wandb, tmp_path):
    for _ in range(2):
        with MetricsWriter(tmp_path, ["wandb"], enabled=True) as writer:
            writer.truncate_after(0)  # no checkpoint: the loop starts from step 0
            writer.write(1, {"loss": 1.0})
    first, second = offline_runs(tmp_path)
    assert first["id"] != second["id"] == (tmp_path / WANDB_ID_FILE).read_text().strip()


def test_a_failing_wandb_warns_once_and_metrics_jsonl_stays_complete(wandb, tmp_path, monkeypatch):
    def init(**kwargs):
        raise wandb.errors.UsageError("No API key configured. Use `wandb login` to log in.")

    monkeypatch.setattr(wandb, "init", init)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with MetricsWriter(tmp_path, ["wandb"], enabled=True) as writer:
            for step in range(1, 4):
                writer.write(step, {"loss": float(step)})
    messages = [str(w.message) for w in caught if "W&B" in str(w.message)]
    assert len(messages) == 1 and "No API key configured" in messages[0]
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]


def test_the_experiment_plots_go_to_one_wandb_run_as_images(wandb, tmp_path):
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib import pyplot as plt

    paths = []
    for name in ("margin_advantage", "accuracy_vs_step"):
        fig, ax = plt.subplots()
        ax.plot([0, 1], [1, 0])
        paths.append(tmp_path / "plots" / f"{name}.png")
        paths[-1].parent.mkdir(exist_ok=True)
        fig.savefig(paths[-1])
        plt.close(fig)
    models = ["student.path=student", "teacher.path=teacher"]  # not read
    log_to_wandb(load_config(None, [*models, f"run.dir={tmp_path}", "run.loggers=[wandb]"]), paths)
    (run,) = offline_runs(tmp_path)
    assert run["name"] == f"{tmp_path.name}-report"
    (row,) = run["history"]
    for path in paths:
        assert row[f"{path.stem}/_type"] == "image-file"
        logged = next(tmp_path.glob(f"wandb/offline-run-*/files/{row[f'{path.stem}/path']}"))
        assert logged.read_bytes() == path.read_bytes()
    log_to_wandb(load_config(None, [*models, f"run.dir={tmp_path}", "run.loggers=[]"]), paths)
    assert len(offline_runs(tmp_path)) == 1  # without wandb in run.loggers: nothing
