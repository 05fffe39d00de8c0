"""python -m eagle_fast.train's flags: the original scripts' names, recipe values kept unless a flag
is given, original flags that mean nothing here taken with a notice, anything else refused."""

import json

import pytest

from eagle_fast.train.__main__ import ORIGINAL_FLAGS_IGNORED, parse
from eagle_fast.train.config import recipe


def test_cli_maps_original_flags(capsys):
    cfg = parse(
        [
            "--recipe",
            "eagle-x5-7b",
            "--model_name_or_path",
            "lmsys/vicuna-7b-v1.5",
            "--version",
            "plain",
            "--tune_mm_mlp_adapter",
            "True",
            "--mm_vision_select_layer",
            "-2",
            "--bf16",
            "True",
            "--learning_rate",
            "1e-3",
            "--group_by_modality_length",
            "--set",
            "save_steps=10",
            "--report_to",
            "wandb",
            "--local_rank=0",
            "--lazy_preprocess",
            "True",
        ]
    )
    assert cfg.stage == "pretrain" and cfg.model_name_or_path == "lmsys/vicuna-7b-v1.5" and cfg.bf16
    assert cfg.learning_rate == 1e-3 and cfg.group_by_modality_length and cfg.save_steps == 10
    assert cfg.deepspeed == "zero2"
    notices = [line for line in capsys.readouterr().err.splitlines() if "ignoring" in line]
    assert len(notices) == 4 and any("--mm_vision_select_layer -2" in n for n in notices), notices


def test_the_official_scripts_flags_all_parse(capsys):
    """The flags of the original stage-2 script, verbatim (values as the script passes them)."""
    argv = (
        "--deepspeed zero2 --model_name_or_path lmsys/vicuna-7b-v1.5 --version v1 --data_path d.json "
        "--image_folder img --vision_tower clip-448;convnext-1024;sam-1024;det-1024;pix2struct-1024 "
        "--pretrain_mm_mlp_adapter p/mm_projector.bin --mm_projector_type mlp2x_gelu "
        "--mm_vision_select_layer -2 --mm_use_im_start_end False --mm_use_im_patch_token False "
        "--image_aspect_ratio pad --group_by_modality_length True --bf16 True --output_dir out "
        "--num_train_epochs 1 --per_device_train_batch_size 4 --per_device_eval_batch_size 4 "
        "--gradient_accumulation_steps 1 --evaluation_strategy no --save_strategy steps --save_steps 500 "
        "--save_total_limit 1 --learning_rate 2e-5 --weight_decay 0. --warmup_ratio 0.03 "
        "--lr_scheduler_type cosine --logging_steps 1 --tf32 True --model_max_length 2048 "
        "--gradient_checkpointing True --dataloader_num_workers 4 --lazy_preprocess True --report_to wandb "
        "--run_name eagle"
    ).split()
    cfg = parse(["--recipe", "eagle-x5-7b", *argv])
    assert cfg.stage == "sft" and cfg.vision_tower.count(";") == 4 and cfg.group_by_modality_length
    assert cfg.version == "v1" and cfg.save_steps == 500 and cfg.dataloader_num_workers == 4
    assert capsys.readouterr().err.count("ignoring") == 9


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--learning_rat", "1e-3"], "unknown flag --learning_rat (did you mean --learning_rate?)"),
        (["--learning", "1e-3"], "did you mean --learning_rate"),  # no abbreviations
        (["--mm_use_im_start_end", "True"], "not supported here"),
        (["--optim", "sgd"], "not supported here"),
        (["--recipe", "tiny-x9"], "invalid choice"),
        (["--bf16", "maybe"], "expected true or false"),
        (["--set", "no_such_option=1"], "not an option"),
        (["--set", "max_steps=ten"], "max_steps='ten'"),
        (["--logging_steps", "0"], "logging_steps=0"),
    ],
)
def test_unknown_or_bad_flags_are_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_a_recipe_value_changes_only_when_its_flag_is_given():
    """The demo recipe's SFT batch (32) and the official recipes' bf16 / deepspeed survive parsing
    flags about other fields; a dataclass default never overrides a recipe value."""
    assert parse(["--recipe", "demo", "--max_steps", "3"]).per_device_train_batch_size == 32
    official = parse(["--recipe", "eagle-x5-7b", "--output_dir", "o"])
    want = recipe("eagle-x5-7b", "sft", output_dir="o")
    assert official == want and official.bf16 and official.deepspeed == "zero2"
    assert parse(["--recipe", "eagle-x5-7b", "--no-bf16"]).bf16 is False
    assert parse(["--recipe", "eagle-x5-7b", "--bf16", "false"]).bf16 is False


def test_config_file_then_flags_then_set(tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"learning_rate": 0.5, "max_steps": 7, "seed": 3}))
    cfg = parse(["--config", str(path), "--max_steps", "8", "--set", "seed=4"])
    assert (cfg.learning_rate, cfg.max_steps, cfg.seed) == (0.5, 8, 4)
    path.write_text(json.dumps({"learning_rat": 0.5}))
    with pytest.raises(SystemExit):
        parse(["--config", str(path)])
    assert "unknown training option(s) ['learning_rat']" in capsys.readouterr().err


def test_every_ignored_flag_is_not_a_training_option():
    """An option we do read can never be on the ignore list (it would then be silently dropped)."""
    from dataclasses import fields

    from eagle_fast.train.config import TrainConfig

    assert not set(ORIGINAL_FLAGS_IGNORED) & {f.name for f in fields(TrainConfig)}


def test_a_recipe_named_in_the_config_file_is_the_one_applied(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"recipe": "demo"}))
    cfg = parse(["--config", str(path)])
    assert cfg.recipe == "demo" and cfg.per_device_train_batch_size == 32  # demo's table, not tiny-x5's
    assert parse(["--config", str(path), "--recipe", "tiny-x5"]).per_device_train_batch_size == 8
