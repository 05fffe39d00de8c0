"""Atomic rewrites: the old contents or the new, never half, and no temporary file left behind."""

import os

import pytest

from eagle_fast import atomic


def test_a_rewrite_replaces_the_file_whole(tmp_path):
    path = tmp_path / "f.json"
    path.write_text("old")
    atomic.write_json(str(path), {"a": 1})
    assert path.read_text() == '{"a": 1}' and os.listdir(tmp_path) == ["f.json"]


def test_a_failed_write_leaves_the_old_contents_and_no_temporary_file(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")

    def lines():
        yield "half"
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic.write_lines(str(path), lines())
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["f.txt"]
