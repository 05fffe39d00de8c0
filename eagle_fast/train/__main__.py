"""python -m eagle_fast.train — train an Eagle model (console script: eagle-fast-train).

    python -m eagle_fast.train --recipe tiny-x5 --stage sft --output_dir runs/t --max_steps 20
    torchrun --nproc_per_node 2 -m eagle_fast.train --recipe tiny-x5 --output_dir runs/t2
    python -m eagle_fast.train --recipe eagle-x5-7b --stage pretrain --model_name_or_path lmsys/vicuna-7b-v1.5 \\
        --data_path blip_laion_cc_sbu_558k.json --image_folder images/ --set learning_rate=5e-4

Every TrainConfig field is a flag of the same name (the original Eagle/LLaVA names: --version,
--vision_tower, --tune_mm_mlp_adapter, --pretrain_mm_mlp_adapter, --group_by_modality_length, ...);
`--set key=value` and `--config file.{json,yaml}` set fields too (flags win over the file). Flags of
the original scripts that have no meaning here (--mm_vision_select_layer, --report_to, ...) are
accepted and kept in `extra`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from typing import Any

from eagle_fast.train.config import RECIPES, STAGES, TrainConfig, recipe


def _convert(field: dataclasses.Field, text: str) -> Any:
    hint = str(field.type)
    if text.lower() in ("none", "null") and "None" in hint:
        return None
    if hint.startswith("bool"):
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"--{field.name}: expected true/false, got {text!r}")
        return text.lower() in ("true", "1", "yes")
    if hint.startswith("int"):
        return int(text)
    if hint.startswith("float"):
        return float(text)
    if hint.startswith("dict"):
        return json.loads(text)
    return text


def parse(argv: list[str]) -> TrainConfig:
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    p = argparse.ArgumentParser(prog="python -m eagle_fast.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="tiny-x5", choices=sorted(RECIPES))
    p.add_argument("--stage", default=None, choices=STAGES)
    p.add_argument("--config", default=None, help="JSON or YAML file of TrainConfig fields")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--resume", default=None, help='"auto" or a checkpoint directory')
    args, rest = p.parse_known_args(argv)
    values: dict[str, Any] = {}
    if args.config:
        with open(args.config) as f:
            if args.config.endswith((".yaml", ".yml")):
                import yaml

                values.update(yaml.safe_load(f) or {})
            else:
                values.update(json.load(f))
    extra: dict[str, str] = {}
    i = 0
    while i < len(rest):  # --name value | --name=value | bare --flag (true)
        tok = rest[i]
        if not tok.startswith("--"):
            raise SystemExit(f"unexpected argument {tok!r}")
        name, _, value = tok[2:].partition("=")
        if not _ and (i + 1 >= len(rest) or rest[i + 1].startswith("--")):
            value = "true"
        elif not _:
            i += 1
            value = rest[i]
        name = name.replace("-", "_")
        if name in fields and name not in ("recipe", "stage", "extra"):
            values[name] = _convert(fields[name], value)
        else:
            extra[name] = value
        i += 1
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE with KEY a training option")
        values[key] = _convert(fields[key], value)
    if args.resume is not None:
        values["resume"] = args.resume
    stage = args.stage or ("pretrain" if values.get("tune_mm_mlp_adapter") else "sft")
    if extra:
        values["extra"] = extra
    return recipe(args.recipe, stage, **values)


def main(argv: list[str] | None = None) -> int:
    import torch

    cfg = parse(sys.argv[1:] if argv is None else argv)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    from eagle_fast.train.loop import Trainer

    result = Trainer(cfg).train()
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"steps": result["steps"], "final_loss": result["losses"][-1] if result["losses"] else None,
                          "skipped": result["skipped"], "output_dir": cfg.output_dir}))
    if distributed:  # gloo can abort at interpreter exit after a clean finish: leave right away
        torch.distributed.destroy_process_group()
        sys.stdout.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
