"""Recipes are one table of plain data: settings, then the stage's, then overrides; a recipe added
to the table works with no code naming it."""

import pytest

from eagle_fast.train import config
from eagle_fast.train.config import RECIPES, Recipe, recipe


def test_a_recipe_is_its_settings_then_its_stage_then_the_overrides(monkeypatch):
    monkeypatch.setitem(
        RECIPES,
        "mine",
        Recipe(
            dict(preset="eagle-tiny-x5", learning_rate=0.5, seed=3),
            {"pretrain": dict(learning_rate=0.25), "sft": {}, "prealign": {}},
        ),
    )
    assert recipe("mine", "sft").learning_rate == 0.5
    assert recipe("mine", "pretrain").learning_rate == 0.25
    assert recipe("mine", "pretrain", learning_rate=0.125, seed=4).learning_rate == 0.125
    assert recipe("mine", "pretrain").output_dir == "runs/mine-pretrain"
    with pytest.raises(ValueError, match="unknown training option"):
        recipe("mine", "sft", learning_rat=1)


def test_official_recipes_follow_the_original_scripts_per_stage():
    pre, sft = recipe("eagle-x5-34b", "pretrain"), recipe("eagle-x5-34b", "sft")
    assert (pre.version, pre.learning_rate, pre.per_device_train_batch_size) == ("plain", 1e-3, 8)
    assert (sft.version, sft.learning_rate, sft.group_by_modality_length) == ("chatml", 2e-5, True)
    assert config.BUILTIN_DATA == {"tiny-x4": {}, "tiny-x5": {}, "demo": {"val_images": 500}}
