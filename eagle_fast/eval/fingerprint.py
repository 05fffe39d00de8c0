"""Which model and settings a prediction file was made with: a fingerprint stored beside it, so that
a resumed run only continues its own predictions and shards only merge with their own kind.

`{predictions}.meta.json`, written atomically before the prediction file's first line, holds the
components below, their digest and, for information only (not compared), the model and question
paths and the shard index. Components are compared one by one so that an error names what differs:

- model: config.json as JSON without its save-time fields (`_name_or_path`, `transformers_version`:
  they change when the same model is copied or re-saved), adapter_config.json of a LoRA adapter,
  and a SHA-256 of each tokenizer / image-processor file. For a preset name: the name and its
  config (its weights are a random initialisation, so two runs of a preset count as the same).
- weights: each weight file's size and a hash. A *.safetensors header (8-byte length + JSON) alone
  is identical for every checkpoint of one architecture (it lists names, dtypes, shapes and offsets,
  not values), so the hash also covers the first, middle and last 4 KiB of every tensor: training
  changes nearly every element of a tensor it touches, so any trained tensor differs there, and the
  gigabytes of tensor data are never read. Other weight files (*.bin, *.pt, ...): their first and
  last MiB and, for torch's zip format, each entry's name, size and CRC-32 from the zip directory
  (torch stores a CRC of each tensor's full data when saving). A LoRA adapter's base model adds its
  weight files as `base/NAME`. An edit of a few elements inside a tensor is not seen.
- questions: the question file's size and SHA-256 of its content. Content, not path: shards run on
  machines that mount the file elsewhere, or a copy, are the same questions; a file edited in place
  is not. The file is read whole to load the questions anyway, so hashing it costs little.
- task, limit, template, generation (max_new_tokens as used, greedy, the resolved dtype), shards
  (num_shards: which questions a shard holds).

Not covered: the images (the question file names them; hashing thousands of images would cost more
than it guards), the batch size (it groups questions, it does not change what is asked), the code.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zipfile
from typing import Any

from eagle_fast import atomic
from eagle_fast.hashing import file_digest

VERSION = 1
SAMPLE = 4096  # bytes read at each of three places of every safetensors tensor
EDGE = 1 << 20  # bytes read at each end of another weight file
WEIGHT_EXTS = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
_SAVE_TIME = {"_name_or_path", "transformers_version", "_commit_hash"}
_CONFIGS = ("config.json", "adapter_config.json")
_TOKENIZER = ("special_tokens_map.json", "added_tokens.json", "preprocessor_config.json", "merges.txt")
_LABELS = {"generation": "generation settings", "questions": "question file", "shards": "shard layout"}
_MISSING = object()


class PredictionsMismatch(ValueError):
    """Predictions made with another model or other settings than the run that would use them."""


def meta_path(predictions: str) -> str:
    return predictions + ".meta.json"


def _without_save_time(obj):
    if isinstance(obj, dict):
        return {k: _without_save_time(v) for k, v in obj.items() if k not in _SAVE_TIME}
    return [_without_save_time(v) for v in obj] if isinstance(obj, list) else obj


def _safetensors_sha(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        header = f.read(n) if 0 <= n < os.path.getsize(path) else b""
        try:
            spans = sorted(tuple(t["data_offsets"]) for k, t in json.loads(header).items() if k != "__metadata__")
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ValueError(f"{path}: not a safetensors file (no tensor header after its 8-byte length)") from None
        h.update(head + header)
        for a, b in spans:
            for at in sorted({a, max(a, (a + b - SAMPLE) // 2), max(a, b - SAMPLE)}):
                f.seek(8 + n + at)
                h.update(f.read(min(SAMPLE, b - at)))
    return h.hexdigest()


def _other_weights_sha(path: str) -> str:
    h, size = hashlib.sha256(), os.path.getsize(path)
    with open(path, "rb") as f:
        h.update(f.read(EDGE))
        f.seek(max(EDGE, size - EDGE))
        h.update(f.read())
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            for i in z.infolist():
                h.update(f"{i.filename}\0{i.file_size}\0{i.CRC}\n".encode())
    return h.hexdigest()


def _is_tokenizer_file(name: str) -> bool:
    return name.startswith(("tokenizer", "vocab.", "chat_template")) or name in _TOKENIZER


def _model_dir(path: str) -> tuple[dict, dict]:
    """(model, weights) components of a checkpoint or LoRA adapter directory."""
    model, weights = {}, {}
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            continue
        if name.endswith(WEIGHT_EXTS):
            sha = _safetensors_sha(full) if name.endswith(".safetensors") else _other_weights_sha(full)
            weights[name] = {"size": os.path.getsize(full), "sha256": sha}
        elif name in _CONFIGS:
            with open(full, encoding="utf-8") as f:
                model[name] = _without_save_time(json.load(f))
        elif _is_tokenizer_file(name):
            model[name] = file_digest(full)[1]
    if "adapter_config.json" in model:  # load_model merges the adapter into this base: its weights count
        from eagle_fast.inference.loading import _lora_base

        weights.update({f"base/{k}": v for k, v in _model_dir(_lora_base(path, None))[1].items()})
    return model, weights


def _model(name: str) -> tuple[dict, Any]:
    """As load_model reads its argument: a directory first, else a preset name."""
    if os.path.isdir(name):
        return _model_dir(name)
    from eagle_fast.model import presets

    if name not in presets.PRESETS:
        raise FileNotFoundError(f"{name!r} is neither a model directory nor a preset ({', '.join(presets.PRESETS)})")
    config = json.loads(json.dumps(presets.PRESETS[name], default=str))  # tuples -> lists, as stored
    return {"preset": name, "config": config}, "random initialisation"


def digest(components: dict) -> str:
    text = json.dumps({"version": VERSION, "components": components}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def data_components(cfg) -> dict:
    """What the question side contributes (computable without the model, as `--merge` is)."""
    comps = {
        "task": cfg.task,
        "questions": {"size": os.path.getsize(cfg.data), "sha256": file_digest(cfg.data)[1]},
        "limit": cfg.limit,
        "shards": {"num_shards": cfg.num_shards},
    }
    if getattr(cfg, "conversation", False):  # only when set: single-question runs keep their fingerprints
        comps["conversation"] = True
    return comps


def of_run(cfg, max_new_tokens: int) -> dict:
    """The fingerprint of a generating run (an EvalConfig) answering with `max_new_tokens`."""
    from eagle_fast.data.templates import ALIASES
    from eagle_fast.inference.loading import _resolve

    model, weights = _model(cfg.model)
    dtype = str(_resolve(cfg.device, cfg.dtype)[1]).removeprefix("torch.")
    components = {
        "model": model,
        "weights": weights,
        **data_components(cfg),
        "template": ALIASES.get(cfg.template, cfg.template),
        "generation": {"max_new_tokens": max_new_tokens, "greedy": True, "dtype": dtype},
    }
    return {"version": VERSION, "fingerprint": digest(components), "components": components}


def read_meta(predictions: str) -> dict | None:
    """The fingerprint stored beside a prediction file, or None when there is none."""
    path = meta_path(predictions)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
        if not (
            isinstance(meta, dict)
            and isinstance(meta.get("fingerprint"), str)
            and isinstance(meta.get("components"), dict)
        ):
            raise ValueError("no 'fingerprint' and 'components'")
    except ValueError as e:
        raise ValueError(
            f"{path}: not a predictions fingerprint ({e}); pass --overwrite to "
            f"replace {predictions} and it, or choose another --out"
        ) from None
    return meta


def write_meta(predictions: str, fp: dict, **info) -> None:
    """Atomically (a temporary file renamed): a kill leaves the old fingerprint or the new, never half."""
    atomic.write_json(meta_path(predictions), {**fp, **info}, indent=1, sort_keys=True)


def _short(v) -> str:
    return repr(v) if not isinstance(v, (dict, list)) and len(repr(v)) <= 60 else "..."


def _key_detail(k: str, a, b) -> str:
    if a is _MISSING or b is _MISSING:
        return f"{k} only {'now' if a is _MISSING else 'there'}"
    if isinstance(a, dict) and isinstance(b, dict) and set(a) != {"size", "sha256"}:  # a config: its fields
        return f"{k}: " + ", ".join(sorted(x for x in set(a) | set(b) if a.get(x, _MISSING) != b.get(x, _MISSING)))
    if isinstance(a, dict) or (isinstance(a, str) and len(a) == 64):  # a file's hash: its name says it
        return k
    return f"{k}: {_short(a)} there, {_short(b)} now"


def differences(there: dict, now: dict) -> str:
    """What differs between two fingerprints' components, e.g. "weights (model.safetensors); template
    ('vicuna_v1' there, 'chatml' now)"."""
    out = []
    for name in list(dict.fromkeys([*now, *there])):
        a, b = there.get(name, _MISSING), now.get(name, _MISSING)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            detail = "; ".join(
                _key_detail(k, a.get(k, _MISSING), b.get(k, _MISSING))
                for k in sorted(set(a) | set(b))
                if a.get(k, _MISSING) != b.get(k, _MISSING)
            )
            detail = "content" if name == "questions" else detail
        else:
            detail = f"{_short(a if a is not _MISSING else None)} there, {_short(b if b is not _MISSING else None)} now"
        out.append(f"{_LABELS.get(name, name)} ({detail})")
    return "; ".join(out) or "the fingerprint format"


def _lines(path: str) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def claim(predictions: str, fp: dict, *, overwrite: bool, **info) -> None:
    """Makes `predictions` this run's file before anything is appended: its stored fingerprint must
    be `fp` when it already holds predictions (an error naming what differs otherwise); with
    `overwrite` the file is emptied and takes `fp`. The file is emptied before the new fingerprint is
    written, so a kill in between leaves no predictions under a fingerprint that did not make them."""
    has = os.path.exists(predictions) and os.path.getsize(predictions) > 0
    if overwrite:
        if has:
            os.remove(predictions)
        write_meta(predictions, fp, **info)
        return
    old = read_meta(predictions)
    how = "pass --overwrite to replace them, or choose another --out"
    if has and old is None:
        raise PredictionsMismatch(
            f"{predictions} holds {_lines(predictions)} predictions but no fingerprint ({meta_path(predictions)} is "
            f"missing), so nothing tells which model and settings made them; {how}"
        )
    if has and old["fingerprint"] != fp["fingerprint"]:
        raise PredictionsMismatch(
            f"{predictions} holds {_lines(predictions)} predictions made with another model or settings "
            f"(fingerprint: {meta_path(predictions)}); what differs: "
            f"{differences(old['components'], fp['components'])}; {how}"
        )
    if old is None or old["fingerprint"] != fp["fingerprint"]:  # nothing answered yet: this run's file
        write_meta(predictions, fp, **info)


def check_shards(paths: list[str], data: dict | None = None) -> str | None:
    """The fingerprint every shard file shares (None for files older than fingerprints: none has one),
    checked against `data` (data_components of the merging run) when given; mixed shards are an error."""
    metas = [read_meta(p) for p in paths]
    known = [(k, m) for k, m in enumerate(metas) if m is not None]
    if not known:
        return None
    bare = [paths[k] for k, m in enumerate(metas) if m is None]
    if bare:
        raise PredictionsMismatch(
            f"{', '.join(bare)}: no fingerprint beside it while {meta_path(paths[known[0][0]])} has one, so nothing "
            f"tells whether the shards were made with the same model and settings; rerun that shard with --overwrite"
        )
    k0, m0 = known[0]
    for k, m in known[1:]:
        if m["fingerprint"] != m0["fingerprint"]:
            raise PredictionsMismatch(
                f"{paths[k]} (shard {k}) was made with another model or settings than {paths[k0]} (shard {k0}); "
                f"what differs: {differences(m0['components'], m['components'])}; rerun the shards that are not "
                f"wanted with --overwrite and the same settings as the others, then merge"
            )
    if data is not None:
        there = {k: m0["components"].get(k) for k in data}
        if there != data:
            raise PredictionsMismatch(
                f"the shard files {paths[0]} ... were made for other questions than this merge: "
                f"{differences(there, data)}; merge with the --data, --limit and --num-shards the shards ran with"
            )
    return m0["fingerprint"]
