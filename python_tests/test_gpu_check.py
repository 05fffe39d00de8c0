"""make gpu-check's driver (tools/gpu_check) where no GPU is: its CPU-safe mode end to end, and the
rules of its step runner (a failing tier-1 step fails the run; tier 2 gives way to the budget)."""

import base64
import io
import json
import os
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVER = os.path.join(ROOT, "tools", "gpu_check")


@pytest.fixture
def gpu_check(monkeypatch):
    """The driver's modules, imported as the driver imports them (its folder on sys.path)."""
    monkeypatch.syspath_prepend(DRIVER)
    import run
    import setup_env
    import steps
    import wheels

    return run, setup_env, steps, wheels


def test_cpu_mode_says_no_cuda_runs_two_cpu_steps_and_exits_zero(tmp_path):
    out = tmp_path / "result.json"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(DRIVER, "run.py"),
            "--work",
            str(tmp_path / "work"),
            "--out",
            str(out),
            "--wheels",
            str(tmp_path / "no-wheels"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
        cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no CUDA device" in proc.stdout
    assert "absent (make gpu-wheels)" in proc.stdout
    result = json.loads(out.read_text())
    assert result["mode"] == "cpu-only" and result["exit_code"] == 0
    assert result["environment"]["modules"]["torch"]["importable"]
    (smoke,) = result["steps"]
    assert smoke["name"] == "cpu-smoke" and smoke["status"] == "passed", smoke
    assert smoke["detail"]["preset"] == "eagle-tiny-x5" and len(smoke["detail"]["losses"]) == 2


def test_require_gpu_turns_no_gpu_into_a_failure(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, os.path.join(DRIVER, "run.py"), "--no-cpu-smoke", "--require-gpu", "--work", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 1 and "no CUDA device" in proc.stdout


def test_a_failing_tier1_step_fails_the_run_and_blocks_what_needs_it(gpu_check):
    run, setup_env, _, _ = gpu_check
    runner = run.StepRunner(budget_s=600)

    def boom(timeout):
        raise setup_env.StepFailed("deliberate failure")

    assert runner.run("ok", 1, lambda t: {"fine": True}, timeout=10)["status"] == "passed"
    assert runner.exit_code() == 0
    rec = runner.run("broken", 1, boom, timeout=10)
    assert rec["status"] == "failed" and "deliberate failure" in rec["error"]
    assert runner.exit_code() == 1
    # tier 1 never skips: what needs a failed step fails too, saying why
    after = runner.run("after", 1, lambda t: {}, timeout=10, needs=("broken",))
    assert after["status"] == "failed" and "broken did not pass" in after["reason"]


def test_a_step_that_crashes_is_a_failure_not_a_driver_crash(gpu_check):
    run = gpu_check[0]
    runner = run.StepRunner(budget_s=600)
    rec = runner.run("buggy", 1, lambda t: {}["missing"], timeout=10)
    assert rec["status"] == "failed" and "KeyError" in rec["error"]
    assert runner.exit_code() == 1


def test_tier2_gives_way_to_the_time_budget(gpu_check):
    run = gpu_check[0]
    runner = run.StepRunner(budget_s=30)
    seen = []
    rec = runner.run("slow bench", 2, lambda t: seen.append(t) or {}, timeout=600, estimate_s=120)
    assert rec["status"] == "skipped" and "time budget" in rec["reason"] and not seen
    runner.run("quick bench", 2, lambda t: seen.append(t) or {}, timeout=600, estimate_s=1)
    assert seen and seen[0] <= 30  # its timeout is what is left of the budget
    assert runner.exit_code() == 0


def test_arguments(gpu_check):
    run = gpu_check[0]
    args = run.parse_args(["--tier", "1", "--budget-s", "240", "--no-cpu-smoke"])
    assert (args.tier, args.budget_s, args.cpu_smoke, args.out) == (1, 240.0, False, None)
    with pytest.raises(SystemExit):
        run.parse_args(["--tier", "3"])
    assert run.slug("NVIDIA H200") == "nvidia-h200"


def test_cuda_tests_are_found_by_their_marker(gpu_check):
    steps = gpu_check[2]
    files = {os.path.relpath(f, ROOT) for f in steps.cuda_test_files(os.path.join(ROOT, "python_tests"))}
    assert os.path.join("python_tests", "ops", "test_attention.py") in files
    assert os.path.join("python_tests", "test_gpu_check.py") not in files
    assert steps.pytest_counts("88 passed, 2 skipped in 61.2s") == {"passed": 88, "skipped": 2}


def test_the_server_check_image_is_a_valid_png(gpu_check):
    from PIL import Image

    url = gpu_check[2].png_data_url(48, 32)
    assert url.startswith("data:image/png;base64,")
    img = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert img.size == (48, 32) and img.mode == "RGB"


def _fake_wheel(folder, name, version, requires=()):
    path = os.path.join(folder, f"{name.replace('-', '_')}-{version}-py3-none-any.whl")
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    meta += "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name.replace('-', '_')}-{version}.dist-info/METADATA", meta)
    return path


def test_install_plan_takes_only_what_is_missing_or_too_old(gpu_check, tmp_path):
    _, setup_env, _, wheels = gpu_check
    _fake_wheel(tmp_path, "not-installed-anywhere", "1.0", ["pytest>=999", "numpy>=1"])
    _fake_wheel(tmp_path, "pytest", "999.0")
    _fake_wheel(tmp_path, "numpy", "1.0")
    plan, notes = setup_env.install_plan(str(tmp_path))
    # numpy is installed and new enough: kept; pytest is installed but older than required: shipped
    assert plan == ["not-installed-anywhere", "pytest"]
    assert any("pytest" in n and "shadows" in n for n in notes)
    assert "numpy (needed by not-installed-anywhere)" not in wheels.unmet(str(tmp_path), "3.12")
    assert "pytest (needed by not-installed-anywhere)" not in wheels.unmet(str(tmp_path), "3.12")


def test_wheel_list_pins_one_version_each_and_cmake_only_on_request(gpu_check):
    wheels = gpu_check[3]
    assert "cmake" not in wheels.wanted(False) and wheels.wanted(True)["cmake"] == wheels.CMAKE[1]
    names = [wheels.canonical(n) for group in wheels.WHEELS.values() for n, _ in group]
    assert len(names) == len(set(names))
    assert not set(names) & wheels.ASSUMED  # never ship what the GPU machine's torch stack brings
    assert wheels.wheel_name_version("typing_extensions-4.16.0-py3-none-any.whl") == ("typing-extensions", "4.16.0")
