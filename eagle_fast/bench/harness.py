"""Shared benchmark plumbing: timing (median of repeats), machine description, CSV rows, plots.

Every benchmark compares providers side by side in one run and reports ratios; absolute numbers
are tied to the machine line printed with them.
"""

from __future__ import annotations

import csv
import gc
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch


@dataclass
class Row:
    bench: str
    provider: str
    device: str
    dtype: str
    threads: int
    shape: str
    median_ms: float
    items_per_s: float
    extra: dict = field(default_factory=dict)


def machine() -> dict[str, str]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "git": _git_sha(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _git_sha() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def time_ms(
    fn: Callable[[], object], *, repeats: int = 7, warmup: int = 1, cuda: bool = False, min_sample_ms: float = 0.0
) -> float:
    """Median wall time of one call of `fn` in milliseconds (synchronizing CUDA around each sample
    when asked). A sample runs `fn` back to back until it lasts at least `min_sample_ms` and counts
    the mean per call, so that a fast fn is not timed on one call alone, right after another
    workload has left the caches and TLBs cold. Python's garbage collector is paused while timing
    (as `timeit` does): a collection triggered by another provider's garbage would land on whoever
    runs next."""
    for _ in range(warmup):
        fn()
    times = []
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for _ in range(repeats):
            if cuda:
                torch.cuda.synchronize()
            calls, t0 = 0, time.perf_counter()
            while True:
                fn()
                calls += 1
                if cuda:
                    torch.cuda.synchronize()
                elapsed = (time.perf_counter() - t0) * 1e3
                if elapsed >= min_sample_ms:
                    break
            times.append(elapsed / calls)
    finally:
        if gc_was_enabled:
            gc.enable()
    return statistics.median(times)


def time_interleaved_ms(
    fns: dict[str, Callable[[], object]],
    *,
    repeats: int = 7,
    warmup: int = 1,
    cuda: bool = False,
    min_sample_ms: float = 0.0,
) -> dict[str, float]:
    """Median ms per call of each fn, timed in rounds (every fn once per round) so that drift in
    the machine's speed hits all providers alike instead of whichever ran during a slow spell. Each
    timed sample follows `warmup` untimed calls of the same fn and lasts at least `min_sample_ms`
    (see `time_ms`), so it runs in its own steady state rather than in the wake of the previous
    provider."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(time_ms(fn, repeats=1, warmup=warmup, cuda=cuda, min_sample_ms=min_sample_ms))
    return {k: statistics.median(v) for k, v in times.items()}


def memcpy_gbps(threads: int, nbytes: int = 256 << 20, device: str = "cpu") -> float:
    """Copy bandwidth (bytes read + written per second) of a large tensor copy, as a roofline."""
    torch.set_num_threads(threads)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), repeats=9, warmup=2, cuda=device != "cpu")
    return 2 * nbytes / ms / 1e6


def write_csv(rows: list[Row], path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    new = not os.path.exists(path)
    info = machine()
    with open(path, "a", newline="") as f:
        w = csv.writer(f)
        keys = [k for k in asdict(rows[0]) if k != "extra"]
        if new:
            w.writerow(keys + ["extra"] + list(info))
        for r in rows:
            d = asdict(r)
            w.writerow([d[k] for k in keys] + [repr(d["extra"])] + list(info.values()))


def bar_plot(
    rows: list[Row],
    path: str,
    title: str,
    ylabel: str = "items / s (higher is better)",
    label: Callable[[Row], str] | None = None,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    label = label or (lambda r: f"{r.provider}\n{r.device} {r.dtype} {r.threads}t")
    labels = [label(r) for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows)), 4))
    ax.bar(range(len(rows)), [r.items_per_s for r in rows], color="tab:blue")
    ax.set_xticks(range(len(rows)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def publish(
    rows: list[Row], table: str, out_dir: str, name: str, title: str, machine_note: str = "", **plot_kw
) -> None:
    """Prints the machine line and the table, appends the rows to out_dir/name.csv and plots
    out_dir/name.png (title gets the CPU or GPU model appended)."""
    info = machine()
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()) + machine_note)
    print(table)
    write_csv(rows, os.path.join(out_dir, f"{name}.csv"))
    bar_plot(rows, os.path.join(out_dir, f"{name}.png"), f"{title} — {info.get('gpu', info['cpu'])}", **plot_kw)
    print(f"wrote {out_dir}/{name}.csv and {out_dir}/{name}.png")
