"""Writing a file so that a reader (or a run killed mid-write) sees the old contents or the new,
never half: a temporary file in the same folder, flushed and fsynced, then renamed over the target.
A leaf module, used wherever a manifest, pointer, log or dataset file is rewritten."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from typing import Any


def write_lines(path: str, lines: Iterable[str]) -> None:
    """`path` replaced by `lines` (each written as given). On any error the temporary file is
    removed and the error raised; `path` is untouched."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(lines)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text(path: str, text: str) -> None:
    write_lines(path, [text])


def write_json(path: str, obj: Any, **dump_kw: Any) -> None:
    write_text(path, json.dumps(obj, **dump_kw))
