"""make gpu-check: one pass over everything that needs a GPU, with the machine's own python3.

    python3 tools/gpu_check/run.py [--tier 1|2] [--budget-s 480] [--wheels gpu-wheels] [--out PATH]

Tier 1 (every step must pass; a step that cannot run is a failure, never a skip):
  install-wheels, build (editable, against the interpreter's torch, into a private folder),
  cuda-tests, train-gpu (20 bf16 steps of eagle-small-x5, loss falls), train-step1-vs-cpu,
  chat-gpu-vs-cpu, serve-stream, eval-easy-vqa.
Tier 2 (with the time left of --budget-s; a step whose estimate does not fit is skipped):
  sft7b, attention, lce-128k, preprocess.
Results: docs/bench/gpu-check-<gpu>-<date>.json (written after every step). Without a CUDA device
it says so, reports the environment, runs two CPU training steps of eagle-tiny-x5, and exits 0.
Exit status: 0 when nothing failed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from collections.abc import Callable

import setup_env
import steps
from setup_env import StepFailed

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (name, function, timeout_s, steps it needs besides the build): tier-1 timeouts are generous
# ceilings, not the ~4 minute aim
TIER1: list[tuple[str, Callable, float, tuple[str, ...]]] = [
    ("cuda-tests", steps.cuda_tests, 420, ()),
    ("train-gpu", steps.train_gpu, 300, ()),
    ("train-step1-vs-cpu", steps.train_step1_vs_cpu, 300, ("train-gpu",)),
    ("chat-gpu-vs-cpu", steps.chat, 180, ()),
    ("serve-stream", steps.serve_stream, 180, ()),
    ("eval-easy-vqa", steps.eval_easy_vqa, 240, ()),
]
# (name, checks.py body, estimated seconds): started only when the estimate fits the time left
TIER2: list[tuple[str, str, float]] = [
    ("sft7b", "sft7b", 150),
    ("attention", "attention", 90),
    ("lce-128k", "lce", 45),
    ("preprocess", "preprocess", 30),
]


class StepRunner:
    """Runs steps, times them and records their outcome; `exit_code` is 1 once any step failed."""

    def __init__(self, budget_s: float, on_record: Callable[[], None] = lambda: None, start: float | None = None):
        self.start = time.time() if start is None else start
        self.budget_s = budget_s
        self.steps: list[dict] = []
        self.on_record = on_record

    def left(self) -> float:
        return self.budget_s - (time.time() - self.start)

    def status(self, name: str) -> str | None:
        return next((s["status"] for s in self.steps if s["name"] == name), None)

    def run(
        self,
        name: str,
        tier: int,
        fn: Callable[[float], dict],
        timeout: float,
        estimate_s: float = 0.0,
        needs: tuple[str, ...] = (),
    ) -> dict:
        rec: dict = {"name": name, "tier": tier}
        t0 = time.time()
        blocked = [n for n in needs if self.status(n) != "passed"]
        if tier >= 2 and self.left() < estimate_s:
            rec.update(status="skipped", reason=f"time budget: {self.left():.0f} s left, ~{estimate_s:.0f} s needed")
        elif blocked:
            # tier 1 never skips: a step that cannot run fails with the reason
            rec.update(
                status="failed" if tier == 1 else "skipped", reason=f"not run: {', '.join(blocked)} did not pass"
            )
        else:
            if tier >= 2:
                timeout = max(min(timeout, self.left()), 1.0)
            print(f"[gpu-check] {name} ...", flush=True)
            try:
                rec.update(status="passed", detail=fn(timeout))
            except StepFailed as e:
                rec.update(status="failed", error=str(e)[-6000:])
            except Exception as e:  # a bug in the step itself is still this step's failure
                rec.update(status="failed", error=f"{type(e).__name__}: {e}\n{traceback.format_exc()[-4000:]}")
        rec["time_s"] = round(time.time() - t0, 1)
        self.steps.append(rec)
        print(
            f"[gpu-check] {name}: {rec['status']} ({rec['time_s']} s)"
            + (f"\n{rec.get('error') or rec.get('reason')}" if rec["status"] != "passed" else ""),
            flush=True,
        )
        self.on_record()
        return rec

    def exit_code(self) -> int:
        return 1 if any(s["status"] == "failed" for s in self.steps) else 0


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "gpu"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        "python3 tools/gpu_check/run.py",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--tier", type=int, choices=(1, 2), default=2, help="highest tier to run (default 2)")
    p.add_argument(
        "--budget-s",
        type=float,
        default=480.0,
        help="seconds for the whole run; tier-2 steps start only while their estimate fits (default 480)",
    )
    p.add_argument("--wheels", default=os.path.join(REPO, "gpu-wheels"), help="folder made by make gpu-wheels")
    p.add_argument("--work", default=None, help="scratch folder (default: a new temporary one, kept)")
    p.add_argument(
        "--out",
        default=None,
        help="results JSON (default docs/bench/gpu-check-<gpu>-<date>.json; without a GPU, none unless given)",
    )
    p.add_argument(
        "--also-copy-to",
        default=None,
        help="folder that also receives the results JSON and the steps' logs (gpu-check-logs.tar.gz)",
    )
    p.add_argument("--skip-build", action="store_true", help="use the eagle_fast this interpreter already imports")
    p.add_argument(
        "--no-cpu-smoke", dest="cpu_smoke", action="store_false", help="without a GPU: skip the two CPU training steps"
    )
    p.add_argument("--require-gpu", action="store_true", help="exit 1 when no CUDA device is found")
    return p.parse_args(argv)


def library_versions(py: str, env: dict) -> dict:
    code = (
        "import importlib.metadata as m, json\nout = {}\n"
        "for d in ('torch','transformers','triton','peft','numpy','tokenizers','fastapi','uvicorn','pytest',"
        "'scikit-build-core','cmake','ninja','easy-vqa','matplotlib'):\n"
        "    try: out[d] = m.version(d)\n    except m.PackageNotFoundError: out[d] = None\nprint(json.dumps(out))"
    )
    try:
        out = subprocess.run([py, "-c", code], capture_output=True, text=True, env=env, timeout=60)
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError):
        return {}


def git_sha() -> str | None:
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO, timeout=10
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        return None


def main(argv: list[str] | None = None) -> int:
    t_start = time.time()  # the budget counts the environment report too
    args = parse_args(argv)
    py = sys.executable
    work = os.path.abspath(args.work or tempfile.mkdtemp(prefix="gpu-check-"))
    os.makedirs(work, exist_ok=True)
    site_dir = os.path.join(work, "site")
    env_report = setup_env.report(args.wheels)
    torch = setup_env.torch_info(py)
    gpu = bool(torch.get("cuda_available"))
    print(
        f"[gpu-check] python {env_report['python']} ({py}); torch {torch.get('torch')} "
        f"(CUDA build {torch.get('torch_cuda')}); GPU: {torch.get('gpu') or 'none'}; work folder {work}"
    )
    missing = [f"{d} [{m['for']}]" for d, m in env_report["modules"].items() if not m["importable"]]
    print("[gpu-check] not importable here: " + ("; ".join(missing) or "nothing"))
    w = env_report["wheels"]
    print(
        f"[gpu-check] wheels folder {w['path']}: "
        + (
            f"{w['wheels']} wheels, {w['mib']} MiB (built for Python "
            f"{w['built_for_python']}, cmake wheel {'in' if w['with_cmake'] else 'not in'} it)"
            if w["present"]
            else "absent (make gpu-wheels)"
        )
    )
    here = ".".join(env_report["python"].split(".")[:2])
    if w["present"] and w["built_for_python"] and w["built_for_python"] != here:
        print(
            f"[gpu-check] the wheels were fetched for Python {w['built_for_python']}, this is {here}: its "
            f"compiled wheels will not install (make gpu-wheels GPU_PYTHON_VERSION={here})"
        )
    if w["present"]:
        env_report["would_install"], env_report["install_notes"] = setup_env.install_plan(args.wheels)
        print("[gpu-check] would install from it: " + (", ".join(env_report["would_install"]) or "nothing"))
    cm = env_report["cmake"]
    print(
        f"[gpu-check] cmake: python package {cm['module']}, on PATH {cm['path']} {cm['path_version'] or ''}; "
        f"nvcc: {env_report['nvcc'] or 'none (no CUDA library; Triton kernels only)'}"
    )

    started = datetime.datetime.now(datetime.timezone.utc)
    results: dict = {
        "gpu": torch.get("gpu"),
        "date": started.isoformat(timespec="seconds"),
        "git": git_sha(),
        "torch": torch,
        "environment": env_report,
        "budget_s": args.budget_s,
        "work": work,
        "steps": [],
    }
    out = args.out
    if out is None and gpu:
        out = os.path.join(REPO, "docs", "bench", f"gpu-check-{slug(torch['gpu'])}-{started.date().isoformat()}.json")

    def save() -> None:
        results["steps"] = runner.steps
        results["exit_code"] = runner.exit_code()
        if out:
            os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
            with open(out, "w") as f:
                json.dump(results, f, indent=1, default=str)
            if args.also_copy_to:
                os.makedirs(args.also_copy_to, exist_ok=True)
                shutil.copy(out, args.also_copy_to)
                # the steps' full logs beside it (the JSON holds only their tails)
                with tarfile.open(os.path.join(args.also_copy_to, "gpu-check-logs.tar.gz"), "w:gz") as tar:
                    if os.path.isdir(os.path.join(work, "logs")):
                        tar.add(os.path.join(work, "logs"), arcname="logs")

    runner = StepRunner(args.budget_s, on_record=save, start=t_start)
    ctx = steps.Context(py=py, repo=REPO, work=work, env=dict(os.environ))

    if not gpu:
        print(
            "[gpu-check] no CUDA device ("
            + (f"torch does not import: {torch['error']}" if torch.get("error") else "torch sees none")
            + "). Running the CPU-safe parts only: "
            + "the environment report above"
            + (", two CPU training steps of eagle-tiny-x5" if args.cpu_smoke and not torch.get("error") else "")
            + ".",
            flush=True,
        )
        results["mode"] = "cpu-only"
        if args.cpu_smoke and not torch.get("error"):
            try:
                ctx.info = setup_env.probe(py, ctx.env, REPO)
                runner.run("cpu-smoke", 0, lambda t: steps.cpu_smoke(ctx, t), timeout=600)
            except StepFailed as e:
                print(f"[gpu-check] CPU smoke not run: {e}")
                results["cpu_smoke"] = f"not run: {e}"
        save()
        if out:
            print(f"[gpu-check] results: {out}")
        return 1 if args.require_gpu or runner.exit_code() else 0

    results["mode"] = "gpu"
    if args.skip_build:
        runner.run("build", 1, lambda t: setup_env.probe(py, ctx.env, REPO), timeout=300)
    else:
        ctx.env = setup_env.build_env(site_dir)
        runner.run(
            "install-wheels", 1, lambda t: setup_env.install(py, args.wheels, site_dir, ctx.log("install")), timeout=300
        )
        # built even when some wheel did not install: one run on the GPU machine should tell all it can
        runner.run(
            "build", 1, lambda t: setup_env.build(py, REPO, args.wheels, site_dir, ctx.log("build"), t), timeout=900
        )
    if runner.status("build") == "passed":
        ctx.info = runner.steps[-1]["detail"]
        steps.start_cpu_step1(ctx, timeout=600)
    results["versions"] = library_versions(py, ctx.env)
    for name, fn, timeout, needs in TIER1:
        rec = runner.run(name, 1, lambda t, fn=fn: fn(ctx, t), timeout, needs=("build", *needs))
        if rec["status"] == "passed":
            ctx.results[name] = rec["detail"]
    results["tier1_s"] = round(time.time() - runner.start, 1)
    if args.tier >= 2:
        for name, body, estimate in TIER2:
            runner.run(
                name,
                2,
                lambda t, body=body: steps.checks(ctx, body, t),
                timeout=600,
                estimate_s=estimate,
                needs=("build",),
            )
    save()
    print(
        "\n[gpu-check] summary\n"
        + "\n".join(f"  tier {s['tier']}  {s['status']:8s} {s['time_s']:7.1f} s  {s['name']}" for s in runner.steps)
    )
    print(f"[gpu-check] tier 1 took {results['tier1_s']} s; results: {out}")
    return runner.exit_code()


if __name__ == "__main__":
    sys.exit(main())
