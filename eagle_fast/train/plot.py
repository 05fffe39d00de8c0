"""The loss curve of a run, from its metrics.jsonl."""

from __future__ import annotations

import json


def loss_curve(metrics_path: str, png_path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(metrics_path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (per learned token)")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
