"""Benchmark of training steps: full optimizer steps (forward, backward, AdamW) of the same model on
the same pre-collated batches of the built-in easy-VQA data, per path, timed side by side.

Paths (providers), on one model and one set of weights:
  eagle_fast     the package's default: attention on eagle_fast's op ("eagle_attention": LLM,
                 CLIP, Pix2Struct, EVA-02; SAM keeps transformers' sdpa), the C++ resize_concat
                 fusion, and the loss from `linear_cross_entropy` over the learned rows only (the
                 logits are never built).
  transformers   the baseline a user would otherwise run ("transformers sdpa + full-logits loss +
                 eager fusion"): attn_implementation="sdpa" (LLM, CLIP, SAM, Pix2Struct), the LM
                 head over every one of the L spliced rows, then transformers' ForCausalLMLoss
                 (logits upcast to fp32, shifted cross entropy), and the fusion as F.interpolate +
                 torch.cat (`reference_ops()`; under it EVA-02, the one expert with no
                 transformers class, runs its attention as plain softmax(q k^T) v).
  reference ops  every eagle_fast op on its pure-torch reference (fp32 math attention in the LLM,
                 full-logits loss, eager fusion): the package's own naive path.
The headline ratio is eagle_fast against `transformers`. How the baseline gets transformers' path:
EagleLlamaForCausalLM.forward takes the fused loss in train mode with labels unless the caller asks
for logits; `logits_to_keep=L` (all L rows, what transformers' default 0 keeps) is that switch, and
the forward is then LlamaForCausalLM.forward with its own loss function.

Presets (the recipe supplies data, tokenizer and text budget; tiny-x5's tokenizer: vocabulary 32000):
  eagle-tiny-x5   64-wide 2-layer LLM, 4 x 4 grid: the LM head over all rows is ~93% of the
                  baseline's forward FLOPs, so its ratio mostly measures skipping unlearned rows.
  eagle-small-x5  SmolLM2-135M's LLM (576 wide, 30 layers), 32 x 32 grid (1024 image rows per
                  image), 512-pixel experts: the LM head is ~10% of the FLOPs, a realistic share.
The report prints that share per preset. Default sizes (SIZES): tiny 4 batches of 8, 5 rounds;
small 1 batch of 1, 3 rounds after one untimed round (a step takes seconds there, so a warm-up
call before every sample buys nothing). The default run (both presets, three paths) took about
3 minutes on a 2-core AMD EPYC with nothing else running (tiny ~1, small ~2; a small step ~7.5 s
eagle_fast, ~8.5 s transformers, ~15 s reference ops), and 4 while other jobs shared the cores.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from eagle_fast.bench.harness import Row, publish, time_interleaved_ms
from eagle_fast.ops import reference_ops

PROVIDERS = ("eagle_fast", "transformers", "reference ops")
BASELINE = "transformers"
WHAT = {  # what each provider runs, recorded in every row
    "eagle_fast": "eagle_attention + fused resize_concat + linear_cross_entropy (learned rows)",
    "transformers": "transformers sdpa + full-logits loss + eager fusion",
    "reference ops": "eagle_fast reference ops (math attention, full-logits loss, eager fusion)",
}
ROLE = {"eagle_fast": "fast path", "transformers": "baseline", "reference ops": "reference"}
# preset -> (batch_size, batches, repeats, warmup calls before each timed sample)
SIZES = {"eagle-small-x5": (1, 1, 3, 0)}
DEFAULT_SIZE = (8, 4, 5, 1)


@dataclass
class TrainBenchConfig:
    recipe: str = field(
        default="tiny-x5",
        metadata={
            "help": "training recipe with built-in data (data, tokenizer, text length); --presets replace its model"
        },
    )
    presets: tuple[str, ...] = field(
        default=("eagle-tiny-x5", "eagle-small-x5"),
        metadata={"help": "model presets to benchmark, one after the other"},
    )
    batch_size: int | None = field(
        default=None, metadata={"help": "samples per optimizer step (default: the preset's, 8 tiny / 1 small)"}
    )
    batches: int | None = field(
        default=None, metadata={"help": "distinct batches per timed call (default: the preset's, 4 tiny / 1 small)"}
    )
    repeats: int | None = field(
        default=None, metadata={"help": "timed rounds, median reported (default: the preset's, 5 tiny / 3 small)"}
    )
    providers: tuple[str, ...] = field(
        default=PROVIDERS, metadata={"help": "paths to time: eagle_fast, transformers (the baseline), reference ops"}
    )
    threads: int = field(default=2, metadata={"help": "torch CPU threads"})
    out_dir: str = field(default="bench_results", metadata={"help": "where train.csv and train.png go"})


@dataclass
class Setup:
    preset: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    batches: list[dict]
    grid: int


def build(recipe_name: str, preset: str, batch_size: int, batches: int) -> Setup:
    """The recipe's SFT model (with `preset` as its model), data and AdamW, and `batches` collated
    batches of `batch_size` samples. A preset with a larger grid gets the recipe's text budget on
    top of its image rows, so the same samples fit whole."""
    from eagle_fast.data import EagleCollator
    from eagle_fast.model import presets
    from eagle_fast.train.builders import build_data, build_model, build_tokenizer
    from eagle_fast.train.config import recipe
    from eagle_fast.train.loop import param_groups

    with tempfile.TemporaryDirectory() as tmp:
        tcfg = recipe(recipe_name, "sft", output_dir=os.path.join(tmp, "run"))
        if preset != tcfg.preset:
            extra_rows = presets.get(preset).mm_grid ** 2 - presets.get(tcfg.preset).mm_grid ** 2
            tcfg = tcfg.replace(preset=preset, model_max_length=tcfg.model_max_length + max(0, extra_rows))
        tok = build_tokenizer(tcfg)
        torch.manual_seed(0)
        model, proc = build_model(tcfg, tok)
        data = build_data(tcfg, tok, proc, model)
        collate = EagleCollator(tok.pad_token_id)
        if len(data) < batches * batch_size:
            raise ValueError(f"{batches} batches of {batch_size}: the data has {len(data)} samples")
        out = [collate([data[i] for i in range(k * batch_size, (k + 1) * batch_size)]) for k in range(batches)]
    model.train()
    opt = torch.optim.AdamW(param_groups(model, tcfg), lr=1e-4)
    return Setup(preset, model, opt, out, model.config.mm_grid)


def spliced_lengths(batch: dict, grid: int) -> torch.Tensor:
    """(B,) rows each sample has once its image placeholders (-200) become grid^2 rows each."""
    mask = batch["attention_mask"].bool()
    images = ((batch["input_ids"] == -200) & mask).sum(1)
    return mask.sum(1) - images + images * grid**2


@contextlib.contextmanager
def attn_implementation(model: torch.nn.Module, name: str) -> Iterator[None]:
    """model.set_attn_implementation(name) within the block (it reaches the LLM and the
    transformers experts: CLIP, SAM, Pix2Struct); afterwards every config gets its own previous
    choice back (the LLM and CLIP "eagle_attention", SAM "sdpa")."""
    from transformers import PreTrainedModel

    saved = [(m.config, m.config._attn_implementation) for m in model.modules() if isinstance(m, PreTrainedModel)]
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        for config, impl in saved:
            config._attn_implementation = impl


def forward(s: Setup, batch: dict, provider: str):
    """One training forward of `batch` on `provider`'s path, called as the training loop calls it
    (num_items_in_batch: the batch's learned tokens) -> CausalLMOutputWithPast."""
    n_items = torch.tensor(int((batch["labels"][:, 1:] != -100).sum()))
    args = (batch["input_ids"], batch["attention_mask"])
    kw = dict(labels=batch["labels"], images=batch["images"], num_items_in_batch=n_items)
    if provider == "eagle_fast":
        return s.model(*args, **kw)
    if provider == "transformers":  # logits for all L rows: the (B, L, V) head, then ForCausalLMLoss
        rows = int(spliced_lengths(batch, s.grid).max())
        with attn_implementation(s.model, "sdpa"), reference_ops():
            return s.model(*args, logits_to_keep=rows, **kw)
    if provider == "reference ops":
        with reference_ops():
            return s.model(*args, **kw)
    raise ValueError(f"unknown provider {provider!r}; known: {', '.join(PROVIDERS)}")


def steps(s: Setup, provider: str):
    def fn():
        for b in s.batches:
            forward(s, b, provider).loss.backward()
            s.optimizer.step()
            s.optimizer.zero_grad(set_to_none=True)

    return fn


def lm_head_share(s: Setup) -> float:
    """Share of the LM head over all rows (2 B L V H) in the baseline's forward FLOPs on the first
    batch, counted by FlopCounterMode with sdpa on its math backend (its fused CPU kernels are not
    counted)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    b = s.batches[0]
    rows = int(spliced_lengths(b, s.grid).max()) * b["input_ids"].shape[0]
    head = 2 * rows * s.model.lm_head.weight.numel()
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        forward(s, b, "transformers")
    return head / counter.get_total_flops()


def run(cfg: TrainBenchConfig) -> list[Row]:
    unknown = [p for p in cfg.providers if p not in PROVIDERS]
    if unknown:
        raise ValueError(f"unknown providers {unknown}; known: {', '.join(PROVIDERS)}")
    torch.set_num_threads(cfg.threads)
    rows: list[Row] = []
    for preset in cfg.presets:
        bs, nb, repeats, warmup = SIZES.get(preset, DEFAULT_SIZE)
        bs, nb, repeats = cfg.batch_size or bs, cfg.batches or nb, cfg.repeats or repeats
        s = build(cfg.recipe, preset, bs, nb)
        fns = {p: steps(s, p) for p in cfg.providers}
        if warmup == 0:  # one untimed round instead of a warm-up call before every sample
            for fn in fns.values():
                fn()
        times = time_interleaved_ms(fns, repeats=repeats, warmup=warmup)
        share = round(lm_head_share(s), 4)
        tokens = sum(int(spliced_lengths(b, s.grid).sum()) for b in s.batches)
        for p, ms in times.items():
            extra = {
                "tokens_per_s": round(tokens / ms * 1e3, 1),
                "batches": nb,
                "role": ROLE[p],
                "path": WHAT[p],
                "lm_head_flop_share": share,
            }
            for ref in (BASELINE, "reference ops"):
                if ref in times:
                    extra[f"x_vs_{ref.replace(' ', '_')}"] = round(times[ref] / ms, 3)
            rows.append(
                Row("train", p, "cpu", "float32", cfg.threads, f"{preset} B{bs}", ms, bs * nb / ms * 1e3, extra)
            )
        del s, fns
    return rows


def report(rows: list[Row]) -> str:
    has_ref = any(r.provider == "reference ops" for r in rows)
    head = ["preset", "path", "what it runs", "samples/s", "tokens/s", f"vs {WHAT[BASELINE]}"]
    head += ["vs reference ops"] if has_ref else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ratios = [r.extra.get("x_vs_transformers")] + ([r.extra.get("x_vs_reference_ops")] if has_ref else [])
        cells = [r.shape, r.provider, r.extra["path"], f"{r.items_per_s:.2f}", str(r.extra["tokens_per_s"])]
        cells += ["-" if x is None else f"{x:.2f}x" for x in ratios]
        lines.append("| " + " | ".join(cells) + " |")
    shares = {r.shape: r.extra["lm_head_flop_share"] for r in rows}
    lines.append("")
    lines += [
        f"{shape}: the LM head over every row is {100 * x:.0f}% of the baseline's forward FLOPs"
        for shape, x in shares.items()
    ]
    return "\n".join(lines)


def main(cfg: TrainBenchConfig) -> list[Row]:
    rows = run(cfg)
    publish(
        rows,
        report(rows),
        cfg.out_dir,
        "train",
        f"training steps ({cfg.recipe} data)",
        machine_note=f", threads={cfg.threads}",
        ylabel="samples / s (higher is better)",
        label=lambda r: f"{r.shape}\n{r.provider}",
    )
    return rows
