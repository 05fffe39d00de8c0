"""The evaluation run: questions -> batched greedy answers appended to a JSONL as they come
(an interrupted run resumes where it stopped), shards merged, the task's official score, a table.

Each prediction file has a fingerprint beside it (`{file}.meta.json`, see eagle_fast.eval.fingerprint):
the model, its weights, the questions and the settings that made it. A run continues a file only
when its own fingerprint matches (otherwise an error says what differs; `overwrite` replaces the
file), and shards merge only when they all match.

Question files use the LLaVA eval layout, one JSON object per line: `question_id`, `image`
(relative to the image folder), `text`, and the gold fields the task's scorer reads (`answer` /
`answers`, `category`, `options`, ...). LLaVA training-style records (`id`, `image`,
`conversations` with the question first and the gold answer second) are read too.

With `conversation`, questions sharing a `conversation_id` are asked as one conversation in
`turn` order, each after the model's own earlier answers (not the gold ones): turn 0 of every
conversation first, then turn 1 with each conversation's first exchange as history, and so on.
Shards then split conversations, not questions.

Outputs in `out/`: `{task}.predictions.jsonl` (or `{task}.shard{k}of{n}.jsonl` per shard) with its
`.meta.json`, then `{task}.results.json` (with the predictions' fingerprint) and `{task}.results.md`.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

from eagle_fast.eval import fingerprint
from eagle_fast.eval.tasks import Task, get_task

IMAGE = "<image>"


def _h(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class EvalConfig:
    task: str = field(metadata={"help": "the benchmark (its scorer, prompt suffix and answer length)"})
    data: str | None = _h(None, "the question JSONL (LLaVA eval layout); easy-vqa: built in")
    out: str = _h("results", "folder of the predictions, results.json and results.md")
    model: str | None = _h(None, "model directory or preset (not needed to score)")
    image_folder: str = _h(".", "folder the questions' image paths are relative to")
    template: str = _h("vicuna_v1", "chat template the model was trained with")
    batch_size: int = _h(8, "questions generated at once")
    scheduler: str = _h(
        "batch",
        (
            "batch: the continuous-batching engine (BatchEngine: paged KV, encoder cache, no padding); sequential: "
            "the static left-padded batches of Engine.generate_batch"
        ),
    )
    num_shards: int = _h(1, "split the questions over this many runs (any machines, same --out)")
    shard: int = _h(0, "which shard this run answers, 0 .. num_shards - 1")
    limit: int | None = _h(None, "evaluate the first N questions only")
    score_only: bool = _h(False, "score the existing prediction file(s), no model")
    merge: bool = _h(False, "merge finished shard files and score")
    max_new_tokens: int | None = _h(None, "answer length (default: the task's)")
    dtype: str = _h("auto", "model dtype (auto: bf16 on CUDA, fp32 on CPU)")
    device: str = _h("auto", "cpu, cuda, cuda:1, ... (auto: cuda when available)")
    conversation: bool = _h(
        False,
        (
            "ask the questions sharing a 'conversation_id' as one conversation in 'turn' order, each after the "
            "model's own earlier answers (follow-up questions); the scores then add first / follow-up accuracy"
        ),
    )
    overwrite: bool = field(
        default=False,
        metadata={
            "help": (
                "replace this task's (this shard's) prediction file, made with another model or settings, instead of "
                "refusing to mix the two"
            )
        },
    )


def load_questions(path: str, limit: int | None = None) -> list[dict]:
    """The question file as records with `question_id`, `image` (or None), `text`; a malformed line
    is an error naming the file and line."""
    out, seen = [], set()
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                out.append(_question(rec))
            except (ValueError, KeyError, TypeError, IndexError) as e:
                raise ValueError(f"{path}:{n}: not a question record ({e})") from None
            if out[-1]["question_id"] in seen:
                raise ValueError(f"{path}:{n}: duplicate question_id {out[-1]['question_id']!r}")
            seen.add(out[-1]["question_id"])
            if limit is not None and len(out) >= limit:
                break
    return out


def _question(rec: dict) -> dict:
    if "conversations" in rec and "text" not in rec:  # LLaVA training layout
        conv = rec["conversations"]
        rec = {
            **{k: v for k, v in rec.items() if k != "conversations"},
            "question_id": rec.get("question_id", rec["id"]),
            "text": conv[0]["value"].replace(IMAGE + "\n", "").replace(IMAGE, ""),
        }
        if "answer" not in rec and len(conv) > 1:
            rec["answer"] = conv[1]["value"]
    if "question_id" not in rec or "text" not in rec:
        raise KeyError("needs 'question_id' and 'text'")
    return rec


def _shard_path(cfg: EvalConfig, shard: int) -> str:
    name = (
        f"{cfg.task}.predictions.jsonl" if cfg.num_shards == 1 else f"{cfg.task}.shard{shard}of{cfg.num_shards}.jsonl"
    )
    return os.path.join(cfg.out, name)


def _done_ids(path: str) -> set:
    """question_ids already answered (a torn last line from a killed run is dropped and rewritten)."""
    return set(_done(path))


def _done(path: str) -> dict:
    """question_id -> prediction of the questions already answered (a torn last line is dropped)."""
    done, good = {}, 0
    if not os.path.exists(path):
        return done
    with open(path, "rb") as f:
        for line in f:
            try:
                rec = json.loads(line)
                done[rec["question_id"]] = rec.get("prediction", "")
                good += len(line)
            except (ValueError, KeyError):
                break
    with open(path, "r+b") as f:
        f.truncate(good)
    return done


def _reply(tok, ids: list[int], stop: str) -> str:
    """Generated ids -> the answer text: up to the template's stop string, special tokens dropped."""
    text = tok.decode(ids, skip_special_tokens=False)
    if stop and stop in text:
        ids = tok(text[: text.index(stop)], add_special_tokens=False)["input_ids"]
    return tok.decode(ids, skip_special_tokens=True).strip()


def _conversations(questions: list[dict]) -> list[list[dict]]:
    """Questions grouped by `conversation_id` (first-appearance order), each group in `turn` order."""
    convs: dict = {}
    for q in questions:
        if "conversation_id" not in q or "turn" not in q:
            raise ValueError(f"question {q['question_id']!r}: --conversation needs 'conversation_id' and 'turn' fields")
        convs.setdefault(q["conversation_id"], []).append(q)
    for cid, conv in convs.items():
        conv.sort(key=lambda q: q["turn"])
        turns = [q["turn"] for q in conv]
        if len(set(turns)) != len(turns):
            raise ValueError(f"conversation {cid!r}: turn {turns} repeated")
    return list(convs.values())


def _waves(cfg: EvalConfig, questions: list[dict], done: dict) -> list[list[tuple[dict, list[dict]]]]:
    """This shard's unanswered questions with their conversation's earlier questions, in the order
    they can be asked: one wave for single questions; with `conversation`, a wave per turn index
    (a turn's prompt needs the answers of the turns before it)."""
    if not cfg.conversation:
        return [
            [
                (q, [])
                for i, q in enumerate(questions)
                if i % cfg.num_shards == cfg.shard and q["question_id"] not in done
            ]
        ]
    mine = [c for k, c in enumerate(_conversations(questions)) if k % cfg.num_shards == cfg.shard]
    depth = max((len(c) for c in mine), default=0)
    return [[(c[t], c[:t]) for c in mine if len(c) > t and c[t]["question_id"] not in done] for t in range(depth)]


def generate(cfg: EvalConfig, questions: list[dict], task: Task) -> str:
    """Answers this shard's questions not yet in its prediction file; returns the file."""
    from tqdm import tqdm

    from eagle_fast.data.templates import get_template
    from eagle_fast.images import load_image_file
    from eagle_fast.inference import load_model
    from eagle_fast.inference.batch_engine import BatchEngine
    from eagle_fast.inference.engine import Engine, GenerationConfig
    from eagle_fast.inference.scheduler import EngineConfig
    from eagle_fast.inference.session import prompt_ids

    os.makedirs(cfg.out, exist_ok=True)
    path = _shard_path(cfg, cfg.shard)
    max_new_tokens = cfg.max_new_tokens or task.max_new_tokens
    # checked before anything touches the file (even the torn-line repair): another run's file stays as it is
    fingerprint.claim(
        path,
        fingerprint.of_run(cfg, max_new_tokens),
        overwrite=cfg.overwrite,
        model_path=os.path.abspath(cfg.model) if os.path.isdir(cfg.model) else cfg.model,
        data_path=os.path.abspath(cfg.data),
        shard=cfg.shard,
    )
    done = _done(path)
    waves = _waves(cfg, questions, done)
    if not any(waves):
        return path
    model, tok, proc = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device)
    if cfg.scheduler not in ("batch", "sequential"):
        raise ValueError(f"--scheduler {cfg.scheduler!r}: batch or sequential")
    engine = (
        BatchEngine(model, tok, EngineConfig(max_num_seqs=cfg.batch_size))
        if cfg.scheduler == "batch"
        else Engine(model, tok)
    )
    stop = get_template(cfg.template).stop  # a reply ends there, as in chat (chatml: <|im_end|>, not EOS)
    gen = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, temperature=0, stop=(stop,) if stop else ())
    bar = tqdm(total=sum(map(len, waves)), desc=f"{cfg.task} shard {cfg.shard}/{cfg.num_shards}", unit="q")
    with open(path, "a", encoding="utf-8") as out:
        for todo in waves:
            for start in range(0, len(todo), cfg.batch_size):
                batch, prompts, images, failed = todo[start : start + cfg.batch_size], [], [], []
                for q, before in batch:
                    # the conversation's image (it is the first turn's) comes with its first question
                    first = before[0] if before else q
                    try:  # a missing or broken image fails its question, not the run
                        img = load_image_file(first["image"], cfg.image_folder) if first.get("image") else None
                    except (OSError, ValueError) as e:
                        failed.append({**q, "prediction": "", "error": f"{type(e).__name__}: {e}"})
                        continue
                    turns = []
                    for k, p in enumerate(before + [q]):
                        text = (IMAGE + "\n" if img is not None and k == 0 else "") + p["text"] + task.prompt_suffix
                        turns.append(("user", text))
                        if p is not q:  # the model's own earlier answer, as a user of the chat would see it
                            turns.append(("assistant", done[p["question_id"]]))
                    prompts.append((q, prompt_ids(cfg.template, turns, tok)))
                    images.append(proc([img], device=model.device) if img is not None else None)
                answers = engine.generate_batch([p for _, p in prompts], images, gen) if prompts else []
                lines = failed + [{**q, "prediction": _reply(tok, a, stop)} for (q, _), a in zip(prompts, answers)]
                for rec in lines:
                    done[rec["question_id"]] = rec["prediction"]
                    out.write(json.dumps(rec, ensure_ascii=False) + "\n")
                out.flush()
                os.fsync(out.fileno())
                bar.update(len(batch))
    bar.close()
    return path


def merge(cfg: EvalConfig) -> list[dict]:
    """All shards' predictions, in shard order; a missing or unfinished shard, or shards made with
    different models or settings, is an error."""
    return _merged(cfg)[0]


def _merged(cfg: EvalConfig) -> tuple[list[dict], str | None]:
    """(records, their common fingerprint); with `data` (not score-only) the shards must also have
    answered these questions."""
    paths = [_shard_path(cfg, k) for k in range(cfg.num_shards)]
    for k, path in enumerate(paths):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: shard {k} of {cfg.num_shards} has not run")
    digest = fingerprint.check_shards(paths, None if cfg.score_only else fingerprint.data_components(cfg))
    recs = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            recs += [json.loads(line) for line in f if line.strip()]
    return recs, digest


def score(
    cfg: EvalConfig, records: list[dict], expected: int | None, elapsed: float, fingerprint_digest: str | None = None
) -> dict:
    task = get_task(cfg.task)
    if expected is not None and len(records) != expected:
        raise ValueError(
            f"{cfg.task}: {len(records)} predictions for {expected} questions; run every shard "
            f"to the end (an interrupted shard resumes where it stopped)"
        )
    errors = [r for r in records if r.get("error")]
    result = {
        "task": cfg.task,
        "metric": task.metric,
        "n": len(records),
        "errors": len(errors),
        "elapsed_s": round(elapsed, 1),
        "fingerprint": fingerprint_digest,
        **task.scorer(records),
    }
    os.makedirs(cfg.out, exist_ok=True)
    with open(os.path.join(cfg.out, f"{cfg.task}.results.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    with open(os.path.join(cfg.out, f"{cfg.task}.results.md"), "w") as f:
        f.write(table(result) + "\n")
    return result


def table(result: dict[str, Any]) -> str:
    extra = f", majority baseline {100 * result['majority_baseline']:.1f}" if "majority_baseline" in result else ""
    return (
        "| task | metric | score | n | errors | elapsed (s) |\n|---|---|---|---|---|---|\n"
        f"| {result['task']} | {result['metric']}{extra} | {result['score']:.2f} | {result['n']} | "
        f"{result['errors']} | {result['elapsed_s']} |"
    )


def run(cfg: EvalConfig) -> dict | None:
    """Generates (unless score_only / merge) and scores when every shard is complete; returns the
    result, or None for a shard whose siblings are still to be merged."""
    t0 = time.time()
    if cfg.data is None and not cfg.score_only:
        raise ValueError("--data is needed (a question JSONL), unless --score-only")
    questions = None if cfg.score_only else load_questions(cfg.data, cfg.limit)
    if not (cfg.score_only or cfg.merge):
        if cfg.model is None:
            raise ValueError("--model is needed to generate (or pass --score-only)")
        generate(cfg, questions, get_task(cfg.task))
        if cfg.num_shards > 1:
            return None  # `--merge` after every shard finished
    records, digest = _merged(cfg)
    return score(cfg, records, None if questions is None else len(questions), time.time() - t0, digest)
