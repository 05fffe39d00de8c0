"""Streaming access to LLaVA-format data files: a JSON list or JSONL, indexed by byte offsets.

Indexing scans the file once and keeps int64 arrays (offset, length, line) per record; a record
is parsed only when read. A 1.8M-record file therefore costs ~43 MB of index, not the parsed list
of dicts (10x the file). A JSONL file is split on newlines (blank lines skipped); for a JSON list
the C decoder walks the top-level elements over a sliding window, keeping only their byte spans.

`RecordSource` is one file; `MixtureSource` draws from several with sampling weights (each file
repeated or subsampled to weight * its size, deterministically for a seed), like Eagle's SFT mix.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

_CHUNK = 1 << 20


class BadRecord(ValueError):
    """A record that cannot be parsed: JSON errors, or not a JSON object."""


def _index_jsonl(f) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    offsets, lengths, lines = [], [], []
    pos, line_no = 0, 0
    for line in f:
        line_no += 1
        if line.strip():
            offsets.append(pos)
            lengths.append(len(line))
            lines.append(line_no)
        pos += len(line)
    return np.asarray(offsets, np.int64), np.asarray(lengths, np.int64), np.asarray(lines, np.int64)


def _index_json_array(f) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-level elements of a JSON list: (byte offset, byte length, 1-based line), found by the C
    JSON decoder element by element over a sliding text window; each element is parsed once and
    dropped. A file that is not one valid JSON list is rejected naming the line."""
    import codecs

    dec = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")()
    offsets, lengths, lines = [], [], []
    text, pos, byte_pos, line, eof = "", 0, 0, 1, False  # byte_pos / line: at text[pos]

    def refill(size):
        nonlocal text, pos, eof
        chunk = f.read(size)
        eof = not chunk
        text = text[pos:] + utf8.decode(chunk, final=eof)
        pos = 0

    def advance(to):  # move pos to `to`, keeping the byte offset and line number of pos
        nonlocal pos, byte_pos, line
        part = text[pos:to]
        byte_pos += len(part.encode("utf-8"))
        line += part.count("\n")
        pos = to

    def skip(chars):
        while True:
            end = pos
            while end < len(text) and text[end] in chars:
                end += 1
            advance(end)
            if pos < len(text) or eof:
                return
            refill(_CHUNK)

    refill(_CHUNK)
    skip(" \t\r\n")
    if text[pos : pos + 1] != "[":
        raise BadRecord(f"line {line}: a JSON data file must be a list of records")
    advance(pos + 1)
    size = _CHUNK
    while True:
        skip(" \t\r\n,")
        if pos >= len(text):
            raise BadRecord(f"line {line}: the JSON list is not closed")
        if text[pos] == "]":
            break
        try:
            _, end = dec.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            if eof:
                raise BadRecord(f"line {exc.lineno + line - 1}: malformed JSON list ({exc.msg})") from None
            size *= 2  # an element longer than the window: widen it
            refill(size)
            continue
        start_byte, start_line = byte_pos, line
        advance(end)
        offsets.append(start_byte)
        lengths.append(byte_pos - start_byte)
        lines.append(start_line)
        if len(text) - pos < size // 2 and not eof:
            refill(size)
    return np.asarray(offsets, np.int64), np.asarray(lengths, np.int64), np.asarray(lines, np.int64)


@dataclass
class Record:
    data: dict[str, Any]
    file: str
    line: int  # 1-based line where the record starts
    index: int  # position in its file


class RecordSource:
    """One LLaVA JSON / JSONL file, indexed once, records parsed on access."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        with open(self.path, "rb") as f:
            head = f.read(4096).lstrip()
            f.seek(0)
            self.is_jsonl = not head.startswith(b"[")
            self.offsets, self.lengths, self.lines = (_index_jsonl if self.is_jsonl else _index_json_array)(f)

    def __len__(self) -> int:
        return len(self.offsets)

    def read(self, i: int) -> Record:
        """Record i; raises BadRecord (naming file and line) when it is not a JSON object."""
        with open(self.path, "rb") as f:
            f.seek(int(self.offsets[i]))
            raw = f.read(int(self.lengths[i]))
        where = f"{self.path}:{int(self.lines[i])}"
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BadRecord(f"{where}: malformed JSON ({exc})") from None
        if not isinstance(data, dict):
            raise BadRecord(f"{where}: a record must be a JSON object, got {type(data).__name__}")
        return Record(data, self.path, int(self.lines[i]), i)


class MixtureSource:
    """Several files with sampling weights: file k contributes round(weight_k * len_k) items
    (repeats when weight > 1), chosen deterministically from `seed`."""

    def __init__(self, paths: list[str | os.PathLike], weights: list[float] | None = None, seed: int = 0):
        if not paths:
            raise ValueError("MixtureSource: no data files")
        weights = [1.0] * len(paths) if weights is None else [float(w) for w in weights]
        if len(weights) != len(paths) or any(w < 0 or not math.isfinite(w) for w in weights):
            raise ValueError(f"MixtureSource: {len(weights)} weights for {len(paths)} files, all finite and >= 0")
        self.sources = [RecordSource(p) for p in paths]
        rng = np.random.default_rng(seed)
        picks = []
        for k, (src, w) in enumerate(zip(self.sources, weights)):
            n = round(w * len(src))
            whole, rest = divmod(n, len(src)) if len(src) else (0, 0)
            idx = np.concatenate(
                [
                    np.tile(np.arange(len(src)), whole),
                    rng.choice(len(src), rest, replace=False) if rest else np.empty(0, np.int64),
                ]
            )
            picks.append(np.stack([np.full(len(idx), k), np.sort(idx)], 1))
        self.items = np.concatenate(picks).astype(np.int64) if picks else np.empty((0, 2), np.int64)

    def __len__(self) -> int:
        return len(self.items)

    def read(self, i: int) -> Record:
        k, j = self.items[i]
        return self.sources[int(k)].read(int(j))


def open_source(data_path: str | os.PathLike | list, weights: list[float] | None = None, seed: int = 0):
    """A path, a list of paths, or a "a.json:0.5,b.jsonl:2" string -> a record source."""
    if isinstance(data_path, (list, tuple)):
        return MixtureSource(list(data_path), weights, seed)
    text = os.fspath(data_path)
    if "," in text or (":" in os.path.basename(text) and not os.path.exists(text)):
        paths, ws = [], []
        for part in text.split(","):
            path, _, w = part.rpartition(":") if ":" in os.path.basename(part) else (part, "", "1")
            paths.append(path)
            ws.append(float(w))
        return MixtureSource(paths, ws, seed)
    return RecordSource(text)
