"""Where each new vision expert's weights come from.

Eagle starts stage 1 from an LLM plus five released encoders; `vision_tower_weights` names them:

    --vision_tower_weights "clip-448=openai/clip-vit-large-patch14-336@ce19dc9...;det-1024=/ckpt/eva02.pth"

Each entry is `expert=source`; a source is
  a local directory or file           /models/sam-vit-large, /ckpt/eva02_L_coco_det_sys_o365.pth
  a hub repository                    facebook/sam-vit-large            (its weights file(s))
  a file in a hub repository          Yuxin-CV/EVA-02:eva02/det/eva02_L_coco_det_sys_o365.pth
each optionally pinned with `@revision` (a commit hash, tag or branch). Hub sources resolve
through `huggingface_hub` and its cache: `HF_HUB_OFFLINE=1` is honoured (cache only), `HF_HOME` /
`HF_HUB_CACHE` choose the cache. Under torchrun rank 0 resolves (downloads) first while the others
wait, then the ranks that read weights find them in the cache. What was used — the source, the
resolved commit of a hub source or the sha256 of a local file — is recorded in the saved config
(`mm_vision_tower_sources`).

The official recipes default to the sources the original uses (OFFICIAL_SOURCES). Revisions are
pinned where the commit is known here; the others resolve to the repository's current `main`, and
the commit they resolved to is what the saved config records.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from eagle_fast.hashing import file_digest

# the original's encoders: CLIP ViT-L/14-336 (a full CLIPModel repo: its vision tower is taken),
# the timm ConvNeXt-XXLarge its `convnext_xxlarge.clip_laion2b_soup` call resolves to, SAM ViT-L
# (the vision encoder of SamModel), EVA-02-L ViTDet trained on Objects365 + COCO (detectron2 .pth)
# and Pix2Struct-Large (the encoder of Pix2StructForConditionalGeneration)
OFFICIAL_SOURCES: dict[str, str] = {
    "clip-448": "openai/clip-vit-large-patch14-336@ce19dc912ca5cd21c8a653c79e251e808ccabcd1",
    "convnext-1024": "timm/convnext_xxlarge.clip_laion2b_soup_ft_in1k",
    "sam-1024": "facebook/sam-vit-large@70009d56dac23ebb3265377257158b1d6ed4c802",
    "det-1024": "Yuxin-CV/EVA-02:eva02/det/eva02_L_coco_det_sys_o365.pth",
    "pix2struct-1024": "google/pix2struct-large",
}

# what a hub repository's weights are called, tried in order (HF, sharded HF, open_clip, legacy)
HUB_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "open_clip_model.safetensors",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "open_clip_pytorch_model.bin",
)


class SourceError(ValueError):
    """A weight source that cannot be parsed or found (names the expert, the source and the file)."""


@dataclass(frozen=True)
class Source:
    expert: str
    spec: str  # as written
    repo: str | None = None  # hub repository id
    filename: str | None = None  # a file inside the repository
    revision: str | None = None
    path: str | None = None  # a local file or directory

    def describe(self) -> str:
        return f"{self.expert}={self.spec}"


def format_sources(sources: dict[str, str]) -> str:
    return ";".join(f"{k}={v}" for k, v in sources.items())


def parse_sources(text: str | None, known: tuple[str, ...] | list[str]) -> dict[str, Source]:
    """'expert=source;…' -> {expert: Source}. Unknown experts and repeated ones are errors."""
    out: dict[str, Source] = {}
    for part in (text or "").split(";"):
        part = part.strip()
        if not part:
            continue
        name, eq, spec = part.partition("=")
        name, spec = name.strip(), spec.strip()
        if not eq or not spec:
            raise SourceError(f"vision_tower_weights entry {part!r}: expected expert=source")
        if name not in known:
            raise SourceError(f"vision_tower_weights: unknown expert {name!r}; known: {', '.join(known)}")
        if name in out:
            raise SourceError(f"vision_tower_weights: {name!r} given twice")
        out[name] = _parse_one(name, spec)
    return out


def _parse_one(name: str, spec: str) -> Source:
    if os.path.exists(spec) or spec.startswith(("/", "./", "../", "~")):
        return Source(name, spec, path=os.path.expanduser(spec))
    ref, _, revision = spec.partition("@")
    repo, _, filename = ref.partition(":")
    if repo.count("/") != 1:
        raise SourceError(f"vision_tower_weights {name}={spec}: not a local path, nor a hub id owner/name")
    return Source(name, spec, repo=repo, filename=filename or None, revision=revision or None)


def _hub_file(src: Source, filename: str) -> str:
    from huggingface_hub import hf_hub_download

    return hf_hub_download(src.repo, filename, revision=src.revision)


def _missing(exc: Exception) -> bool:
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    return isinstance(exc, (EntryNotFoundError, LocalEntryNotFoundError))


def _resolve_hub(src: Source) -> str:
    """The local path of the source's weights (a file, or the snapshot directory holding them)."""
    import json

    if src.filename:
        try:
            return _hub_file(src, src.filename)
        except Exception as exc:
            raise SourceError(
                f"{src.expert}: {src.repo}@{src.revision or 'main'}: file {src.filename} not found "
                f"({type(exc).__name__}: {exc})"
            ) from None
    tried = []
    for name in HUB_WEIGHT_FILES:
        try:
            path = _hub_file(src, name)
        except Exception as exc:
            if not _missing(exc):
                raise SourceError(f"{src.expert}: {src.repo}: {name}: {type(exc).__name__}: {exc}") from None
            tried.append(name)
            continue
        if name.endswith(".index.json"):  # a sharded checkpoint: every shard it lists
            with open(path) as f:
                for shard in sorted(set(json.load(f)["weight_map"].values())):
                    _hub_file(src, shard)
        return os.path.dirname(path)
    raise SourceError(
        f"{src.expert}: {src.repo}@{src.revision or 'main'}: no weights file found (tried "
        f"{', '.join(tried)}); with HF_HUB_OFFLINE=1 the files must already be in the cache"
    )


def resolve(src: Source) -> tuple[str, dict[str, str]]:
    """(local path, record) for one source; the record goes into the saved config."""
    if src.path is not None:
        if not os.path.exists(src.path):
            raise SourceError(f"{src.expert}: {src.path}: no such file or directory")
        files = (
            [src.path]
            if os.path.isfile(src.path)
            else sorted(
                os.path.join(src.path, f)
                for f in os.listdir(src.path)
                if f.endswith((".safetensors", ".bin", ".pth", ".pt"))
            )
        )
        digest = (
            hashlib.sha256("".join(file_digest(f)[1] for f in files).encode()).hexdigest()
            if len(files) > 1
            else (file_digest(files[0])[1] if files else "")
        )
        return src.path, {"source": src.spec, "path": os.path.abspath(src.path), "sha256": digest}
    path = _resolve_hub(src)
    parts = os.path.normpath(path).split(os.sep)
    commit = parts[parts.index("snapshots") + 1] if "snapshots" in parts else (src.revision or "")
    record = {"source": src.spec, "repo": src.repo, "revision": commit}
    if src.filename:
        record["file"] = src.filename
    return path, record


def resolve_all(
    sources: dict[str, Source], rank: int = 0, world: int = 1, needed: bool = True
) -> dict[str, tuple[str, dict]]:
    """Every source resolved. A collective with several ranks (every rank calls it): rank 0 first
    (it downloads), the others after a barrier (they find the files in the cache); `needed=False`
    (a rank that receives its weights from rank 0) only joins the barrier."""
    import torch.distributed as dist

    out: dict[str, tuple[str, dict]] = {}
    if world > 1 and rank != 0:
        dist.barrier()
    try:
        if needed or rank == 0:
            out = {name: resolve(src) for name, src in sources.items()}
    finally:  # rank 0 failing still releases the others (which then fail on the same source)
        if world > 1 and rank == 0:
            dist.barrier()
    return out


def main(argv: list[str] | None = None) -> int:
    """python -m eagle_fast.train.expert_sources ["expert=source;..."]: resolves (downloads into the
    hub cache) the given sources, by default the official recipes', and prints what each resolved
    to — run once where there is network, then train with HF_HUB_OFFLINE=1."""
    import json
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) > 1 or (args and args[0] in ("-h", "--help")):
        print(main.__doc__)
        return 0 if args and args[0] in ("-h", "--help") else 2
    sources = parse_sources(args[0] if args else format_sources(OFFICIAL_SOURCES), tuple(OFFICIAL_SOURCES))
    for name, src in sources.items():
        path, record = resolve(src)
        print(json.dumps({"expert": name, "path": path, **record}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
