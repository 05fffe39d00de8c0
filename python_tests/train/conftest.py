"""Shared trainer fixtures."""

import json

import pytest


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    """8 single-question easy-VQA records (the built-in set, cut down) as a fixed training set."""
    from eagle_fast.data.easy_vqa import easy_vqa_dataset

    root = tmp_path_factory.mktemp("easyvqa")
    built = easy_vqa_dataset(root, max_train_images=8, max_eval_images=1)
    small = root / "small.jsonl"
    with open(built.sft) as f, open(small, "w") as out:
        for line in f:
            rec = json.loads(line)
            rec["conversations"] = rec["conversations"][:2]
            out.write(json.dumps(rec) + "\n")
    return str(small), built.image_folder, str(built.pretrain)
