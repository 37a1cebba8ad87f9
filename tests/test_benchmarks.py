"""The step profile of ``python3 -m benchmarks.opd_step --part profile`` accounts for the step.

On the tiny smoke shapes: every part of the update is timed, the parts and the remainder add
up to the whole step, and the step row carries XLA's memory of the compiled step (the
benchmark reports memory, it never guesses an out-of-memory). No timing is asserted.
"""

import json
import os
import subprocess
import sys

import pytest

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
