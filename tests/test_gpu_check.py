"""tools/gpu_check.py at tiny sizes on the CPU: every check and measurement has its row, in priority order; the
CUDA-only rows say SKIPPED, the checks PASS, the measurements RAN (no target is judged at tiny sizes), the JSON is
written; without the VGG16 file or the lpips package the LPIPS rows run with random weights and say so; the time limit
is kept."""
import json
import math
import os
import re
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import gpu_check  # noqa: E402

try:
    import av
except ImportError:  # the video loader rows then say SKIPPED; the CI installs PyAV
    av = None

TRAINING = ["stage 1 S-B/16", "stage 2 S-B/16", "stage 1 S-L/16", "video S-B/4x8", "DiT-L", "DiT-XL"]
CUDA_ONLY = (["torchrun resume train_ae stage 1", "torchrun resume train_ae stage 2", "torchrun resume train_dit"]
             + [f"memory {n}" for n in TRAINING[:5]])
CHECKS = (["attention S-B/16", "attention DiT-L", "attention S-L/16", "bf16 vs fp32 stage 1"]
          + [f"compile {n}" for n in ["stage 1 S-B/16", "stage 2 S-B/16", "DiT-L", "video S-B/4x8"]]
          + [f"compile {n} grad-ckpt" for n in ["stage 1 S-B/16", "stage 2 S-B/16", "DiT-L"]])
MEASURED = ([f"speed {n} {m}" for n in TRAINING + ["encode S-B/16", "sample DiT-L"] for m in ("eager", "compiled")]
            + ["loader images", "loader video", "loader video whole-file decode"])
FIRST = ["attention S-B/16", "attention DiT-L", "attention S-L/16", "speed stage 1 S-B/16 eager",
         "speed stage 1 S-B/16 compiled", "compile stage 1 S-B/16", "speed DiT-L eager", "speed DiT-L compiled",
         "compile DiT-L", "bf16 vs fp32 stage 1", "memory stage 1 S-B/16", "memory DiT-L",
         "torchrun resume train_ae stage 1"]  # the order of value


def run(tmp_path, *args, env=None):
    """gpu_check.py --tiny in a subprocess, with an empty torch hub (no VGG16 file): (process, env, rows)."""
    out = tmp_path / "table.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "TORCH_HOME": str(tmp_path / "hub"),
           **(env or {})}
    proc = subprocess.run([sys.executable, "tools/gpu_check.py", "--tiny", "--json", str(out), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    assert out.exists(), proc.stderr[-3000:]
    report = json.loads(out.read_text())
    return proc, report["env"], {row["name"]: row for row in report["rows"]}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return run(tmp_path_factory.mktemp("gpu_check"))


def test_every_row_is_there_in_order_and_cpu_checks_pass(tiny):
    proc, env, rows = tiny
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert env["device"] == "CPU" and env["sizes"] == "tiny"
    assert set(rows) == set(CUDA_ONLY) | set(CHECKS) | set(MEASURED)
    assert list(rows)[:len(FIRST)] == FIRST
    table = proc.stdout[proc.stdout.index("check "):]  # the printed table holds every row
    assert all(re.search(rf"^{re.escape(name)} +\| ", table, re.M) for name in rows)
    for name in CUDA_ONLY:
        assert rows[name]["status"] == "SKIPPED" and "no CUDA" in rows[name]["note"], rows[name]
    for name in CHECKS:
        assert rows[name]["status"] == "PASS", rows[name]
    for name in MEASURED:  # measured, with no target judged: never PASS
        expected = "SKIPPED" if av is None and name.startswith("loader video") else "RAN"
        assert rows[name]["status"] == expected, rows[name]
    for name in ["speed stage 1 S-B/16 compiled", "speed DiT-L compiled"]:
        assert "not judged at tiny sizes" in rows[name]["target"]
    for name, row in rows.items():  # every row that ran says how long it took, and what compiling cost
        assert row["status"] == "SKIPPED" or row["took_s"] >= 0, row
        if row["status"] != "SKIPPED" and ("compiled" in name or name.startswith("compile ")):
            assert row["compile_s"] >= 0, row


def test_numbers_are_consistent(tiny):
    _, _, rows = tiny
    for name in ["attention S-B/16", "attention DiT-L", "attention S-L/16"]:  # CPU flash and math in bf16 vs fp32
        numbers = rows[name]["numbers"]
        assert 0 < numbers["out_rel"] < 2e-2 and 0 < numbers["grad_rel"] < 5e-2 and "flash" in numbers["backends"]
        assert 0 < numbers["out_rel_math"] < 2e-2 and 0 < numbers["grad_rel_math"] < 5e-2
    for name in [n for n in rows if n.startswith("compile ")]:
        numbers = rows[name]["numbers"]
        assert numbers["graphs_after"] == 0 and numbers["graphs_warmup"] >= 1 and numbers["out_rel"] < 3e-2
        assert "bf16 autocast on the CPU" in rows[name]["note"]
    # bf16 really ran (CPU autocast, the check's opt-in), so its tolerance was exercised
    assert 0 < rows["bf16 vs fp32 stage 1"]["numbers"]["loss_rel"] <= 2e-2
    assert "random VGG16" in rows["bf16 vs fp32 stage 1"]["note"]
    for name in [f"speed {n} {m}" for n in TRAINING for m in ("eager", "compiled")]:
        numbers, batch = rows[name]["numbers"], int(re.search(r" b(\d+)", rows[name]["size"]).group(1))
        assert numbers["per_s"] * numbers["step_ms"] / 1e3 == pytest.approx(batch)  # images/s = batch / step time
        assert numbers["flops_per_step"] > 0 and numbers["mfu"] is None  # no peak known on a CPU
        if "DiT" not in name:  # the trainer's step with LPIPS: a random VGG16 here, said in the row
            assert "random VGG16" in rows[name]["note"], rows[name]
    # LPIPS's VGG16 dominates a tiny tokenizer step: its FLOPs are counted
    assert rows["speed stage 1 S-B/16 eager"]["numbers"]["flops_per_step"] > 1e9
    images = rows["loader images"]["numbers"]
    assert images["workers_needed"] == math.ceil(1000 / images["per_worker"])
    if rows["loader video"]["status"] == "RAN":
        video, whole = rows["loader video"]["numbers"], rows["loader video whole-file decode"]["numbers"]
        assert video["gain"] == pytest.approx(video["per_worker"] / whole["per_worker"])
        assert video["workers_needed"] == math.ceil(250 / video["per_worker"])


def test_without_lpips_or_pyav_the_rows_still_run(tmp_path):
    shim = tmp_path / "shim"  # modules that fail to import, as on a machine without the packages
    shim.mkdir()
    for package in ("lpips", "av"):
        (shim / f"{package}.py").write_text(f"raise ImportError('no {package} here')\n")
    proc, env, rows = run(tmp_path, "--only", "loader,speed stage 1 S-B/16 eager,bf16",
                          env={"PYTHONPATH": f"{shim}{os.pathsep}{ROOT}"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "lpips not installed" in env["lpips"]
    for name in ["speed stage 1 S-B/16 eager", "bf16 vs fp32 stage 1"]:  # random VGG16 and heads, not SKIPPED
        assert rows[name]["status"] in ("RAN", "PASS") and "lpips not installed" in rows[name]["note"], rows[name]
    assert rows["loader images"]["status"] == "RAN"
    for name in ["loader video", "loader video whole-file decode"]:
        assert rows[name]["status"] == "SKIPPED" and "PyAV" in rows[name]["note"]
    assert rows["attention S-B/16"]["status"] == "SKIPPED" and "--only" in rows["attention S-B/16"]["note"]


def test_random_lpips_is_lpips_with_other_weights():
    """The stand-in has lpips.LPIPS's modules under its names: given LPIPS's weights it computes LPIPS, so its cost is
    LPIPS's."""
    pytest.importorskip("lpips")
    import losses
    torch.manual_seed(0)
    real, mine = losses.LPIPS(pretrained=False), gpu_check.RandomLPIPS()
    theirs = real.state_dict()
    assert set(mine.state_dict()) <= set(theirs)
    mine.load_state_dict({k: theirs[k] for k in mine.state_dict()})
    x, x_hat = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(mine(x_hat, x, reduce=False), real(x_hat, x, reduce=False))


def test_the_time_limit_is_kept(tmp_path):
    """A task that overruns is stopped at the limit; one whose estimate does not fit does not start; the JSON has
    both; --keep-done keeps what ran."""
    gpu_check.S.__dict__.update(t0=time.time(), time_limit=2.0, device=torch.device("cpu"))
    path = str(tmp_path / "t.json")
    table = gpu_check.Table(["slow", "big", "quick"], {}, path)
    gpu_check.run_task(table, (["quick"], lambda: table.set("quick", "PASS"), lambda: 0.0), [])
    gpu_check.run_task(table, (["big"], lambda: table.set("big", "PASS"), lambda: 100.0), [])
    start = time.time()
    gpu_check.run_task(table, (["slow"], lambda: time.sleep(60), lambda: 0.5), [])
    assert time.time() - start < 3
    rows = {r["name"]: r for r in json.load(open(path))["rows"]}
    assert rows["slow"]["status"] == "SKIPPED" and "stopped at the time limit" in rows["slow"]["note"]
    assert rows["big"]["status"] == "SKIPPED" and "estimated 100 s" in rows["big"]["note"]
    assert rows["quick"]["status"] == "PASS"
    again = gpu_check.Table(["slow", "big", "quick"], {}, path, keep=True)
    assert again.kept == {"quick"} and again.rows["quick"]["status"] == "PASS"
    gpu_check.run_task(again, (["quick"], lambda: pytest.fail("a kept row ran again"), lambda: 0.0), [])


def test_peak_flops_by_name_and_memory():
    assert gpu_check.peak_for("NVIDIA H200", 139.8) == 989.0  # SXM
    assert gpu_check.peak_for("NVIDIA H200 NVL", 139.8) == 835.0
    assert gpu_check.peak_for("NVIDIA H100 80GB HBM3", 79.1) == 989.0  # SXM
    assert gpu_check.peak_for("NVIDIA H100 PCIe", 79.1) == 756.0
    assert gpu_check.peak_for("NVIDIA H100 NVL", 93.1) == gpu_check.peak_for("NVIDIA H100", 93.1) == 835.0
    assert gpu_check.peak_for("NVIDIA GH200 480GB", 94.5) == 989.0
    assert gpu_check.peak_for("Some GPU", 16) is None
