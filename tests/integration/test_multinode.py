"""Two nodes without the hardware: two processes on this machine started as node 0 and node 1, once by torchrun
(``--nnodes 2 --node-rank i --nproc-per-node 1``, rendezvous on 127.0.0.1) and once with the variables srun sets
(SLURM_NTASKS, SLURM_PROCID, SLURM_NODEID, ...), each running ``trainer.num_nodes=2 trainer.devices=1`` on the CPU
(gloo).

* The real CLI runs to the end: one ``metrics.json`` (rank 0's), the global batch of both nodes, each node training
  its half of the data (the steps per epoch of one process holding the whole batch), and the learning rate scaled
  by the global batch exactly as for that one process.
* One step's loss and gradients on the two nodes equal one process holding the whole batch, for every case of
  ``tests/integration/test_distributed.py`` (its helpers, with fixed views and BN in eval mode; see its docstring),
  the process group set up by Lightning's DDP strategy from what the launcher set, as ``train`` sets it up.

Slow: every process imports torch and Lightning and starts its own run. This file is also the one-step rank's
entry point (``python tests/integration/test_multinode.py OUT``, started by the launcher).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent  # tests/, where conftest lives


def distributed_cases():
    """tests/integration/test_distributed.py, whose cases and 1-process reference step these tests reuse, loaded
    from its file."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("distributed_cases", HERE / "test_distributed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ROOT = TESTS.parent
NODES = 2
B = 16  # per node in the CLI runs
CLI = [
    "data=synthetic",
    "data.size=128",
    "backbone.width=8",
    "method.proj_hidden_dim=32",
    "method.proj_out_dim=16",
    "trainer.max_epochs=1",
    "trainer.limit_val_batches=2",
    "trainer.enable_progress_bar=false",
    "eval.linear_epochs=0",
    "eval.fewshot_seeds=1",
    "eval.init=false",
    "eval.pixels=false",
    "trainer.accelerator=cpu",
]
TWO_NODES = ["trainer.num_nodes=2", "trainer.devices=1", "trainer.strategy=ddp"]
# what a launcher or a scheduler may have left in this environment would change the ranks
LAUNCH_VARS = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "NODE_RANK",
    "GROUP_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("SLURM")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])}


def srun_env(node: int, port: int) -> dict[str, str]:
    """What ``srun`` sets for task ``node`` of a job of 2 nodes x 1 task (``sbatch --nodes 2 --ntasks-per-node 1``),
    with MASTER_ADDR / MASTER_PORT as a job script exports them."""
    return {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "contrastive",
        "SLURM_NTASKS": "2",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_NNODES": "2",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_STEP_NUM_TASKS": "2",
        "SLURM_PROCID": str(node),
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": str(node),
        "SLURM_JOB_NODELIST": "node[0-1]",
        "SLURM_NODELIST": "node[0-1]",
        "SLURMD_NODENAME": f"node{node}",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }


def launch_two_nodes(launcher: str, entry: list[str], timeout: int = 900) -> list[subprocess.CompletedProcess]:
    """Start node 0 and node 1 of ``python <entry>`` with ``launcher`` (``torchrun`` or ``srun``) and wait for both."""
    port = free_port()
    procs = []
    for node in range(NODES):
        env = clean_env()
        if launcher == "torchrun":
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                str(NODES),
                "--node-rank",
                str(node),
                "--nproc-per-node",
                "1",
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                str(port),
                *entry,
            ]
        else:
            cmd, env = [sys.executable, *entry], {**env, **srun_env(node, port)}
        procs.append(
            subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for node, r in enumerate(results):
        assert r.returncode == 0, f"node {node} failed:\n{r.stderr[-3000:]}"
    return results


def checkpoint_lrs(run: Path) -> list[float]:
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return [group["initial_lr"] for group in state["optimizer_states"][0]["param_groups"]]


# -- the CLI to the end ------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize(("launcher", "method"), [("torchrun", "simclr"), ("srun", "moco")])
def test_cli_on_two_nodes_trains_the_global_batch_of_one_process(tmp_path, launcher, method):
    extra = ["method.queue_size=64"] if method == "moco" else []
    two, one = tmp_path / "two_nodes", tmp_path / "one_process"
    nodes = launch_two_nodes(
        launcher,
        [
            "-m",
            "contrastive.train",
            f"method={method}",
            *CLI,
            *extra,
            *TWO_NODES,
            f"data.batch_size={B}",
            f"hydra.run.dir={two}",
        ],
    )
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in nodes[1].stderr  # node 1 joined as the second rank, not a run of its own
    single = subprocess.run(
        [
            sys.executable,
            "-m",
            "contrastive.train",
            f"method={method}",
            *CLI,
            *extra,
            f"data.batch_size={NODES * B}",
            f"hydra.run.dir={one}",
        ],
        cwd=ROOT,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    assert list(two.rglob("metrics.json")) == [two / "metrics.json"]  # written by rank 0 alone
    got, want = (json.loads((run / "metrics.json").read_text()) for run in (two, one))
    assert got["global_batch_size"] == want["global_batch_size"] == NODES * B
    # 102 training images: 3 steps of 32 whether one process takes 32 or each node 16 of its half (a node reading
    # the whole set would take 6)
    assert got["global_steps"] == want["global_steps"] == 102 // (NODES * B)
    assert got["epochs"] == want["epochs"] == 1 and len(got["history"]) == 1
    # optim.lr x global batch / 256 for the encoder; the online probe's rate is not scaled
    lrs = checkpoint_lrs(two)
    assert lrs == checkpoint_lrs(one)
    assert lrs[0] == pytest.approx(0.06 * NODES * B / 256)


# -- one step, compared with one process -----------------------------------------------------------------------
@pytest.fixture(scope="module", params=["torchrun", "srun"])
def node_steps(request, tmp_path_factory) -> dict[str, object]:
    out = tmp_path_factory.mktemp(f"steps_{request.param}")
    launch_two_nodes(request.param, [str(Path(__file__).resolve()), str(out)])
    return {"ranks": [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(NODES)]}


@pytest.fixture(scope="module")
def single_steps() -> dict[str, dict[str, object]]:
    td = distributed_cases()

    single = {
        name: td.compose_container([f"data.batch_size={td.WORLD * td.B}", *over, *extra])
        for name, (over, extra) in td.CASES.items()
    }
    inputs = {
        name: td.make_inputs(td.compose_container([f"data.batch_size={td.B}", *over]), seed=i)
        for i, (name, (over, _)) in enumerate(td.CASES.items())
    }
    return {name: td.one_step(single[name], inputs[name]) for name in td.CASES}


@pytest.mark.slow
def test_each_node_has_its_rank_from_the_launcher(node_steps):
    for node, r in enumerate(node_steps["ranks"]):
        assert (r["global_rank"], r["node_rank"], r["local_rank"], r["world_size"]) == (node, node, 0, NODES)
        assert r["env"] == ("SLURMEnvironment" if "SLURM_PROCID" in r["launch"] else "TorchElasticEnvironment")
        assert r["backend"] == "gloo"


@pytest.mark.slow
def test_one_step_on_two_nodes_equals_one_process(node_steps, single_steps):
    td = distributed_cases()

    for name, single in single_steps.items():
        assert single["grads"] and any(g.abs().max() > 1e-4 for g in single["grads"].values())
        for r in node_steps["ranks"]:
            got = r["steps"][name]
            td.close(got["loss"], single["loss"])
            assert got["grads"].keys() == single["grads"].keys(), name
            for key, grad in single["grads"].items():
                td.close(got["grads"][key], grad)
        features = torch.cat([r["steps"][name]["features"] for r in node_steps["ranks"]])
        td.close(features, single["features"])


def rank_main(out: Path) -> None:
    """One node's rank: Lightning's DDP strategy sets up the process group from the launcher's variables (as in
    ``train``), then every case of ``test_distributed`` takes one step on this rank's half of the global batch."""
    sys.path.insert(0, str(TESTS))
    torch.set_num_threads(1)
    import lightning as L

    td = distributed_cases()
    import torch.distributed as tdist
    from conftest import make_cfg

    from contrastive.launch import build_plugins, build_strategy

    cfg = make_cfg([*TWO_NODES, "trainer.accelerator=cpu"])
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        num_nodes=NODES,
        strategy=build_strategy(cfg),
        plugins=build_plugins(),
        logger=False,
        enable_checkpointing=False,
    )
    strategy = trainer.strategy
    strategy.setup_environment()  # what fit does first: init_process_group with the cluster's ranks and address
    try:
        rank, world = trainer.global_rank, trainer.world_size
        steps = {}
        for i, (name, (over, _)) in enumerate(td.CASES.items()):
            container = td.compose_container([f"data.batch_size={td.B}", *over])
            steps[name] = td.one_step(container, td.make_inputs(container, seed=i), rank, world)
        launch = sorted(k for k in os.environ if k.startswith(("SLURM_", "TORCHELASTIC_")))
        torch.save(
            {
                "global_rank": rank,
                "node_rank": trainer.node_rank,
                "local_rank": trainer.local_rank,
                "world_size": world,
                "env": type(strategy.cluster_environment).__name__,
                "launch": launch,
                "backend": tdist.get_backend(),
                "steps": steps,
            },
            out / f"rank{rank}.pt",
        )
    finally:
        tdist.destroy_process_group()


if __name__ == "__main__":
    rank_main(Path(sys.argv[1]))
