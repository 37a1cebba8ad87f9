"""Tests for opd_jax.train.metrics: JSONL records, truncation on resume, TensorBoard events."""

import errno
import os
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from opd_jax.train.metrics import MetricsWriter, read_metrics


def read_events(run_dir: Path) -> list[event_pb2.Event]:
    """Parses every TFRecord-framed event file under ``<run_dir>/tensorboard``."""
    events = []
    for path in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            events.append(event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length]))
            offset += 12 + length + 4
    return events


def scalar_values(events: list[event_pb2.Event]) -> dict[tuple[str, int], float]:
    return {(v.tag, e.step): v.simple_value for e in events for v in e.summary.value}


def test_write_appends_one_json_line_per_step(tmp_path):
    profile = np.linspace(0.0, 1.0, 20, dtype=np.float32)
    with MetricsWriter(tmp_path, (), enabled=True) as writer:
        writer.write(1, {"loss": np.float32(0.5), "accuracy": 1})
        writer.write(2, {"loss": 0.25}, {"position_profile": profile})
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2]
    assert records[0]["loss"] == 0.5 and records[0]["accuracy"] == 1.0
    np.testing.assert_allclose(records[1]["position_profile"], profile)
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def test_truncate_after_drops_later_steps_and_appends(tmp_path):
    with MetricsWriter(tmp_path, (), enabled=True) as writer:
        for step in range(1, 6):
            writer.write(step, {"loss": float(step)})
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "lo')  # A line torn by a crash.
    with MetricsWriter(tmp_path, (), enabled=True) as writer:
        writer.truncate_after(3)
        writer.write(4, {"loss": 40.0})
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [
        (1, 1.0),
        (2, 2.0),
        (3, 3.0),
        (4, 40.0),
    ]


def test_tensorboard_events_hold_scalars_and_per_bin_profile(tmp_path):
    with MetricsWriter(tmp_path, enabled=True) as writer:
        writer.write(3, {"loss": 0.5}, {"profile": np.arange(12, dtype=np.float32)})
    values = scalar_values(read_events(tmp_path))
    assert values[("loss", 3)] == 0.5
    assert values[("profile/00", 3)] == 0.0 and values[("profile/11", 3)] == 11.0


def test_truncate_after_purges_later_tensorboard_steps(tmp_path):
    with MetricsWriter(tmp_path, enabled=True) as writer:
        writer.write(5, {"loss": 1.0})
        writer.truncate_after(2)
    events = read_events(tmp_path)
    assert any(e.session_log.status == event_pb2.SessionLog.START and e.step == 3 for e in events)


def test_disabled_writer_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    with MetricsWriter(run_dir, enabled=False) as writer:
        writer.write(1, {"loss": 1.0}, {"profile": np.zeros(20)})
        writer.truncate_after(0)
    assert not run_dir.exists()
    assert read_metrics(run_dir) == []


@pytest.mark.parametrize(
    ("scalars", "arrays"),
    [({"step": 1.0}, None), ({"x": 1.0}, {"x": np.zeros(3)}), ({}, {"x": np.zeros((2, 2))})],
)
def test_write_rejects_reserved_duplicate_or_non_1d_metrics(tmp_path, scalars, arrays):
    with MetricsWriter(tmp_path, (), enabled=True) as writer:
        with pytest.raises(ValueError):
            writer.write(1, scalars, arrays)


def full_disk_after(monkeypatch, writes: int) -> None:
    """TensorBoard's record writes fail with ENOSPC after ``writes`` of them."""
    from tensorboardX import record_writer

    calls = iter(range(10**6))
    original = record_writer.RecordWriter.write

    def write(self, data):
        if next(calls) >= writes:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(self, data)

    monkeypatch.setattr(record_writer.RecordWriter, "write", write)


@pytest.mark.parametrize("writes", [0, 3])
def test_a_failing_tensorboard_warns_once_and_metrics_jsonl_stays_complete(
    tmp_path, monkeypatch, writes
):
    """0: the event file cannot even be started; 3: it fails after two steps' events."""
    full_disk_after(monkeypatch, writes)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with MetricsWriter(tmp_path, enabled=True) as writer:
            writer.truncate_after(0)
            for step in range(1, 6):
                writer.write(step, {"loss": float(step)}, {"profile": np.zeros(4)})
    tensorboard = [w for w in caught if "TensorBoard" in str(w.message)]
    assert len(tensorboard) == 1 and "No space left on device" in str(tensorboard[0].message)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]
