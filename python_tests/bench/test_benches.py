"""The benchmarks run end to end on tiny CPU settings and report every provider (attention: every mode; train: both paths)."""

import csv

from eagle_fast.bench.attention import AttentionBenchConfig, flops, main, run


def test_flops_convention():
    assert flops(2, 1024, 16, 128, False, "fwd") == 4 * 2 * 1024**2 * 16 * 128
    assert flops(2, 1024, 16, 128, True, "fwd") == 2 * 2 * 1024**2 * 16 * 128
    assert flops(1, 8, 1, 8, False, "fwd_bwd") == 3.5 * flops(1, 8, 1, 8, False, "fwd")


def test_tiny_cpu_sweep(tmp_path, capsys):
    cfg = AttentionBenchConfig(device="cpu", dtype="float32", head_dims=(32,), causal=(True,), shapes=((1, 40),),
                               width=64, repeats=1, threads=1, out_dir=str(tmp_path))
    rows = run(cfg)
    assert {(r.provider, r.extra["mode"]) for r in rows} == {
        (p, m) for p in ("eagle_fast", "sdpa", "math reference") for m in ("fwd", "bwd", "fwd_bwd")}
    assert all(r.median_ms > 0 and r.items_per_s > 0 for r in rows)
    main(cfg)
    assert "| B1 S40 H2 D32 causal | fwd | eagle_fast |" in capsys.readouterr().out
    with open(tmp_path / "attention.csv") as f:
        assert len(list(csv.reader(f))) == 1 + len(rows)
    assert (tmp_path / "attention.png").stat().st_size > 0


def test_train_bench_runs(tmp_path):
    from eagle_fast.bench.train import TrainBenchConfig, report, run

    rows = run(TrainBenchConfig(batch_size=2, batches=1, repeats=1, threads=1, out_dir=str(tmp_path)))
    assert {r.provider for r in rows} == {"eagle_fast", "reference ops"} and all(r.items_per_s > 0 for r in rows)
    assert "| reference ops |" in report(rows)


def test_linear_cross_entropy_bench_runs(tmp_path, capsys):
    from eagle_fast.bench.linear_cross_entropy import LinearCrossEntropyBenchConfig, main as lce_main

    rows = lce_main(LinearCrossEntropyBenchConfig(repeats=1, threads=1, shapes=("small",), out_dir=str(tmp_path)))
    assert {r.provider for r in rows} == {f"{p} {s}" for p in ("eager reference", "eagle_fast") for s in ("fwd", "fwd+bwd")}
    assert all(r.median_ms > 0 for r in rows)
    assert "| small V4096 H64 N256 |" in capsys.readouterr().out and (tmp_path / "linear_cross_entropy.png").exists()


def test_chat_bench_runs(tmp_path, capsys):
    from eagle_fast.bench.chat import ChatBenchConfig, main as chat_main

    rows = chat_main(ChatBenchConfig(presets=("eagle-tiny-x5",), reply_tokens=3, repeats=1, threads=1,
                                     out_dir=str(tmp_path)))
    assert [r.provider for r in rows] == ["turn 1", "turn 2 reuse", "turn 2 re-encode", "decode"]
    assert all(r.median_ms > 0 for r in rows)
    assert "| eagle-tiny-x5 prompt~" in capsys.readouterr().out and (tmp_path / "chat.png").stat().st_size > 0


def test_bench_all_writes_every_benchmark(tmp_path):
    from eagle_fast.bench.__main__ import main as bench_main

    assert bench_main(["all", "--quick", "--threads", "1", "--out-dir", str(tmp_path)]) == 0
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    names = ("preprocess", "resize_concat", "attention", "linear_cross_entropy", "train", "chat")
    assert {r["bench"] for r in rows} >= set(names)
    for name in names:
        assert (tmp_path / f"{name}.png").stat().st_size > 0
