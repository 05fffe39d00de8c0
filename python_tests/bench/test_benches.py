"""The benchmarks run end to end on tiny CPU settings and report every provider (attention: every mode; train and
linear_cross_entropy: every path, each baseline doing the same work as the fast path)."""

import csv

from eagle_fast.bench.attention import AttentionBenchConfig, flops, main, run


def test_flops_convention():
    assert flops(2, 1024, 16, 128, False, "fwd") == 4 * 2 * 1024**2 * 16 * 128
    assert flops(2, 1024, 16, 128, True, "fwd") == 2 * 2 * 1024**2 * 16 * 128
    assert flops(1, 8, 1, 8, False, "fwd_bwd") == 3.5 * flops(1, 8, 1, 8, False, "fwd")


def test_tiny_cpu_sweep(tmp_path, capsys):
    cfg = AttentionBenchConfig(
        device="cpu",
        dtype="float32",
        head_dims=(32,),
        causal=(True,),
        shapes=((1, 40),),
        width=64,
        repeats=1,
        threads=1,
        out_dir=str(tmp_path),
    )
    rows = run(cfg)
    assert {(r.provider, r.extra["mode"]) for r in rows} == {
        (p, m) for p in ("eagle_fast", "sdpa", "math reference") for m in ("fwd", "bwd", "fwd_bwd")
    }
    assert all(r.median_ms > 0 and r.items_per_s > 0 for r in rows)
    main(cfg)
    assert "| B1 S40 H2 D32 causal | fwd | eagle_fast |" in capsys.readouterr().out
    with open(tmp_path / "attention.csv") as f:
        assert len(list(csv.reader(f))) == 1 + len(rows)
    assert (tmp_path / "attention.png").stat().st_size > 0


def test_train_bench_runs(tmp_path):
    from eagle_fast.bench.train import WHAT, TrainBenchConfig, report, run

    rows = run(
        TrainBenchConfig(
            presets=("eagle-tiny-x5",), batch_size=2, batches=1, repeats=1, threads=1, out_dir=str(tmp_path)
        )
    )
    assert [r.provider for r in rows] == ["eagle_fast", "transformers", "reference ops"]
    assert all(r.items_per_s > 0 and r.shape == "eagle-tiny-x5 B2" for r in rows)
    by = {r.provider: r for r in rows}
    assert by["transformers"].extra["role"] == "baseline"
    assert by["transformers"].extra["path"] == "transformers sdpa + full-logits loss + eager fusion"
    assert by["transformers"].extra["x_vs_transformers"] == 1.0
    assert by["reference ops"].extra["x_vs_reference_ops"] == 1.0
    assert by["eagle_fast"].extra["x_vs_transformers"] > 0 and by["eagle_fast"].extra["path"] == WHAT["eagle_fast"]
    assert 0.5 < by["eagle_fast"].extra["lm_head_flop_share"] < 1  # the tiny LLM is mostly its 32k head
    text = report(rows)
    assert "| vs transformers sdpa + full-logits loss + eager fusion | vs reference ops |" in text
    assert "| eagle-tiny-x5 B2 | transformers | transformers sdpa + full-logits loss + eager fusion |" in text


def test_train_baseline_does_the_same_work():
    """The transformers baseline takes transformers' path (full (B, L, V) logits, sdpa during the
    call only) and computes the fast path's loss and gradients on the same batch, in fp32."""
    import torch

    from eagle_fast.bench.train import attn_implementation, build, forward, spliced_lengths

    s = build("tiny-x5", "eagle-tiny-x5", 2, 1)
    b = s.batches[0]
    impls = [m.config._attn_implementation for m in s.model.modules() if hasattr(m, "_can_set_attn_implementation")]
    assert s.model.config._attn_implementation == "eagle_attention"
    with attn_implementation(s.model, "sdpa"):
        assert s.model.config._attn_implementation == "sdpa"
    losses, grads = {}, {}
    for p in ("eagle_fast", "transformers", "reference ops"):
        out = forward(s, b, p)
        out.loss.backward()
        losses[p] = out.loss.detach()
        grads[p] = [
            w.grad.clone()
            for w in (
                s.model.lm_head.weight,
                s.model.model.mm_projector[0].weight,
                s.model.model.layers[0].self_attn.q_proj.weight,
            )
        ]
        s.model.zero_grad(set_to_none=True)
        if p == "transformers":  # the LM head ran over every spliced row
            assert out.logits.shape == (2, int(spliced_lengths(b, s.grid).max()), s.model.config.vocab_size)
        else:  # the fused loss (the reference op inside it for "reference ops")
            assert out.logits is None
    after = [m.config._attn_implementation for m in s.model.modules() if hasattr(m, "_can_set_attn_implementation")]
    assert after == impls
    for p in ("transformers", "reference ops"):
        torch.testing.assert_close(losses[p], losses["eagle_fast"], rtol=1e-5, atol=1e-6)
        for g, g_fast in zip(grads[p], grads["eagle_fast"]):
            torch.testing.assert_close(g, g_fast, rtol=1e-4, atol=1e-6)


def test_train_bench_small_preset_fits_the_recipe():
    from eagle_fast.bench.train import build, spliced_lengths

    s = build("tiny-x5", "eagle-small-x5", 1, 1)
    b = s.batches[0]
    assert s.grid == 32 and s.model.config.vocab_size == 32000 and s.model.config.hidden_size == 576
    assert int(spliced_lengths(b, s.grid).max()) > 1024 and int((b["labels"] != -100).sum()) > 0


def test_linear_cross_entropy_bench_runs(tmp_path, capsys):
    from eagle_fast.bench.linear_cross_entropy import LinearCrossEntropyBenchConfig
    from eagle_fast.bench.linear_cross_entropy import main as lce_main

    for dtype in ("float32", "bfloat16"):
        rows = lce_main(
            LinearCrossEntropyBenchConfig(repeats=1, threads=1, dtype=dtype, shapes=("small",), out_dir=str(tmp_path))
        )
        assert {r.provider for r in rows} == {
            f"{p} {s}" for p in ("eager reference", "eager learned rows", "eagle_fast") for s in ("fwd", "fwd+bwd")
        }
        assert all(r.median_ms > 0 and r.dtype == dtype for r in rows)
        labels = {r.provider.rsplit(" ", 1)[0]: r.extra["baseline"] for r in rows}
        assert labels == {
            "eager reference": "eager F.linear over all rows + F.cross_entropy",
            "eager learned rows": "eager F.linear over learned rows + F.cross_entropy",
            "eagle_fast": "",
        }
        fast = [r for r in rows if r.provider.startswith("eagle_fast")]
        assert all(r.extra["x_vs_eager_reference"] > 0 and r.extra["x_vs_eager_learned_rows"] > 0 for r in fast)
        out = capsys.readouterr().out
        assert "| vs eager all rows | vs eager learned rows |" in out
        assert f"| small V4096 H64 N256 | {dtype} |" in out
    assert (tmp_path / "linear_cross_entropy.png").exists()


def test_linear_cross_entropy_baselines_compute_the_op():
    """Both eager baselines give the op's loss and gradients (fp32 tightly; bf16 inputs stay bf16)."""
    import torch

    from eagle_fast.bench.linear_cross_entropy import PROVIDERS, loss_fn, make_problem

    for dtype, tol in ((torch.float32, dict(rtol=1e-5, atol=1e-6)), (torch.bfloat16, dict(rtol=2e-2, atol=2e-3))):
        hidden, weight, labels = make_problem(4096, 64, 256, 0.25, dtype, "cpu")
        got = {}
        for p in PROVIDERS:
            loss = loss_fn(p)(hidden, weight, labels)
            assert loss.dtype == torch.float32
            got[p] = (loss.detach(), *torch.autograd.grad(loss, (hidden, weight)))
        for p in ("eager reference", "eager learned rows"):
            for x, y in zip(got[p], got["eagle_fast"]):
                assert x.dtype == y.dtype
                torch.testing.assert_close(x.float(), y.float(), **tol)


def test_chat_bench_runs(tmp_path, capsys):
    from eagle_fast.bench.chat import ChatBenchConfig
    from eagle_fast.bench.chat import main as chat_main

    rows = chat_main(
        ChatBenchConfig(presets=("eagle-tiny-x5",), reply_tokens=3, repeats=1, threads=1, out_dir=str(tmp_path))
    )
    assert [r.provider for r in rows] == ["turn 1", "turn 2 reuse", "turn 2 re-encode", "decode"]
    assert all(r.median_ms > 0 for r in rows)
    assert "| eagle-tiny-x5 prompt~" in capsys.readouterr().out and (tmp_path / "chat.png").stat().st_size > 0


def test_bench_all_writes_every_benchmark(tmp_path):
    from eagle_fast.bench.__main__ import main as bench_main

    assert bench_main(["all", "--quick", "--threads", "1", "--out-dir", str(tmp_path)]) == 0
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    names = ("preprocess", "resize_concat", "attention", "linear_cross_entropy", "train", "chat", "serve")
    assert {r["bench"] for r in rows} >= set(names)
    for name in names:
        assert (tmp_path / f"{name}.png").stat().st_size > 0


def test_paged_attention_bench_runs(tmp_path, capsys):
    from eagle_fast.bench.paged_attention import PagedAttentionBenchConfig, heads, main

    assert heads("eagle-small-x5") == (9, 3, 64)  # SmolLM2-135M: 576 wide, 9 heads, 3 kv heads
    rows = main(
        PagedAttentionBenchConfig(
            device="cpu",
            batches=(2,),
            context=40,
            chunks=(12,),
            chunk_prefix=20,
            repeats=1,
            min_sample_ms=0.0,
            threads=1,
            out_dir=str(tmp_path),
        )
    )
    decode, chunk = rows[:4], rows[4:]
    assert [r.provider for r in decode] == ["eagle_fast", "eagle_fast unchecked", "gather+sdpa", "reference"]
    assert [r.provider for r in chunk] == [
        "eagle_fast",
        "eagle_fast unchecked",
        "gather+sdpa",
        "gather+flash",
        "reference",
    ]
    assert all(r.median_ms > 0 and r.items_per_s > 0 for r in rows)
    # 12 rows after 20 cached keys see 21 .. 32 keys: 4 * D * Hq flops per (row, key)
    assert chunk[0].extra["flops"] == 4 * 64 * 9 * sum(range(21, 33))
    assert (tmp_path / "paged_attention_prefill.png").stat().st_size > 0
    # keys 40 + (37 b mod 64) - 32 for b = 0, 1: 8 and 45 rows of 3 kv heads x 64 fp32, K and V
    assert rows[0].extra["kv_bytes"] == (8 + 45) * 3 * 64 * 2 * 4
    assert "| B2 ctx~40 bs16 Hq9 Hkv3 D64 | gather+sdpa |" in capsys.readouterr().out
    assert (tmp_path / "paged_attention.png").stat().st_size > 0


def test_serve_ideal_formula_and_percentiles():
    import math

    import pytest

    from eagle_fast.bench.serve import percentile
    from eagle_fast.bench.serve_ideal import ideal_tokens_per_s

    # c = 4 requests of N = 128 tokens, prefill 0.5 s each, decode step at batch 4 0.02 s:
    # 4 * 128 tokens in 4 * 0.5 s of prefills + 128 * 0.02 s of steps = 512 / 4.56 s
    assert ideal_tokens_per_s(4, 128, 0.5, 0.02) == pytest.approx(512 / 4.56)
    assert ideal_tokens_per_s(1, 10, 1.0, 0.1) == pytest.approx(10 / 2.0)  # one prefill, then 10 steps
    # ranks interpolated linearly: p50 of 1..4 is 2.5; p99 of {0, 100} is 99
    assert percentile([4, 1, 3, 2], 50) == 2.5 and percentile([0.0, 100.0], 99) == pytest.approx(99.0)
    assert math.isnan(percentile([], 50))


def test_serve_images_are_distinct():
    from eagle_fast.bench.serve_load import synthetic_image

    pixels = [synthetic_image(k, 64).tobytes() for k in range(300)]
    assert len(set(pixels)) == 300
    assert synthetic_image(7, 64).tobytes() == pixels[7]


def test_serve_bench_runs(tmp_path, capsys):
    from eagle_fast.bench.serve import ServeBenchConfig
    from eagle_fast.bench.serve import main as serve_main
    from eagle_fast.bench.serve_ideal import ideal_tokens_per_s

    rows = serve_main(
        ServeBenchConfig(
            model="eagle-tiny-x5",
            concurrency=(1, 2),
            max_tokens=4,
            patterns=("burst",),
            image_size=64,
            threads=1,
            prefill_repeats=1,
            decode_steps=2,
            out_dir=str(tmp_path),
        )
    )
    assert [(r.provider, r.extra["concurrency"]) for r in rows] == [
        ("batch", 1),
        ("sequential", 1),
        ("ideal", 1),
        ("batch", 2),
        ("sequential", 2),
        ("ideal", 2),
    ]
    for r in rows:
        c, e = r.extra["concurrency"], r.extra
        assert r.items_per_s > 0 and e["mean_reply_tokens"] == 4, r  # ignore_eos: full-length replies
        if r.provider == "ideal":
            assert r.items_per_s == ideal_tokens_per_s(c, e["mean_reply_tokens"], e["prefill_s"], e["step_s"])
            continue
        assert e["requests"] == c and e["errors"] == 0 and e["ttft_p50_ms"] > 0 and e["x_of_ideal"] > 0
        # every request carried an image of its own: the batch engine ran the experts once per request
        assert e["encoder_runs"] == (c if r.provider == "batch" else None)
    out = capsys.readouterr().out
    assert "| eagle-tiny-x5 burst c2 N4 | batch | 2 |" in out and "in-process: prefill" in out
    # the levels ran A B, B A: a drift of the machine's speed hits both schedulers alike
    runs = [line.split(":")[0] for line in out.splitlines() if line.endswith("errors")]
    assert runs == ["batch burst c=1", "sequential burst c=1", "sequential burst c=2", "batch burst c=2"]
    with open(tmp_path / "serve.csv") as f:
        assert len(list(csv.reader(f))) == 1 + len(rows)


def test_serve_bench_same_image(tmp_path):
    from eagle_fast.bench.serve import ServeBenchConfig
    from eagle_fast.bench.serve import main as serve_main

    rows = serve_main(
        ServeBenchConfig(
            model="eagle-tiny-x5",
            concurrency=(3,),
            max_tokens=2,
            patterns=("burst",),
            schedulers=("batch",),
            same_image=True,
            ideal=False,
            image_size=64,
            threads=1,
            out_dir=str(tmp_path),
        )
    )
    assert len(rows) == 1 and rows[0].shape == "eagle-tiny-x5 burst c3 N2 same-image"
    assert rows[0].extra["errors"] == 0 and rows[0].extra["encoder_runs"] == 1  # one image, encoded once
