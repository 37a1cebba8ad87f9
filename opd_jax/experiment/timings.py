"""Wall seconds of the experiment's stages, kept across invocations in ``timings.json``, each
with the commit of the code that ran it."""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from pathlib import Path
from typing import Any

from opd_jax.files import atomic_write_text


def git_commit() -> str | None:
    """The commit of the code that runs (``git rev-parse HEAD`` beside this package), or None
    where git or the repository is missing."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = result.stdout.strip()
    return commit if result.returncode == 0 and commit else None


class StageClock:
    """Wall seconds of each stage, kept in ``timings.json`` across invocations::

        {"models": {"seconds": 371.2, "invocations": [{"seconds": 371.0, "commit": "cec6..."},
                                                      {"seconds": 0.2, "commit": "cec6..."}]}}

    ``seconds`` sums the stage's invocations (one that skipped a finished stage adds its few
    seconds of checking), so a resumed experiment keeps the times of the runs that did the
    work. The file is rewritten atomically after each stage; an older file of bare seconds per
    stage is read as one invocation of unknown commit."""

    def __init__(self, path: Path) -> None:
        self.path, self.seconds = path, {}
        self.commit = git_commit()
        self.stages = {name: _stage_entry(value) for name, value in _read_json(path).items()}

    @contextlib.contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        yield
        self.record(stage, time.perf_counter() - start)

    def record(self, stage: str, seconds: float) -> None:
        """Adds an invocation of ``stage`` that took ``seconds`` (timed elsewhere, e.g. in a
        worker process) and rewrites the file."""
        self.seconds[stage] = seconds
        entry = self.stages.setdefault(stage, {"seconds": 0.0, "invocations": []})
        entry["invocations"].append({"seconds": seconds, "commit": self.commit})
        entry["seconds"] = sum(i["seconds"] for i in entry["invocations"])
        atomic_write_text(self.path, json.dumps(self.stages, indent=1) + "\n")
        print(f"  {stage}: {seconds:.0f} s", flush=True)

    def total(self) -> float:
        """Seconds of the stages this invocation ran."""
        return sum(self.seconds.values())


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else {}


def _stage_entry(value: float | dict[str, Any]) -> dict[str, Any]:
    if isinstance(value, dict):
        return value
    return {"seconds": float(value), "invocations": [{"seconds": float(value), "commit": None}]}
