"""torch.compile with inductor (the GPU's backend, here generating C++) of the tiny stage-1, stage-2 and DiT training
steps, train_ae.train_step and train_dit.train_step as tools/gpu_check.py runs them, under CPU bf16 autocast: the
first step's outputs, gradient norm and loss terms agree with eager within the check's tolerances, and no graph is
compiled after warm-up (a recompilation is an error there). About 30 s with warm inductor caches, a few minutes cold."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import gpu_check  # noqa: E402
import runtime  # noqa: E402

NAMES = ["stage 1 S-B/16", "stage 2 S-B/16", "DiT-L"]


@pytest.fixture
def inductor_check():
    env = gpu_check.configure(gpu_check.parse_args(["--tiny", "--compile-backend", "inductor"]))
    yield gpu_check.Table([f"compile {n}" for n in NAMES], env)
    runtime.CPU_BF16 = False  # the trainers' CPU behaviour for the tests that follow
    gpu_check.RESULTS.clear()
    gpu_check.CACHE.clear()
    torch._dynamo.reset()


@pytest.mark.slow
def test_inductor_step_matches_eager_and_compiles_once(inductor_check):
    table = inductor_check
    assert runtime.precision_used(torch.device("cpu"), "bf16") == "bf16"
    for name in NAMES:
        gpu_check.check_compile(table, name, False)
    for name in NAMES:
        row = table.rows[f"compile {name}"]
        numbers = row["numbers"]
        assert row["status"] == "PASS", row
        assert numbers["graphs_after"] == 0 and numbers["graph_breaks"] == 0, row
        # inductor's kernels are not eager's: the tolerances were exercised, not met by identity
        assert 0 < numbers["out_rel"] <= gpu_check.TOL["compile_out"], row
        assert numbers["grad_norm_rel"] <= gpu_check.TOL["compile_grad"], row
