"""Stage reuse keyed by the manifest of what made the stage: the same manifest with the stage
finished is reused; any other manifest (seed, steps, data, recipe) deletes the folder and trains
again; an unfinished stage with the same manifest resumes (its checkpoints are kept)."""

import json
import os
import sys

from eagle_fast.demo_stages import MANIFEST, Stage, run_stage

# a stand-in trainer: counts its runs in <folder>/runs.log and writes the stage's output
FAKE = [
    sys.executable,
    "-c",
    "import os,sys; d=sys.argv[1]; open(os.path.join(d,'runs.log'),'a').write('x');"
    " os.makedirs(os.path.join(d,'final'),exist_ok=True); open(os.path.join(d,'final','done'),'w').close()",
]


def _stage(folder, **kw):
    args = dict(
        name="stage 2",
        folder=str(folder),
        args=[str(folder)],
        done_file="final/done",
        recipe_stage="sft",
        steps=3,
        seed=0,
        data="d0",
    )
    args.update(kw)
    return Stage(**args)


def _runs(folder):
    return len(open(os.path.join(folder, "runs.log")).read())


def test_same_manifest_reused_other_manifest_retrains(tmp_path, capsys):
    f = tmp_path / "sft"
    assert run_stage(_stage(f), FAKE) is True and _runs(f) == 1
    assert json.load(open(f / MANIFEST))["seed"] == 0
    assert run_stage(_stage(f), FAKE) is False and _runs(f) == 1  # reused
    assert "reusing" in capsys.readouterr().out
    for change in (dict(seed=1), dict(steps=4), dict(data="d1"), dict(parent={"stage": "stage 1", "seed": 5})):
        (f / "stale-checkpoint").write_text("from the previous manifest")
        assert run_stage(_stage(f, **change), FAKE) is True
        out = capsys.readouterr().out
        assert "made otherwise" in out and list(change)[0] in out
        assert not (f / "stale-checkpoint").exists() and _runs(f) == 1  # the folder was emptied, then trained
        assert json.load(open(f / MANIFEST))[list(change)[0]] is not None


def test_a_folder_without_manifest_is_not_reused(tmp_path):
    f = tmp_path / "sft"
    os.makedirs(f / "final")
    (f / "final" / "done").write_text("")  # finished-looking output of unknown origin
    assert run_stage(_stage(f), FAKE) is True and _runs(f) == 1


def test_an_interrupted_stage_resumes_in_place(tmp_path):
    f = tmp_path / "sft"
    run_stage(_stage(f), FAKE)
    os.remove(f / "final" / "done")  # as if killed before the end: checkpoints stay for --resume auto
    (f / "checkpoint-2").mkdir()
    assert run_stage(_stage(f), FAKE) is True
    assert (f / "checkpoint-2").exists() and _runs(f) == 2


def test_recipe_settings_are_in_the_manifest(tmp_path, monkeypatch):
    from eagle_fast.train import config

    f = tmp_path / "sft"
    run_stage(_stage(f), FAKE)
    assert json.load(open(f / MANIFEST))["recipe"]["learning_rate"] == config.DEMO_STAGE["sft"]["learning_rate"]
    monkeypatch.setitem(config.DEMO_STAGE, "sft", {**config.DEMO_STAGE["sft"], "learning_rate": 1.0})
    assert run_stage(_stage(f), FAKE) is True and _runs(f) == 1  # another recipe: trained again from scratch
