"""Distributed data parallel training as the deployment runs it (gloo on CPU).

* fast: two ranks of a toy stage on ``training.runner.TrainRun`` -- the env:// rendezvous torchrun sets
  up, DistributedSampler shards that split every epoch between the ranks, all-reduced losses, only
  rank 0 publishing, with the same manifest layout as one process;
* slow: the k8s training Job's own script (k8s/jobs/train), i.e. ``torchrun --nproc-per-node=2 ...
  captioner train ucm-text-ae``, on a synthetic set it generates itself; its manifest has the same format
  as a single-process run's, and a retried pod does not publish the stage twice.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------- fast
def _toy_rank(rank: int, world: int, port: int, workdir: str) -> None:
    """One rank of a toy stage, with the environment torchrun gives each worker."""
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), CAPTIONER_NO_PROGRESS="1")
    import torch

    from training.runner import TrainRun

    torch.set_num_threads(1)
    work = Path(workdir)
    args = argparse.Namespace(seed=0, resume=False, run_dir=work / "run", store=work / "store", alias="candidate",
                              no_publish=False, device="cpu", threads=1, workers=0, profile="tiny")
    run = TrainRun("toy", args, {"profile": "tiny"})
    data = torch.utils.data.TensorDataset(torch.arange(40, dtype=torch.float32).unsqueeze(1), torch.zeros(40, 1))
    model = run.wrap_model(torch.nn.Linear(1, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    seen: list[list[int]] = []
    for _ in run.epochs(2):
        seen.append([])
        for x, y in run.progress(run.loader(data, batch_size=4, shuffle=True)):
            seen[-1] += x.squeeze(1).int().tolist()
            loss = torch.nn.functional.mse_loss(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            run.log_step(loss=loss.item())
        run.end_epoch(model=model, optimizer=optimizer)
    weights = getattr(model, "module", model).weight.detach().flatten().tolist()
    published = None
    if run.is_main:
        staging = work / "staging"
        staging.mkdir()
        torch.save(getattr(model, "module", model).state_dict(), staging / "weights.pt")
        version = run.publish("toy", staging, task="toy", metrics={"loss": run.history[-1]["loss"]},
                              data={"name": "toy", "size": 40, "seed": 0})
        published = version.version
    run.barrier()
    (work / f"rank{rank}.json").write_text(json.dumps(
        {"seen": seen, "history": run.history, "weights": weights, "published": published,
         "distributed": run.distributed}))
    run.close()


def test_two_gloo_ranks_shard_the_data_and_only_rank0_publishes(tmp_path):
    from captioning.store import ModelStore

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "training.runner"])
    port = _free_port()
    procs = [ctx.Process(target=_toy_rank, args=(rank, 2, port, str(tmp_path))) for rank in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["distributed"] for r in ranks)
    for epoch in range(2):  # each epoch: disjoint halves that together cover the dataset
        a, b = (set(r["seen"][epoch]) for r in ranks)
        assert len(a) == len(b) == 20 and not a & b and a | b == set(range(40))
    assert ranks[0]["seen"][0] != ranks[0]["seen"][1], "the sampler reshuffles each epoch (set_epoch)"
    assert ranks[0]["history"] == ranks[1]["history"], "epoch losses are all-reduced means"
    assert ranks[0]["weights"] == ranks[1]["weights"], "DDP keeps the replicas identical"
    assert ranks[0]["published"] == 1 and ranks[1]["published"] is None
    store = ModelStore(tmp_path / "store")
    assert store.versions("toy") == [1]
    manifest = store.load("toy@1").manifest
    assert manifest["extra"]["world_size"] == 2 and manifest["extra"]["history"] == ranks[0]["history"]


# ---------------------------------------------------------------------------------------------- slow
def _rendered_job(kustomization: str) -> dict:
    import shutil

    command = ["kustomize", "build"] if shutil.which("kustomize") else ["kubectl", "kustomize"]
    if not shutil.which(command[0]):
        pytest.skip("neither kustomize nor kubectl is installed")
    out = subprocess.run([*command, str(ROOT / "k8s" / kustomization)], capture_output=True, text=True, check=True)
    return next(d for d in yaml.safe_load_all(out.stdout) if d and d["kind"] == "Job")


def run_container_script(c: dict, env: dict[str, str], *, cwd: Path, timeout: int = 1500) -> subprocess.CompletedProcess:
    """Run a container's command + args here, with its env values (overridden by ``env``)."""
    values = {e["name"]: e.get("value", "") for e in c.get("env", [])}
    values.update(env)
    full_env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "CAPTIONER_NO_PROGRESS": "1", **values}
    return subprocess.run([*c["command"], *c.get("args", [])], env=full_env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_k8s_training_job_script_under_torchrun_publishes_like_one_process(tmp_path):
    from captioning.store import ModelStore

    job = _rendered_job("jobs/train")
    train = next(c for c in job["spec"]["template"]["spec"]["containers"] if c["name"] == "train")
    store, dataset = tmp_path / "store", tmp_path / "datasets" / "synth"
    env = {
        "NODE_RANK": "0", "NNODES": "1", "NPROC_PER_NODE": "2", "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()), "TRAIN_STAGES": "ucm-text-ae", "DATASET": str(dataset),
        "SYNTH_PER_CLASS": "10", "RUN_ROOT": str(tmp_path / "runs" / "job-uid"),
        "CAPTIONER_MODEL_STORE": str(store), "TRAIN_ARGS": "--set text_ae.epochs=2",
    }
    first = run_container_script(train, env, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-4000:]
    assert (dataset / "dataset.json").is_file(), "rank 0 generated the synthetic set"
    ddp = ModelStore(store).load("ucm-text-ae@1")
    assert ddp.manifest["extra"]["world_size"] == 2
    assert ddp.manifest["command"].startswith("captioner train ucm-text-ae --data ")
    assert ModelStore(store).aliases("ucm-text-ae")["candidate"] == 1

    # a retried pod of the same Job: the stage was published, so it is skipped, not published again
    again = run_container_script(train, env, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-4000:]
    assert ModelStore(store).versions("ucm-text-ae") == [1]

    # one process, same stage and data: the same manifest format and the same files
    single_store = tmp_path / "single-store"
    one = subprocess.run(
        [str(BIN / "captioner"), "train", "ucm-text-ae", "--data", str(dataset), "--profile", "tiny",
         "--store", str(single_store), "--run-dir", str(tmp_path / "single-run"), "--set", "text_ae.epochs=2"],
        env={**os.environ, "CAPTIONER_NO_PROGRESS": "1"}, cwd=tmp_path, capture_output=True, text=True, timeout=1500)
    assert one.returncode == 0, one.stderr[-4000:]
    single = ModelStore(single_store).load("ucm-text-ae@1")
    assert single.manifest["extra"]["world_size"] == 1
    assert sorted(ddp.manifest) == sorted(single.manifest)
    assert sorted(ddp.manifest["files"]) == sorted(single.manifest["files"])
    assert sorted(ddp.manifest["extra"]) == sorted(single.manifest["extra"])
    for key in ("task", "profile", "format", "data", "config"):
        assert ddp.manifest[key] == single.manifest[key], key
    # each of the two ranks takes about half the optimisation steps of one process (DistributedSampler)
    ddp_steps = ddp.manifest["extra"]["history"][0]["step"]
    single_steps = single.manifest["extra"]["history"][0]["step"]
    assert ddp_steps < single_steps <= 2 * ddp_steps
