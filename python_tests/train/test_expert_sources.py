"""Where new experts' weights come from: parsing `vision_tower_weights`, local files (hashed),
hub ids served from a local HF cache under HF_HUB_OFFLINE=1, and errors naming expert, id and file."""

import hashlib
import json
import os
import subprocess
import sys

import pytest

from eagle_fast.train.expert_sources import (
    OFFICIAL_SOURCES,
    Source,
    SourceError,
    format_sources,
    parse_sources,
    resolve,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NAMES = tuple(OFFICIAL_SOURCES)


def test_entries_parse_into_local_paths_hub_repos_files_and_revisions(tmp_path):
    local = tmp_path / "eva.pth"
    local.write_bytes(b"x")
    got = parse_sources(
        f"clip-448=openai/clip-vit-large-patch14-336@abc123; det-1024={local};"
        "sam-1024=org/repo:sub/dir/w.pth;pix2struct-1024=./rel/dir",
        NAMES,
    )
    assert got["clip-448"] == Source(
        "clip-448",
        "openai/clip-vit-large-patch14-336@abc123",
        repo="openai/clip-vit-large-patch14-336",
        revision="abc123",
    )
    assert got["det-1024"].path == str(local) and got["det-1024"].repo is None
    assert got["sam-1024"].repo == "org/repo" and got["sam-1024"].filename == "sub/dir/w.pth"
    assert got["pix2struct-1024"].path == "./rel/dir"


@pytest.mark.parametrize(
    "text, match",
    [
        ("clip-999=a/b", "unknown expert 'clip-999'"),
        ("clip-448=a/b;clip-448=c/d", "'clip-448' given twice"),
        ("clip-448", "expected expert=source"),
        ("clip-448=notahubid", "not a local path, nor a hub id"),
    ],
)
def test_bad_entries_are_clear_errors(text, match):
    with pytest.raises(SourceError, match=match):
        parse_sources(text, NAMES)


def test_official_sources_cover_every_expert_and_round_trip():
    assert set(OFFICIAL_SOURCES) == {"clip-448", "convnext-1024", "sam-1024", "det-1024", "pix2struct-1024"}
    assert {k: v.spec for k, v in parse_sources(format_sources(OFFICIAL_SOURCES), NAMES).items()} == OFFICIAL_SOURCES


def test_a_local_file_is_recorded_with_its_sha256(tmp_path):
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"weights")
    path, record = resolve(parse_sources(f"sam-1024={f}", NAMES)["sam-1024"])
    assert path == str(f) and record["sha256"] == hashlib.sha256(b"weights").hexdigest()
    with pytest.raises(SourceError, match=r"sam-1024: .*missing\.pth: no such file"):
        resolve(Source("sam-1024", "x", path=str(tmp_path / "missing.pth")))


def _hub_cache(root, repo, commit, files):
    """A huggingface_hub cache laid out as a download leaves it: blobs, a snapshot, refs/main."""
    folder = root / ("models--" + repo.replace("/", "--"))
    for name, data in files.items():
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = folder / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(commit)


def _resolve_offline(cache, spec, expert="clip-448"):
    code = (
        "import json,sys; from eagle_fast.train.expert_sources import parse_sources, resolve, OFFICIAL_SOURCES\n"
        f"src = parse_sources({f'{expert}={spec}'!r}, tuple(OFFICIAL_SOURCES))[{expert!r}]\n"
        "try:\n    print(json.dumps(list(resolve(src))))\n"
        "except Exception as e:\n    print(json.dumps({'error': f'{type(e).__name__}: {e}'}))\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_hub_ids_resolve_from_the_cache_offline_with_their_commit(tmp_path):
    commit = "0123456789abcdef0123456789abcdef01234567"
    _hub_cache(tmp_path, "org/clip", commit, {"model.safetensors": b"w", "config.json": b"{}"})
    _hub_cache(tmp_path, "org/eva", commit, {"det/eva.pth": b"e"})
    _hub_cache(
        tmp_path,
        "org/sharded",
        commit,
        {
            "model.safetensors.index.json": json.dumps(
                {"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}
            ).encode(),
            "s1.safetensors": b"1",
            "s2.safetensors": b"2",
        },
    )
    path, record = _resolve_offline(tmp_path, "org/clip")
    assert path.endswith(f"snapshots/{commit}") and os.path.isfile(os.path.join(path, "model.safetensors"))
    assert record == {"source": "org/clip", "repo": "org/clip", "revision": commit}
    path, record = _resolve_offline(tmp_path, f"org/clip@{commit}")
    assert record["revision"] == commit
    path, record = _resolve_offline(tmp_path, "org/eva:det/eva.pth", expert="det-1024")
    assert path.endswith("det/eva.pth") and record["file"] == "det/eva.pth" and record["revision"] == commit
    path, _ = _resolve_offline(tmp_path, "org/sharded")
    assert sorted(os.listdir(path)) == ["model.safetensors.index.json", "s1.safetensors", "s2.safetensors"]


def test_what_the_cache_lacks_offline_is_an_error_naming_expert_id_and_file(tmp_path):
    _hub_cache(tmp_path, "org/eva", "0" * 40, {"det/eva.pth": b"e"})
    err = _resolve_offline(tmp_path, "org/eva:det/other.pth", expert="det-1024")["error"]
    assert "det-1024" in err and "org/eva" in err and "det/other.pth" in err
    err = _resolve_offline(tmp_path, "org/absent", expert="sam-1024")["error"]
    assert "sam-1024" in err and "org/absent" in err and "no weights file found" in err and "HF_HUB_OFFLINE" in err


def test_the_fetch_command_resolves_and_prints_each_source(tmp_path, capsys):
    from eagle_fast.train.expert_sources import main

    f = tmp_path / "sam.safetensors"
    f.write_bytes(b"s")
    assert main([f"sam-1024={f}"]) == 0
    row = json.loads(capsys.readouterr().out.strip())
    assert row["expert"] == "sam-1024" and row["path"] == str(f) and row["sha256"] == hashlib.sha256(b"s").hexdigest()
