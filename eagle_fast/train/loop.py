"""The training loop: one process, or one per rank under torchrun (DDP, gloo on CPU / nccl on GPU).

Per optimizer step, `gradient_accumulation_steps` micro-batches; the loss is the per-token mean
over every learned token of the step on every rank (each micro-batch's summed loss divided by that
global count, DDP summing across ranks), not a mean of means. With packing (TrainConfig.packing)
each micro-batch is one row of its records (the same records, the same loss; no padding). AdamW
with LLaVA's no-decay groups (biases and norms) and optional separate learning rates for the
projector and the experts; cosine schedule with warmup; gradient clipping; bf16 autocast when
asked. Data order is a function of (seed, epoch) and the position in the epoch, so a resumed run
sees exactly the batches it would have seen: with the optimizer, scheduler and RNG states
restored, resuming is bitwise exact.

Failures: checkpoint.py (damaged checkpoints), signals.py (SIGTERM / SIGUSR1), nonfinite.py (NaN / inf).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from eagle_fast.constants import IGNORE_INDEX
from eagle_fast.data import EagleCollator, EagleDataset, ModalityLengthSampler
from eagle_fast.data.collate import to_device
from eagle_fast.train import deepspeed_engine as ds
from eagle_fast.train import fsdp, materialize, signals
from eagle_fast.train.builders import (
    TokenizerFiles,
    build_data,
    build_model,
    build_tokenizer,
    export_prealigned,
    freeze_for_stage,
    projector_state,
)
from eagle_fast.train.checkpoint import (
    TRAINER_STATE,
    choose_resume,
    estimate_bytes,
    load_model_weights,
    rng_state,
    safe_load,
    save_collective,
    set_rng_state,
    write_model,
)
from eagle_fast.train.config import TrainConfig
from eagle_fast.train.device import resolve_device, setup_device
from eagle_fast.train.metrics import open_metrics
from eagle_fast.train.nonfinite import Tracker, finite


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def param_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """Trainable parameters in groups: (decay | no decay) x (LLM | projector | experts) lrs."""
    groups: dict[tuple[bool, float], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim < 2 or "norm" in name or name.endswith(".bias")
        lr = cfg.learning_rate
        if "mm_projector" in name and cfg.mm_projector_lr is not None:
            lr = cfg.mm_projector_lr
        elif ".vision_tower." in name and cfg.vision_tower_lr is not None:
            lr = cfg.vision_tower_lr
        groups.setdefault((no_decay, lr), []).append(p)
    return [
        {"params": ps, "lr": lr, "weight_decay": 0.0 if nd else cfg.weight_decay} for (nd, lr), ps in groups.items()
    ]


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.rank, self.world = _dist()
        self.device = resolve_device(cfg.device)
        setup_device(self.device, cfg.tf32)
        torch.manual_seed(cfg.seed)
        self.tokenizer = build_tokenizer(cfg)
        # once per job, not once per rank: ranks > 0 build shapes only and receive rank 0's weights
        self.construction = materialize.construction(cfg, self.rank, self.world)
        self._zero3 = materialize.zero3_hold(cfg, self.world) if self.construction == "zero3" else None
        self.model, self.processor = build_model(
            cfg, self.tokenizer, meta=self.construction == "meta", rank=self.rank, world=self.world
        )
        if self.world > 1:
            print(materialize.describe(self.construction, self.rank), flush=True)
        freeze_for_stage(self.model, cfg)
        if cfg.lora_enable:
            from eagle_fast.train.lora import apply_lora

            if cfg.model_name_or_path is None:  # the base a merge will need
                if self.rank == 0:
                    self.model.save_pretrained(os.path.join(cfg.output_dir, "base"), safe_serialization=True)
                self.model.name_or_path = os.path.join("..", "base")  # adapter_config.json: relative to final/
            self.model = apply_lora(self.model, cfg)
        # before any wrapper: DDP, FSDP2 and DeepSpeed take it where it is; ZeRO-3 partitions
        # already sit where DeepSpeed put them; meta ranks under FSDP2 allocate after sharding
        self.fsdp = fsdp.enabled(cfg, self.world) and not cfg.deepspeed
        full_state = self.model.state_dict() if self.fsdp and self.rank == 0 else {}  # references: no copy
        if self.construction == "real" and not self.fsdp:  # fully_shard moves each unit itself
            self.model.to(self.device)
        elif self.construction == "meta" and not self.fsdp:
            materialize.allocate(self.model, self.device)
        self.dataset: EagleDataset = build_data(cfg, self.tokenizer, self.processor, self.model)
        # packing: each micro-batch's records in one row (the same records, so the same global batch)
        self.collate = EagleCollator(pad_token_id=self.tokenizer.pad_token_id or 0, pack=cfg.packs())
        if self.fsdp:  # before the optimizer: it must see the sharded parameters
            fsdp.shard(self.model, bf16=cfg.bf16)
            if self.construction == "meta":
                materialize.allocate(self.model, self.device)  # this rank's shards only
            if materialize.shared_from_rank0(cfg, self.world):
                materialize.fsdp_load_from_rank0(self.model, full_state)
            del full_state
        elif materialize.shared_from_rank0(cfg, self.world):
            materialize.broadcast_from_rank0(self.model)
        # fused: one kernel for every parameter's update on CUDA (the CPU has no fused AdamW path)
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, cfg), lr=cfg.learning_rate, betas=(0.9, 0.999), fused=self.device.type == "cuda"
        )
        self.micro_per_epoch = math.ceil(len(self.dataset) / (cfg.per_device_train_batch_size * self.world))
        steps_per_epoch = max(self.micro_per_epoch // cfg.gradient_accumulation_steps, 1)
        self.total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * steps_per_epoch)
        from transformers import get_scheduler

        self.scheduler = get_scheduler(
            cfg.lr_scheduler_type,
            self.optimizer,
            num_warmup_steps=int(cfg.warmup_ratio * self.total_steps),
            num_training_steps=self.total_steps,
        )
        self.engine = None  # DeepSpeed: the engine owns optimizer steps, clipping and the schedule
        self.net = self.model
        if cfg.deepspeed:
            self.engine = self.net = ds.initialize(self.model, self.optimizer, self.scheduler, cfg, self.world)
        elif self.world > 1 and not self.fsdp:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True,
            )
        if cfg.torch_compile:  # the wrapper compiles; self.model keeps the parameters and state-dict names
            if self.engine is not None:
                self.engine.compile()
            else:
                self.net = torch.compile(self.net)
        self.step, self.epoch, self.position = 0, 0, 0  # position: micro-batches done in this epoch
        self.skipped: dict[str, int] = {}
        self.nonfinite = Tracker(cfg.max_nonfinite_steps, cfg.output_dir, self.rank, self.world)  # NaN / inf steps
        self._saved_at: tuple[int, int, int] | None = None  # (step, epoch, position) of the last save

    # ------------------------------------------------------------------ data order

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        cfg = self.cfg
        if cfg.group_by_modality_length:
            sampler = ModalityLengthSampler(
                self.dataset.modality_lengths(), cfg.per_device_train_batch_size, self.world, self.rank, cfg.seed
            )
            sampler.set_epoch(epoch)
            order = sampler.indices()
        else:
            perm = np.random.default_rng([cfg.seed, epoch]).permutation(len(self.dataset))
            per_rank = -(-len(perm) // self.world)
            perm = np.concatenate([perm, perm[: per_rank * self.world - len(perm)]])  # even split
            order = perm[self.rank :: self.world].tolist()
        b = cfg.per_device_train_batch_size
        return [order[i : i + b] for i in range(0, len(order), b)]

    def _micro_batches(self):
        """Endless (epoch, position, batch) from the current position on; workers load ahead."""
        while True:
            batches = self._epoch_batches(self.epoch)[self.position :]
            loader = torch.utils.data.DataLoader(
                self.dataset,
                batch_sampler=batches,
                collate_fn=self.collate,
                num_workers=self.cfg.dataloader_num_workers,
                pin_memory=self.device.type == "cuda",
            )  # async host->device copies
            for batch in loader:
                self.position += 1
                yield batch
            if self.rank == 0 and any(self.skipped.values()):  # bad records of the epoch so far, by reason
                print(f"epoch {self.epoch}: skipped records {dict(sorted(self.skipped.items()))}")
            self.epoch, self.position = self.epoch + 1, 0

    # ------------------------------------------------------------------ state

    def state(self) -> dict[str, Any]:
        st = {
            "step": self.step,
            "epoch": self.epoch,
            "position": self.position,
            "config": asdict(self.cfg),
            "skipped": dict(self.skipped),
            "world": self.world,
            "nonfinite": self.nonfinite.state(),
        }
        if self.engine is None:  # DeepSpeed keeps these in its own checkpoint files
            st.update(optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict())
        return st

    def _full_states(self) -> tuple[dict | None, dict | None]:
        """FSDP2: (model, optimizer) full states on rank 0, gathered by every rank together."""
        if not self.fsdp:
            return None, None
        return fsdp.full_model_state(self.model), fsdp.full_optimizer_state(self.model, self.optimizer)

    def resume(self, path: str) -> None:
        st = safe_load(os.path.join(path, TRAINER_STATE))
        if st["world"] != self.world:
            raise ValueError(f"{path}: saved with {st['world']} ranks, resuming with {self.world}")
        if self.engine is not None:
            ds.load(self.engine, path)
        elif self.fsdp:
            from safetensors.torch import load_file

            model_state = {}
            if self.rank == 0:
                for f in sorted(x for x in os.listdir(path) if x.endswith(".safetensors")):
                    model_state.update(load_file(os.path.join(path, f)))
            fsdp.load_full_state(self.model, self.optimizer, model_state, st["optimizer"] if self.rank == 0 else {})
            self.scheduler.load_state_dict(st["scheduler"])
        else:
            load_model_weights(self.model, path)
            self.optimizer.load_state_dict(st["optimizer"])
            self.scheduler.load_state_dict(st["scheduler"])
        self.step, self.epoch, self.position = st["step"], st["epoch"], st["position"]
        self.skipped = st["skipped"]
        self.nonfinite.load(st.get("nonfinite", {}))
        set_rng_state(safe_load(os.path.join(path, f"rng_rank{self.rank}.pt")))
        self._saved_at = (self.step, self.epoch, self.position)

    def _barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def save(self) -> str:
        """Every rank writes its part (DeepSpeed shards, its RNG) into the temporary directory;
        rank 0 writes the HF model and the trainer state, then commits. A write failing on any
        rank (a full disk) raises SaveError on all, `latest` unchanged (checkpoint.save_collective)."""

        def write(tmp: str, attempt) -> None:
            if self.engine is not None:
                attempt(lambda: ds.save(self.engine, tmp))
            attempt(lambda: torch.save(rng_state(), os.path.join(tmp, f"rng_rank{self.rank}.pt")))
            model_state, optim_state = self._full_states()
            with ds.gathered(self.model, self.engine):
                if self.rank == 0:
                    attempt(
                        lambda: write_model(
                            self.model,
                            tmp,
                            savers=(TokenizerFiles(self.tokenizer), self.processor),
                            state_dict=model_state,
                        )
                    )
            if self.rank == 0:
                state = self.state()
                if optim_state is not None:  # full, keyed by parameter name
                    state["optimizer"] = optim_state
                attempt(lambda: torch.save(state, os.path.join(tmp, TRAINER_STATE)))

        path = save_collective(
            self.cfg.output_dir,
            self.step,
            self.cfg.save_total_limit,
            self.rank,
            self.world,
            self.device,
            write,
            lambda: estimate_bytes(self.model, 3 if self.engine else 2),
        )
        self._saved_at = (self.step, self.epoch, self.position)
        return path

    # ------------------------------------------------------------------ loop

    def _learned(self, batch) -> int:
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def train(self) -> dict[str, Any]:
        cfg = self.cfg
        os.makedirs(cfg.output_dir, exist_ok=True)
        # SIGTERM / SIGUSR1 handlers for this run only; a signal during start-up stops after one step
        with signals.StopSignals(cfg.stop_timeout_s, label=f"rank {self.rank}: " if self.world > 1 else "") as stop:
            ckpt = choose_resume(cfg.output_dir, cfg.resume, self.rank, self.world, self.device)
            if ckpt:
                self.resume(ckpt)
            metrics = bar = None
            if self.rank == 0:
                metrics = open_metrics(
                    os.path.join(cfg.output_dir, "metrics.jsonl"), self.step, self.epoch, self.position
                )
                bar = tqdm(
                    total=self.total_steps, initial=self.step, desc=f"{cfg.recipe} {cfg.stage}", dynamic_ncols=True
                )
            try:
                losses, stopped = self._steps(stop, metrics, bar)
            finally:
                if bar is not None:
                    bar.close()
                if metrics is not None:
                    metrics.close()
            if not stopped or self._saved_at != (self.step, self.epoch, self.position):
                self.save()  # (a stop right after a periodic save has its checkpoint already)
            if not stopped:
                self._final()
            elif self.rank == 0:
                print(
                    f"stopped by {stop.received or 'a signal to another rank'} after step {self.step}: "
                    f"checkpoint-{self.step} saved; --resume auto continues",
                    file=sys.stderr,
                    flush=True,
                )
        return {
            "steps": self.step,
            "losses": losses,
            "skipped": dict(self.skipped),
            "nonfinite_steps": self.nonfinite.total,
            "stopped": (stop.received or "another rank") if stopped else None,
        }

    def _steps(self, stop: signals.StopSignals, metrics, bar) -> tuple[list[float], bool]:
        """Optimizer steps until the last, or until a stop signal reached any rank (True)."""
        cfg = self.cfg
        stream = self._micro_batches()
        self.net.train()
        t0, losses, seen_samples, seen_tokens = time.time(), [], 0, 0
        window: list[tuple[float, int, int]] = []  # (loss, samples, tokens) of the steps since the last row
        while self.step < self.total_steps:
            micro = []
            while len(micro) < cfg.gradient_accumulation_steps:
                batch = next(stream)
                for s in batch["skipped"]:
                    self.skipped[s["skipped"]] = self.skipped.get(s["skipped"], 0) + 1
                if batch["input_ids"] is not None:
                    micro.append(batch)
            # counted on the host batches (no device sync); every collective runs on device tensors
            n_items = torch.tensor(sum(self._learned(b) for b in micro), dtype=torch.long, device=self.device)
            if self.world > 1:
                torch.distributed.all_reduce(n_items)
            tokens = sum(int(b["attention_mask"].sum()) for b in micro)
            samples = sum(len(b["ids"]) for b in micro) * self.world  # records: a packed batch is one row
            loss_acc = torch.zeros((), dtype=torch.float64, device=self.device)
            micro_losses = []  # read only when the step is not finite: to name its records
            for batch in micro:
                batch = to_device(batch, self.device)
                # FSDP2 with bf16 casts in its MixedPrecisionPolicy (bf16 all-gathers); others autocast
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.bf16 and not self.fsdp):
                    packed = {"packed_seq_lens": batch["packed_seq_lens"]} if "packed_seq_lens" in batch else {}
                    out = self.net(
                        batch["input_ids"],
                        batch["attention_mask"],
                        labels=batch["labels"],
                        images=batch["images"],
                        num_items_in_batch=n_items,
                        **packed,
                    )
                loss = out.loss * self.world  # DDP / ZeRO average gradients over ranks; we want their sum
                if self.engine is not None:  # it divides by the accumulation steps and steps at the boundary
                    self.engine.backward(loss * cfg.gradient_accumulation_steps)
                    self.engine.step()
                else:
                    loss.backward()
                loss_acc += out.loss.detach()
                micro_losses.append(out.loss.detach())
            if self.world > 1:  # the step's loss over every rank's tokens, for the log
                total = torch.stack([loss_acc, loss_acc.new_tensor(tokens)])
                torch.distributed.all_reduce(total)
                loss_acc, tokens = total[0], int(total[1])
            loss_sum = float(loss_acc)  # the step's one host sync for the log
            if self.engine is not None:  # DeepSpeed has stepped (or, fp16, skipped an overflow) already
                grad_norm = self.engine.get_global_grad_norm() or 0.0
                ok, applied = finite(loss_sum, grad_norm), True
            else:
                grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
                    grad_norm = grad_norm.full_tensor()
                # the same on every rank: an all-reduced loss, the norm of synchronized gradients
                ok = applied = finite(loss_sum, grad_norm)
                if ok:  # else nothing moves: weights, AdamW's moments and step count, the schedule
                    self.optimizer.step()
                    self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
            if ok:
                self.nonfinite.good()
            else:  # a row naming the batch's records; NonFiniteError after too many in a row
                row, error = self.nonfinite.bad(
                    micro, micro_losses, loss_sum, grad_norm, applied, self.step + 1, self.epoch, self.position
                )
                if metrics is not None:
                    metrics.write(json.dumps(row) + "\n")
                    metrics.flush()
                if error is not None:
                    raise error
            if applied:
                self.step += 1
                losses.append(loss_sum)
            if applied and metrics is not None:
                seen_samples += samples
                seen_tokens += tokens
                window.append((loss_sum, samples, tokens))
                lr = self.scheduler.get_last_lr()[0]
                if self.step % cfg.logging_steps == 0 or self.step == self.total_steps:
                    # as HF's Trainer: the loss averaged over the interval, the last step's grad norm
                    rec = {
                        "step": self.step,
                        "loss": sum(w[0] for w in window) / len(window),
                        "lr": lr,
                        "grad_norm": float(grad_norm),
                        "epoch": self.epoch,
                        "steps": len(window),
                        "samples": sum(w[1] for w in window),
                        "tokens": sum(w[2] for w in window),
                        "elapsed_s": round(time.time() - t0, 3),
                    }
                    metrics.write(json.dumps(rec) + "\n")
                    metrics.flush()
                    window.clear()
                dt = max(time.time() - t0, 1e-9)
                bar.set_postfix(
                    loss=f"{loss_sum:.4f}",
                    lr=f"{lr:.2e}",
                    samples_s=f"{seen_samples / dt:.1f}",
                    tokens_s=f"{seen_tokens / dt:.0f}",
                )
                bar.update(1)
            if applied and cfg.save_steps > 0 and self.step % cfg.save_steps == 0 and self.step < self.total_steps:
                self.save()
            # every rank stops after the same step: one all-reduce of the flag (a signal may reach one rank)
            if self.step < self.total_steps and signals.agree(stop.received is not None, self.device, self.world):
                return losses, True
        return losses, False

    def _final(self) -> None:
        model_state, _ = self._full_states()
        with ds.gathered(self.model, self.engine):
            if self.rank == 0:
                self._write_final(model_state)
        self._barrier()

    def _write_final(self, model_state) -> None:
        final = os.path.join(self.cfg.output_dir, "final")
        if self.cfg.lora_enable:
            from eagle_fast.train.lora import save_lora

            save_lora(self.model, final)
        else:
            self.model.save_pretrained(final, safe_serialization=True, state_dict=model_state)
        TokenizerFiles(self.tokenizer).save_pretrained(final)
        self.processor.save_pretrained(final)
        if self.cfg.stage == "pretrain":
            torch.save(projector_state(self.model), os.path.join(self.cfg.output_dir, "mm_projector.bin"))
        if self.cfg.stage == "prealign":
            export_prealigned(self.model, os.path.join(self.cfg.output_dir, "prealigned"))
        if any(self.skipped.values()):
            print(f"skipped records: {self.skipped}")
        from eagle_fast.train.plot import loss_curve

        loss_curve(os.path.join(self.cfg.output_dir, "metrics.jsonl"), os.path.join(self.cfg.output_dir, "loss.png"))
