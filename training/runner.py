"""The harness every offline training stage runs in.

One ``TrainRun`` per stage invocation gives:

* determinism: ``seed_everything(seed)`` and per-epoch sampler generators (``epoch_generator``), so the same
  ``--seed`` gives the same weights, and a resumed run gives the same weights as an uninterrupted one;
* resumability: ``save_checkpoint`` / ``load_checkpoint`` in ``run_dir`` (model, optimiser, scheduler, RNG,
  epoch, loss history); ``--resume`` continues after the last completed epoch;
* a progress bar with the running loss (tqdm), a loss history and a loss-curve PNG;
* distributed data parallel when launched by ``torchrun`` (gloo on CPU, nccl on GPU); only rank 0 publishes;
* ``publish``: puts the stage's files into the model store with the exact command line, the config, the data
  it was trained on, its metrics and parent versions.

A stage module looks like::

    def run(args):
        config = load_config("ucm", args.profile, path=args.config, overrides=args.set)  # typed (UCMConfig)
        run = TrainRun("ucm-text-ae", args, config)
        ...
        for epoch in run.epochs(config.text_ae.epochs):
            for batch in run.progress(loader, desc=f"epoch {epoch}"):
                ...
                run.log_step(loss=loss.item())
            run.end_epoch(model=model, optimizer=opt)
        run.publish("ucm-text-ae", staging_dir, task="ucm-text-ae", metrics=metrics, data=data_info)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shlex
import shutil
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from captioning.config import config_dict
from captioning.config_schema import Section
from captioning.errors import UsageError

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
HISTORY = "history.json"


def add_common_args(parser: argparse.ArgumentParser, *, data_required: bool = True) -> None:
    """The arguments every ``captioner train <stage>`` takes."""
    parser.add_argument("--data", type=Path, required=data_required, help="dataset folder (UCM layout)")
    parser.add_argument("--profile", default="tiny", choices=("paper", "tiny"), help="model sizes (default tiny)")
    parser.add_argument("--config", type=Path, default=None, help="config YAML instead of the profile's")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value (repeatable)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (runs are deterministic given it)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --run-dir")
    parser.add_argument("--run-dir", type=Path, default=None, help="checkpoints, loss curve (default runs/<stage>/...)")
    parser.add_argument("--store", type=Path, default=None, help="model store root (default: settings)")
    parser.add_argument(
        "--alias",
        default="candidate",
        help="alias the published version gets (default candidate; production is also set if the model has none)",
    )
    parser.add_argument("--no-publish", action="store_true", help="train and evaluate but do not publish")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if torch.backends.cudnn.is_available():
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class TrainRun:
    def __init__(self, stage: str, args: argparse.Namespace, config: Section | dict[str, Any]):
        self.stage = stage
        self.args = args
        # the typed config of a family (captioning.config_schema; a plain dict for a stage without one, such as
        # a test's toy stage); checkpoints and manifests store its plain dict (config_dict)
        self.config = config
        self.profile: str = (
            config.profile if isinstance(config, Section) else config.get("profile", getattr(args, "profile", "tiny"))
        )
        self.seed = int(getattr(args, "seed", 0))
        self.command = shlex.join(["captioner", *sys.argv[1:]]) if _invoked_as_cli() else shlex.join(sys.argv)

        # distributed (torchrun sets these)
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = self._pick_device(getattr(args, "device", None))
        if self.world_size > 1 and not dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(backend=backend)
        threads = getattr(args, "threads", None)
        if threads:
            torch.set_num_threads(int(threads))

        run_dir = getattr(args, "run_dir", None)
        self.run_dir = Path(run_dir) if run_dir else Path("runs") / stage / f"{self.profile}-seed{self.seed}"
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.history: list[dict[str, Any]] = []
        self.epoch = 0  # number of completed epochs
        self.step = 0
        self._epoch_losses: list[float] = []
        self._bar: tqdm | None = None
        seed_everything(self.seed + self.rank)
        self.resumed_from: int | None = None
        if getattr(args, "resume", False) and not (self.run_dir / CHECKPOINT).is_file():
            raise UsageError(f"--resume: no checkpoint at {self.run_dir / CHECKPOINT}")

    # ------------------------------------------------------------------ devices / distributed
    def _pick_device(self, requested: str | None) -> torch.device:
        if requested:
            device = torch.device(requested)
            if device.type == "cuda" and not torch.cuda.is_available():
                raise UsageError(f"--device {requested}: CUDA is not available on this machine")
        else:
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if device.type == "cuda" and self.world_size > 1:
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        return device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def wrap_model(self, model: torch.nn.Module, **ddp_kwargs: Any) -> torch.nn.Module:
        """Move to the device and, under torchrun, wrap in DistributedDataParallel."""
        model = model.to(self.device)
        if self.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, **ddp_kwargs)
        return model

    def epoch_generator(self, epoch: int | None = None) -> torch.Generator:
        """A generator for shuffling that depends only on (seed, epoch): resumed runs shuffle identically."""
        return torch.Generator().manual_seed(self.seed * 100_003 + (self.epoch if epoch is None else epoch))

    def loader(
        self,
        dataset: torch.utils.data.Dataset,
        *,
        batch_size: int,
        shuffle: bool,
        drop_last: bool = False,
        collate_fn: Any = None,
    ) -> torch.utils.data.DataLoader:
        """A DataLoader for the current epoch: seeded shuffling, sharded across ranks under torchrun."""
        workers = int(getattr(self.args, "workers", 0) or 0)
        if self.distributed:
            sampler = torch.utils.data.distributed.DistributedSampler(
                dataset, num_replicas=self.world_size, rank=self.rank, shuffle=shuffle, seed=self.seed,
                drop_last=drop_last,
            )
            sampler.set_epoch(self.epoch)
            return torch.utils.data.DataLoader(
                dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                collate_fn=collate_fn, num_workers=workers,
            )
        return torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, collate_fn=collate_fn,
            generator=self.epoch_generator() if shuffle else None, num_workers=workers,
        )

    def all_reduce_mean(self, value: float) -> float:
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item() / self.world_size)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    # ------------------------------------------------------------------ loop helpers
    def epochs(self, total: int) -> Iterator[int]:
        """Yields the epochs still to run (all of them, or those after the resumed checkpoint)."""
        yield from range(self.epoch, int(total))

    def progress(self, iterable: Iterable, *, desc: str | None = None, total: int | None = None) -> Iterator:
        self._epoch_losses = []
        bar = tqdm(
            iterable,
            desc=desc or f"{self.stage} epoch {self.epoch + 1}",
            total=total,
            disable=not self.is_main or os.environ.get("CAPTIONER_NO_PROGRESS") == "1",
            dynamic_ncols=True,
            leave=False,
        )
        self._bar = bar
        try:
            yield from bar
        finally:
            bar.close()
            self._bar = None

    def log_step(self, **values: float) -> None:
        """Record one optimisation step's losses (the first value is shown on the progress bar)."""
        self.step += 1
        if "loss" in values:
            self._epoch_losses.append(float(values["loss"]))
        if self._bar is not None and values:
            self._bar.set_postfix({k: f"{v:.4f}" for k, v in values.items()}, refresh=False)

    def end_epoch(self, extra: dict[str, Any] | None = None, **state: Any) -> dict[str, Any]:
        """Close an epoch: record the mean loss (and ``extra`` values such as val metrics) and checkpoint.

        ``state`` holds the objects to checkpoint, e.g. ``model=..., optimizer=..., scheduler=...``;
        anything with ``state_dict`` is saved through it.
        """
        mean = float(np.mean(self._epoch_losses)) if self._epoch_losses else float("nan")
        mean = self.all_reduce_mean(mean)
        self.epoch += 1
        record = {"epoch": self.epoch, "step": self.step, "loss": mean, **(extra or {})}
        self.history.append(record)
        if self.is_main:
            summary = " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())
            log.info("%s %s", self.stage, summary)
            self.save_checkpoint(**state)
        return record

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, **state: Any) -> Path:
        payload: dict[str, Any] = {
            "stage": self.stage,
            "profile": self.profile,
            "seed": self.seed,
            "epoch": self.epoch,
            "step": self.step,
            "history": self.history,
            "rng": _rng_state(),
            "config": config_dict(self.config),
        }
        for key, obj in state.items():
            if isinstance(obj, torch.nn.parallel.DistributedDataParallel):
                obj = obj.module
            payload[key] = obj.state_dict() if hasattr(obj, "state_dict") else obj
        path = self.run_dir / CHECKPOINT
        tmp = path.with_suffix(".tmp")
        torch.save(payload, tmp)
        os.replace(tmp, path)
        (self.run_dir / HISTORY).write_text(json.dumps(self.history, indent=1))
        return path

    def load_checkpoint(self, **state: Any) -> bool:
        """With ``--resume``, restore ``state`` objects, RNG, epoch and history; returns whether it did."""
        if not getattr(self.args, "resume", False):
            return False
        path = self.run_dir / CHECKPOINT
        payload = torch.load(path, map_location="cpu", weights_only=False)
        if payload.get("stage") != self.stage or payload.get("profile") != self.profile:
            raise UsageError(
                f"--resume: {path} is a {payload.get('stage')}/{payload.get('profile')} checkpoint, "
                f"not {self.stage}/{self.profile}"
            )
        if payload.get("seed") != self.seed:
            raise UsageError(f"--resume: {path} was trained with --seed {payload.get('seed')}, not {self.seed}")
        for key, obj in state.items():
            if key not in payload:
                raise UsageError(f"--resume: {path} has no saved {key!r}")
            if isinstance(obj, torch.nn.parallel.DistributedDataParallel):
                obj = obj.module
            obj.load_state_dict(payload[key])
        self.epoch = int(payload["epoch"])
        self.step = int(payload["step"])
        self.history = list(payload["history"])
        _set_rng_state(payload["rng"])
        self.resumed_from = self.epoch
        log.info("%s: resumed from %s after epoch %d", self.stage, path, self.epoch)
        return True

    # ------------------------------------------------------------------ outputs
    def plot_loss(self, path: Path | None = None, *, keys: tuple[str, ...] = ("loss",)) -> Path:
        """Write the loss curve (per epoch) as a PNG; returns its path."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = Path(path) if path else self.run_dir / "loss_curve.png"
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        epochs = [h["epoch"] for h in self.history]
        for key in keys:
            values = [h.get(key) for h in self.history]
            if any(v is not None for v in values):
                ax.plot(epochs, values, marker="o", label=key)
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        ax.set_title(f"{self.stage} ({self.profile}, seed {self.seed})")
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return path

    def staging_dir(self) -> Path:
        """An empty ``publish/`` folder in the run directory for the files a stage publishes."""
        path = self.run_dir / "publish"
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def publish_stage(
        self,
        name: str,
        staging: Path,
        *,
        task: str,
        metrics: dict[str, Any],
        data: dict[str, Any],
        parents: list[dict[str, Any]] | None = None,
        config: Section | dict[str, Any] | None = None,
    ) -> Any:
        """How every stage ends: the loss curve and ``metrics.json`` into ``staging``, publish it (unless
        --no-publish), print the stage, the published version and the metrics as JSON."""
        if self.history:
            keys = tuple(k for k in ("loss", "val_loss") if any(k in h for h in self.history))
            self.plot_loss(staging / "loss_curve.png", keys=keys or ("loss",))
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True) + "\n")
        version = self.publish(name, staging, task=task, metrics=metrics, data=data, parents=parents, config=config)
        published = None if version is None else f"{version.name}@{version.version}"
        print(json.dumps({"stage": self.stage, "published": published, "metrics": metrics}, indent=1, sort_keys=True))
        return version

    def publish(
        self,
        name: str,
        source_dir: Path,
        *,
        task: str,
        metrics: dict[str, Any],
        data: dict[str, Any],
        parents: list[dict[str, Any]] | None = None,
        config: Section | dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Any:
        """Publish ``source_dir`` (weights, vocab, loss curve ...) as a new version of ``name``.

        Only rank 0 publishes; returns the store's version record (None elsewhere or with --no-publish).
        ``config`` (default: the run's) is stored as its plain dict (``to_dict()``).
        ``extra`` adds stage-specific records to the manifest's ``extra`` (seed, history, world size).
        """
        if not self.is_main or getattr(self.args, "no_publish", False):
            return None
        from captioning.store import ModelStore

        store = ModelStore(getattr(self.args, "store", None))
        return store.publish(
            name,
            source_dir,
            task=task,
            profile=self.profile,
            metrics=metrics,
            config=config_dict(config if config is not None else self.config),
            command=self.command,
            data=data,
            parents=parents or [],
            extra={"seed": self.seed, "history": self.history, "world_size": self.world_size, **(extra or {})},
            alias=getattr(self.args, "alias", None),
        )

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _invoked_as_cli() -> bool:
    return Path(sys.argv[0]).name == "captioner"
