"""Past one node, on one machine: two torchrun agents (two "nodes" of one CPU rank each on 127.0.0.1, each in its own
working folder; static rendezvous, or c10d's where ranks restart) train as one process does; under --max-restarts=1 a rank killed after a
checkpoint is restarted with the other and the run ends with the same weights; a checkpoint that one node cannot see
stops both with a one-line error, never a hang."""
import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--preset", "tiny", "--data", "synthetic", "--image-size", "32", "--global-batch-size", "8", "--workers", "0",
        "--log-every", "1", "--steps", "4", "--ckpt-every", "2", "--sample-every", "100"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
# Each node runs this instead of train_ae.py (the same main): with KILL_AFTER=k, rank 1 dies like `kill -9` once the
# checkpoint of step k is on disk, in the first attempt only (torchrun counts restarts). Test code, not the product's.
WORKER = """import os, signal
import torch.distributed as dist
import runtime, train_ae

real_save = runtime.TrainingRun.save


def save(run, done, stateful):
    real_save(run, done, stateful)
    if done == int(os.environ.get("KILL_AFTER", -1)) and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
        dist.barrier()  # rank 0 has renamed the checkpoint into place
        if run.rank == 1:
            print("killing rank 1", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


runtime.TrainingRun.save = save
runtime.run_main(train_ae.main, train_ae.parse_args(), "train_ae.py")
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(tmp_path, *args, restarts=0, env=(), timeout=300):
    """[(exit status, output)] of two torchrun agents, node r in its own folder tmp_path/node{r}: static rendezvous
    (node r is rank r) or, with restarts, c10d's (static agents do not rendezvous again after a failure). An agent
    still running after `timeout` s (a hang) is killed with its workers, and the test fails."""
    port, agents = free_port(), []
    for rank in range(2):
        cwd = tmp_path / f"node{rank}"
        cwd.mkdir(exist_ok=True)
        rdzv = ([f"--node_rank={rank}", "--master_addr=127.0.0.1", f"--master_port={port}"] if not restarts else
                ["--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={tmp_path.name}"])
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", *rdzv,
               f"--max-restarts={restarts}", str(tmp_path / "worker.py"), *ARGS, *map(str, args)]
        with open(cwd / "agent.log", "w") as log:
            agents.append(subprocess.Popen(cmd, cwd=cwd, env={**ENV, **dict(env)}, stdout=log,
                                           stderr=subprocess.STDOUT, start_new_session=True))
    try:
        codes = [a.wait(timeout=timeout) for a in agents]
        return [(rc, (tmp_path / f"node{r}" / "agent.log").read_text()) for r, rc in enumerate(codes)]
    finally:
        for a in agents:
            if a.poll() is None:
                os.killpg(a.pid, signal.SIGKILL)


def metrics(path):
    return [json.loads(line) for line in open(path)]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: the same run in one plain process. Returns (folder, checkpoint state)."""
    tmp = tmp_path_factory.mktemp("nodes")
    (tmp / "worker.py").write_text(WORKER)
    subprocess.run([sys.executable, str(tmp / "worker.py"), *ARGS, "--ckpt", str(tmp / "one.pt"), "--out-dir",
                    str(tmp / "one")], cwd=tmp, env=ENV, check=True, capture_output=True)
    return tmp, torch.load(tmp / "one.pt", weights_only=True)


def same_run(tmp, name, reference):
    state = torch.load(tmp / f"{name}.pt", weights_only=True)
    assert state["step"] == 4
    for key in ("model", "ema"):
        torch.testing.assert_close(state[key], reference[key], rtol=1e-4, atol=1e-5)
    got, want = metrics(tmp / name / "metrics.jsonl"), metrics(tmp / "one" / "metrics.jsonl")
    assert got[-1]["loss"] == pytest.approx(want[-1]["loss"], rel=1e-4)


@pytest.mark.slow
def test_two_nodes_train_as_one_process(one_process):
    tmp, reference = one_process
    results = two_nodes(tmp, "--ckpt", tmp / "two.pt", "--out-dir", tmp / "two")
    assert [rc for rc, _ in results] == [0, 0], results
    same_run(tmp, "two", reference)


@pytest.mark.slow
def test_a_rank_killed_after_a_checkpoint_restarts_with_the_other(one_process):
    """As the README's command: without TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 the restarted ranks share the failed
    attempt's store, and rank 0 sometimes read the dead rank's old address from it (gloo: connection refused)."""
    tmp, reference = one_process
    results = two_nodes(tmp, "--ckpt", tmp / "restarted.pt", "--out-dir", tmp / "restarted", restarts=1,
                        env={"KILL_AFTER": "2", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})
    assert [rc for rc, _ in results] == [0, 0], results
    logs = results[0][1] + results[1][1]
    assert "killing rank 1" in logs and "steps 2->4" in logs  # resumed at the checkpoint, not restarted at 0
    same_run(tmp, "restarted", reference)


@pytest.mark.slow
def test_a_checkpoint_one_node_cannot_see_is_a_clear_error(one_process):
    """--ckpt ae.pt is relative: each node's own folder, as a node-local disk; node 0 holds a checkpoint."""
    tmp, _ = one_process
    (tmp / "node0").mkdir(exist_ok=True)
    (tmp / "node0" / "ae.pt").write_bytes((tmp / "one.pt").read_bytes())
    results = two_nodes(tmp, "--ckpt", "ae.pt", "--out-dir", tmp / "unshared", "--steps", 6, timeout=180)
    assert all(rc != 0 for rc, _ in results), results
    assert "error: rank 1 cannot see --ckpt ae.pt: put it on storage every node shares" in results[0][1]
