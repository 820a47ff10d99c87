"""tools/gpu_check.py at tiny sizes on the CPU: every check and measurement has its row, the CUDA-only rows say
SKIPPED, the rest PASS with consistent numbers, the JSON is written; rows that need lpips or PyAV skip without them."""
import json
import math
import os
import re
import subprocess
import sys

import pytest

try:
    import av
except ImportError:  # the video loader rows then say SKIPPED; the CI installs PyAV
    av = None

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAINING = ["stage 1 S-B/16", "stage 2 S-B/16", "stage 1 S-L/16", "video S-B/4x8", "DiT-L", "DiT-XL"]
CUDA_ONLY = (["bf16 vs fp32 stage 1", "torchrun resume train_ae stage 1", "torchrun resume train_ae stage 2",
              "torchrun resume train_dit"]
             + [f"memory {n}" for n in TRAINING[:5]])
ON_CPU = (["attention S-B/16", "attention DiT-L", "attention S-L/16"]
          + [f"compile {n}" for n in ["stage 1 S-B/16", "stage 2 S-B/16", "DiT-L", "video S-B/4x8"]]
          + [f"compile {n} grad-ckpt" for n in ["stage 1 S-B/16", "stage 2 S-B/16", "DiT-L"]]
          + [f"speed {n} {m}" for n in TRAINING + ["encode S-B/16", "sample DiT-L"] for m in ("eager", "compiled")]
          + ["loader images", "loader video", "loader video whole-file decode"])


def run(tmp_path, *args, env=None):
    out = tmp_path / "table.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "tools/gpu_check.py", "--tiny", "--json", str(out), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert out.exists(), proc.stderr[-3000:]
    report = json.loads(out.read_text())
    return proc, report["env"], {row["name"]: row for row in report["rows"]}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return run(tmp_path_factory.mktemp("gpu_check"))


def test_every_row_is_there_and_cpu_checks_pass(tiny):
    proc, env, rows = tiny
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert env["device"] == "CPU" and env["sizes"] == "tiny"
    assert set(rows) == set(CUDA_ONLY) | set(ON_CPU)
    table = proc.stdout[proc.stdout.index("check "):]  # the printed table holds every row
    assert all(re.search(rf"^{re.escape(name)} +\| ", table, re.M) for name in rows)
    for name in CUDA_ONLY:
        assert rows[name]["status"] == "SKIPPED" and "no CUDA" in rows[name]["note"], rows[name]
    for name in ON_CPU:
        expected = "SKIPPED" if av is None and name.startswith("loader video") else "PASS"
        assert rows[name]["status"] == expected, rows[name]


def test_numbers_are_consistent(tiny):
    _, _, rows = tiny
    for name in ["attention S-B/16", "attention DiT-L", "attention S-L/16"]:  # CPU flash and math in bf16 vs fp32
        numbers = rows[name]["numbers"]
        assert 0 < numbers["out_rel"] < 2e-2 and 0 < numbers["grad_rel"] < 5e-2 and "flash" in numbers["backends"]
        assert 0 < numbers["out_rel_math"] < 2e-2 and 0 < numbers["grad_rel_math"] < 5e-2
    for name in [n for n in rows if n.startswith("compile ")]:
        numbers = rows[name]["numbers"]
        assert numbers["graphs_after"] == 0 and numbers["graphs_warmup"] >= 1 and numbers["out_rel"] < 3e-2
    # train_ae.py runs fp32 on the CPU whatever --precision says: the two runs are the same run
    assert rows["bf16 vs fp32 stage 1"]["numbers"]["loss_rel"] == 0.0
    for name in [f"speed {n} {m}" for n in TRAINING for m in ("eager", "compiled")]:
        numbers, batch = rows[name]["numbers"], int(re.search(r" b(\d+)", rows[name]["size"]).group(1))
        assert numbers["per_s"] * numbers["step_ms"] / 1e3 == pytest.approx(batch)  # images/s = batch / step time
        assert numbers["flops_per_step"] > 0 and numbers["mfu"] is None  # no peak known on a CPU
    images = rows["loader images"]["numbers"]
    assert images["workers_needed"] == math.ceil(1000 / images["per_worker"])
    if rows["loader video"]["status"] == "PASS":
        video, whole = rows["loader video"]["numbers"], rows["loader video whole-file decode"]["numbers"]
        assert video["gain"] == pytest.approx(video["per_worker"] / whole["per_worker"])
        assert video["workers_needed"] == math.ceil(250 / video["per_worker"])


def test_rows_needing_lpips_or_pyav_skip_without_them(tmp_path):
    shim = tmp_path / "shim"  # modules that fail to import, as on a machine without the packages
    shim.mkdir()
    for package in ("lpips", "av"):
        (shim / f"{package}.py").write_text(f"raise ImportError('no {package} here')\n")
    proc, _, rows = run(tmp_path, "--only", "loader,speed stage 1 S-B/16 eager",
                        env={"PYTHONPATH": f"{shim}{os.pathsep}{ROOT}"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert rows["speed stage 1 S-B/16 eager"]["status"] == "SKIPPED"
    assert "lpips not installed" in rows["speed stage 1 S-B/16 eager"]["note"]
    assert rows["loader images"]["status"] == "PASS"
    for name in ["loader video", "loader video whole-file decode"]:
        assert rows[name]["status"] == "SKIPPED" and "PyAV" in rows[name]["note"]
    assert rows["attention S-B/16"]["status"] == "SKIPPED" and "--only" in rows["attention S-B/16"]["note"]
