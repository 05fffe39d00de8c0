"""python -m eagle_fast.train — train an Eagle model (console script: eagle-fast-train).

    python -m eagle_fast.train --recipe tiny-x5 --stage sft --output_dir runs/t --max_steps 20
    torchrun --nproc_per_node 2 -m eagle_fast.train --recipe tiny-x5 --output_dir runs/t2
    python -m eagle_fast.train --recipe eagle-x5-7b --stage pretrain --model_name_or_path lmsys/vicuna-7b-v1.5 \\
        --data_path blip_laion_cc_sbu_558k.json --image_folder images/ --set learning_rate=5e-4
        # (the experts start from the released encoders the recipe names: --vision_tower_weights)

Every TrainConfig field is a flag of the same name (the original Eagle/LLaVA names: --version,
--vision_tower, --tune_mm_mlp_adapter, --pretrain_mm_mlp_adapter, --group_by_modality_length, ...;
dashes work too); `--set key=value` and `--config file.{json,yaml}` set fields too (flags win over
the file, `--set` over both). A flag changes the recipe's value only when given. Flags of the
original scripts that mean nothing here (--local_rank, --report_to, --lazy_preprocess, ...: see
ORIGINAL_FLAGS_IGNORED) are accepted with one notice line each; any other unknown flag is an error.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any

from eagle_fast.cli import ConfigParser, Ignored
from eagle_fast.train.config import RECIPES, STAGES, TrainConfig, recipe

# Flags of the original training scripts (LLaVA's train.py + HF TrainingArguments) that change
# nothing here. `allowed` lists the values that mean what we do anyway: another value would ask for
# behaviour we do not have, so it is refused rather than ignored.
_EVERY_STEP = "checkpoints follow --save_steps"
ORIGINAL_FLAGS_IGNORED: dict[str, Ignored] = {
    "local_rank": Ignored("the rank comes from the launcher's LOCAL_RANK / RANK environment"),
    "report_to": Ignored("metrics go to OUTPUT_DIR/metrics.jsonl and loss.png"),
    "run_name": Ignored("runs are named by --output_dir"),
    "lazy_preprocess": Ignored("records are always tokenized lazily, per item"),
    "is_multimodal": Ignored("set from the data (records with an image)"),
    "mm_use_im_start_end": Ignored("image start/end tokens are not used (as in every Eagle model)", ("false", "0")),
    "mm_use_im_patch_token": Ignored("image patch tokens are not used (as in every Eagle model)", ("false", "0")),
    "mm_vision_select_layer": Ignored("Eagle's experts use their own output layers; the original ignores it too"),
    "mm_vision_select_feature": Ignored("Eagle drops CLIP's CLS token itself", ("patch",)),
    "mm_patch_merge_type": Ignored("image features are spliced flat", ("flat",)),
    "evaluation_strategy": Ignored("training runs no evaluation; use python -m eagle_fast.eval", ("no",)),
    "eval_strategy": Ignored("training runs no evaluation; use python -m eagle_fast.eval", ("no",)),
    "per_device_eval_batch_size": Ignored("training runs no evaluation"),
    "save_strategy": Ignored(_EVERY_STEP, ("steps",)),
    "optim": Ignored("the optimizer is AdamW (torch), as the original's default", ("adamw_torch", "adamw_hf")),
    "remove_unused_columns": Ignored("the collator builds its own batches", ("false", "0")),
    "cache_dir": Ignored("models are read from --model_name_or_path or the Hugging Face cache"),
    "mpt_attn_impl": Ignored("unused by the original as well"),
    "freeze_mm_mlp_adapter": Ignored("the stage decides what trains", ("false", "0")),
    "freeze_backbone": Ignored("the stage decides what trains", ("false", "0")),
    "double_quant": Ignored("QLoRA (--bits 4) always uses double quantization, the original's default", ("true", "1")),
    "quant_type": Ignored("QLoRA (--bits 4) uses NF4, the original's default", ("nf4",)),
}


def parser() -> ConfigParser:
    p = ConfigParser("python -m eagle_fast.train", __doc__, ignored=ORIGINAL_FLAGS_IGNORED)
    p.add_argument("--config", default=None, help="JSON or YAML file of TrainConfig fields")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="set one TrainConfig field")
    p.add_config(TrainConfig, choices={"recipe": sorted(RECIPES), "stage": STAGES})
    return p


def _config_file(p: ConfigParser, path: str) -> dict[str, Any]:
    """TrainConfig fields from a JSON or YAML file; an unknown key is an error naming it."""
    with open(path) as f:
        if path.endswith((".yaml", ".yml")):
            import yaml

            loaded = yaml.safe_load(f) or {}
        else:
            loaded = json.load(f)
    unknown = sorted(set(loaded) - {f.name for f in dataclasses.fields(TrainConfig)})
    if unknown:
        p.error(f"{path}: unknown training option(s) {unknown}")
    return loaded


def parse(argv: list[str]) -> TrainConfig:
    """The training configuration: the recipe (default tiny-x5) for the stage, then the config
    file, the flags given and `--set`, in that order."""
    p = parser()
    given = p.parse_given(argv)
    config_file, sets = given.pop("config", None), given.pop("set", [])
    values: dict[str, Any] = _config_file(p, config_file) if config_file else {}
    values.update(given)
    name = values.pop("recipe", TrainConfig.recipe)  # the recipe's table, whichever layer named it
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            p.error(f"--set {item!r}: expected KEY=VALUE")
        try:
            values[key] = p.convert(key, value)
        except ValueError as e:
            p.error(f"--set {item!r}: {e}")
    stage = values.pop("stage", None) or ("pretrain" if values.get("tune_mm_mlp_adapter") else "sft")
    try:
        return recipe(name, stage, **values)
    except (TypeError, ValueError) as e:
        p.error(str(e))


def main(argv: list[str] | None = None) -> int:
    import torch

    from eagle_fast.train.device import backend_for, resolve_device, setup_device

    cfg = parse(sys.argv[1:] if argv is None else argv)
    device = resolve_device(cfg.device)
    setup_device(device, cfg.tf32)  # before the process group: NCCL binds the current device
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        torch.distributed.init_process_group(backend_for(device))
    from eagle_fast.train.checkpoint import CheckpointError, SaveError
    from eagle_fast.train.loop import Trainer
    from eagle_fast.train.nonfinite import NonFiniteError

    rank0 = int(os.environ.get("RANK", "0")) == 0
    try:
        result = Trainer(cfg).train()
    except (CheckpointError, SaveError, NonFiniteError) as e:
        # a failure the run has reported in full (the files, the records, what `latest` names):
        # the message alone, once, without a traceback; every rank raised the same one
        if rank0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        _leave(distributed, 1)
    if rank0:  # "stopped": the signal that ended the run early (its checkpoint saved), or null
        print(
            json.dumps(
                {
                    "steps": result["steps"],
                    "final_loss": result["losses"][-1] if result["losses"] else None,
                    "skipped": result["skipped"],
                    "stopped": result["stopped"],
                    "nonfinite_steps": result["nonfinite_steps"],
                    "output_dir": cfg.output_dir,
                }
            )
        )
    _leave(distributed, 0)
    return 0


def _leave(distributed: bool, status: int) -> None:
    import torch

    if distributed:  # gloo can abort at interpreter exit after a clean finish: leave right away
        torch.distributed.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    if status:
        sys.exit(status)


if __name__ == "__main__":
    sys.exit(main())
