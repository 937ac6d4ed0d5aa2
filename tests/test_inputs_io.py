"""Atomic writes: files follow the umask; stale temp files of interrupted writes are cleaned."""

import os
import stat

import pytest
import torch

from alignednorm.engine import io
from alignednorm.engine.io import clean_stale_temp_files, save_tensors, save_torch, write_json, write_text


@pytest.fixture(params=[0o022, 0o077, 0o002])
def umask(request):
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_written_files_follow_the_umask(tmp_path, umask):
    expected = 0o666 & ~umask
    written = [write_json(tmp_path / "metrics.json", {"a": 1}), write_text(tmp_path / "config.yaml", "a: 1\n"),
               save_tensors(tmp_path / "learnable.safetensors", {"w": torch.zeros(2)}),
               save_torch(tmp_path / "checkpoint.pt", {"epoch": 1})]
    assert {path.name: _mode(path) for path in written} == {path.name: expected for path in written}
    write_json(tmp_path / "metrics.json", {"a": 2})  # replacing a file: the new one follows the umask too
    assert _mode(tmp_path / "metrics.json") == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in written)  # no temp left


def test_few_shot_cache_follows_the_umask(json_dataset, tmp_path, umask):
    from alignednorm.data import few_shot_splits, load_splits

    cache = tmp_path / "cache"
    few_shot_splits(load_splits(json_dataset.spec, json_dataset.root), 2, 1, cache_dir=cache)
    (written,) = (cache / json_dataset.spec.name).iterdir()
    assert written.name == "shot_2-seed_1.json" and _mode(written) == 0o666 & ~umask


def test_failed_write_leaves_no_temp_file(tmp_path):
    def fail(tmp):
        tmp.write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        io.atomic_write(tmp_path / "metrics.json", fail)
    assert list(tmp_path.iterdir()) == []


def test_clean_stale_temp_files_removes_only_its_own(tmp_path):
    stale = [tmp_path / ".metrics.json.0a1b2c3d.tmp",  # this module's naming
             tmp_path / ".checkpoint.pt.k2_x9zqa.tmp"]  # tempfile.mkstemp's naming of earlier versions
    kept = [tmp_path / "metrics.json", tmp_path / "notes.tmp", tmp_path / ".metrics.json.tmp",
            tmp_path / ".metrics.json.0a1b2c3.tmp", tmp_path / ".metrics.json.0A1B2C3D.tmp",
            tmp_path / "metrics.json.0a1b2c3d.tmp", tmp_path / ".metrics.json.0a1b2c3d.tmp.bak"]
    for path in stale + kept:
        path.write_text("x")
    (tmp_path / ".run.json.deadbeef.tmp").mkdir()  # a folder, not a temp file
    nested = tmp_path / "sub" / ".metrics.json.0a1b2c3d.tmp"
    nested.parent.mkdir()
    nested.write_text("x")
    (tmp_path / ".config.yaml.feedface.tmp").symlink_to(tmp_path / "metrics.json")

    assert clean_stale_temp_files(tmp_path) == sorted(stale)
    assert not any(path.exists() for path in stale)
    assert all(path.exists() for path in kept) and nested.exists()
    assert (tmp_path / ".run.json.deadbeef.tmp").is_dir() and (tmp_path / ".config.yaml.feedface.tmp").is_symlink()
    assert clean_stale_temp_files(tmp_path) == []
    assert clean_stale_temp_files(tmp_path / "nowhere") == []


def test_clean_stale_temp_files_spares_recent_ones(tmp_path):
    old, fresh = tmp_path / ".metrics.json.00000001.tmp", tmp_path / ".metrics.json.00000002.tmp"
    old.write_text("x")
    fresh.write_text("x")
    os.utime(old, (1_000_000_000, 1_000_000_000))  # a fixed date in 2001: long stale, whatever the clock says
    assert clean_stale_temp_files(tmp_path, min_age_s=600) == [old]
    assert fresh.exists()


def test_an_interrupted_write_leaves_a_file_the_cleaner_recognises(tmp_path, monkeypatch):
    # A kill between the write and the rename: the temp file stays, named as the cleaner expects.
    monkeypatch.setattr(io.os, "replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    monkeypatch.setattr(io.Path, "unlink", lambda *a, **k: None)  # as if the process died at once
    with pytest.raises(KeyboardInterrupt):
        write_json(tmp_path / "metrics.json", {"a": 1})
    monkeypatch.undo()
    (left,) = tmp_path.iterdir()
    assert left.name.startswith(".metrics.json.") and left.name.endswith(".tmp")
    assert clean_stale_temp_files(tmp_path) == [left]
