"""`opd-jax convert` never destroys: an existing destination, the source, a run's models and a
run in use are refused; what it writes replaces the destination only once complete."""

import hashlib
import shutil
from pathlib import Path

import pytest

from opd_jax import cli
from opd_jax.convert import MARKER, replacing
from opd_jax.run_lock import hold


def _digest(root: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``root``."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _fake_run(root: Path, student: Path, teacher: Path) -> Path:
    """A run directory as convert recognises it: ``config.yaml`` naming its models, and
    ``checkpoints/`` (empty: the guard refuses before anything is restored)."""
    run = root / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(
        f"student: {{path: '{student}'}}\nteacher: {{path: '{teacher}'}}\n"
    )
    return run


def test_an_existing_destination_is_refused_without_overwrite_and_left_untouched(
    tiny_pair, tmp_path, capsys
):
    dst = tmp_path / "teacher"
    dst.mkdir()
    (dst / "model.safetensors").write_bytes(b"a model worth keeping")
    assert cli.main(["convert", str(tiny_pair / "student"), str(dst)]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert f"DST {dst} exists and is not empty" in err and "--overwrite" in err
    assert (dst / "model.safetensors").read_bytes() == b"a model worth keeping"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["teacher"]  # no temporary left


def test_overwrite_replaces_the_destination_with_a_complete_conversion(tiny_pair, tmp_path):
    dst = tmp_path / "orbax"
    dst.mkdir()
    (dst / "stale.txt").write_text("from an older conversion")
    assert cli.main(["convert", str(tiny_pair / "student"), str(dst), "--overwrite"]) == 0
    assert (dst / MARKER).is_file() and (dst / "params").is_dir()
    assert not (dst / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["orbax"]


def test_an_empty_destination_needs_no_overwrite(tiny_pair, tmp_path):
    dst = tmp_path / "orbax"
    dst.mkdir()
    assert cli.main(["convert", str(tiny_pair / "student"), str(dst)]) == 0
    assert (dst / MARKER).is_file()


def test_a_runs_teacher_is_refused_even_with_overwrite(tiny_pair, tmp_path, capsys):
    teacher = shutil.copytree(tiny_pair / "teacher", tmp_path / "models" / "teacher")
    run = _fake_run(tmp_path, tiny_pair / "student", teacher)
    before = _digest(teacher)
    for dst in (teacher, teacher.parent):  # the teacher, and a directory holding it
        assert cli.main(["convert", str(run), str(dst), "--overwrite"]) == cli.EXIT_USAGE
        err = capsys.readouterr().err
        assert f"DST {dst}" in err and "the run's teacher.path" in err
    assert _digest(teacher) == before


@pytest.mark.parametrize("where", ["same", "inside", "around"])
def test_the_source_is_refused_even_with_overwrite(tiny_pair, tmp_path, capsys, where):
    src = shutil.copytree(tiny_pair / "student", tmp_path / "models" / "student")
    dst = {"same": src, "inside": src / "tokenizer", "around": src.parent}[where]
    if where == "inside":
        dst.mkdir()
        (dst / "vocab.txt").write_text("part of the source")
    before = _digest(src)
    assert cli.main(["convert", str(src), str(dst), "--overwrite"]) == cli.EXIT_USAGE
    assert "the source" in capsys.readouterr().err
    assert _digest(src) == before


def test_a_new_folder_inside_the_source_is_allowed(tiny_pair, tmp_path):
    src = shutil.copytree(tiny_pair / "student", tmp_path / "student")
    before = _digest(src)
    assert cli.main(["convert", str(src), str(src / "orbax")]) == 0
    assert (src / "orbax" / "params").is_dir()
    shutil.rmtree(src / "orbax")
    assert _digest(src) == before


def test_a_run_directory_in_use_is_refused_even_with_overwrite(tiny_pair, tmp_path, capsys):
    dst = tmp_path / "busy_run"
    with hold(dst, "opd-jax train"):
        args = ["convert", str(tiny_pair / "student"), str(dst), "--overwrite"]
        assert cli.main(args) == cli.EXIT_USAGE
    assert "in use by `opd-jax train` (PID" in capsys.readouterr().err


def test_a_failed_write_leaves_the_old_destination_and_no_temporary(tmp_path):
    dst = tmp_path / "hf"
    dst.mkdir()
    (dst / "config.json").write_text("{}")
    with pytest.raises(RuntimeError, match="crash"), replacing(dst) as out:
        (out / "config.json").write_text('{"half": "written"}')
        raise RuntimeError("crash mid-write")
    assert (dst / "config.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
