"""Atomic writes: the target is replaced whole or not at all, and no temp file is left behind."""
from __future__ import annotations

import json

import pytest

from osum import fileio


def test_write_and_failed_write(tmp_path):
    target = tmp_path / "sub" / "out.jsonl"
    fileio.write_jsonl(target, [{"a": 1}, {"b": "é"}])
    assert [json.loads(line) for line in target.read_text(encoding="utf-8").splitlines()] == [{"a": 1}, {"b": "é"}]
    with pytest.raises(RuntimeError):
        with fileio.atomic_path(target) as tmp:
            tmp.write_text("half a fi")
            raise RuntimeError("crash mid-write")
    assert json.loads(target.read_text(encoding="utf-8").splitlines()[0]) == {"a": 1}
    assert [p.name for p in target.parent.iterdir()] == ["out.jsonl"]
    assert oct(target.stat().st_mode & 0o777) == "0o644"


def test_atomic_dir_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "model"
    with fileio.atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("first")
    with pytest.raises(RuntimeError):
        with fileio.atomic_dir(target) as tmp:
            (tmp / "a.txt").write_text("second, half done")
            raise RuntimeError("crash mid-write")
    assert (target / "a.txt").read_text() == "first"
    with fileio.atomic_dir(target) as tmp:
        (tmp / "b.txt").write_text("second")
        (tmp / "b.txt").chmod(0o600)  # as safetensors writes its files
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]  # replaced whole, not merged
    assert oct(target.stat().st_mode & 0o777) == "0o755" and oct((target / "b.txt").stat().st_mode & 0o777) == "0o644"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temp or old folder left
