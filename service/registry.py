"""The live models: one :class:`Served` per model name, each with its batching pool; hot swap on reload.

A model is loaded only through ``captioning.inference.load_model(store, "<name>@<alias>")`` (hashes
verified); what it serves and the names a request may use come from its ``TaskSpec``. ``reload`` loads the
alias's current version in a thread while the old object keeps serving, then replaces ``Served.runtime`` -- a
single reference assignment, atomic for every reader. A request takes
the reference once, preprocesses with it and queues items that carry it, so a batch never mixes versions
and batches already queued or running finish on the old object, which is freed when the last is done.
A version that fails to load or to verify is refused and the old object stays.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from captioning.errors import CaptionerError
from captioning.inference import TASKS, TaskSpec, load_model, run_kind_batch, task_spec
from service.pool import BatchPool
from service.problems import Problem
from service.settings import Settings

log = logging.getLogger(__name__)


def run_pool_batch(runtime: Any, key: Any, payloads: list[Any]) -> Any:
    """What a pool's replica thread runs. ``key`` is the items' ``service.inference.BatchKey`` (kind + resolved
    options): ``BatchPool`` groups by it."""
    return run_kind_batch(key.kind, runtime, key.options, payloads)


@dataclass
class Served:
    name: str  # store name
    runtime: Any  # the live runtime object (captioning.inference protocols); replaced on reload
    pool: BatchPool
    spec: TaskSpec
    loaded_at: float = field(default_factory=time.time)
    reload_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def version(self) -> int:
        return self.runtime.version

    @property
    def manifest(self) -> dict[str, Any]:
        return self.runtime.manifest

    def answers_to(self, requested: str) -> bool:
        return requested == self.name or (self.name == self.spec.task and requested in self.spec.request_names)


class ModelRegistry:
    def __init__(self, settings: Settings, store: Any, metrics: Any, loader: Callable[..., Any] = load_model):
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.loader = loader
        self.served: dict[str, Served] = {}
        self.failures: dict[str, str] = {}  # name -> why it could not be loaded at start
        self.loading = True

    # --- start / stop ---------------------------------------------------------------------------------
    def wanted(self) -> list[str]:
        """The store names to serve: the explicit list, or (auto) each task's own store name (``TASKS``: the
        store name equal to the task, e.g. ``lightcap``, not ``lightcap-teacher``) when it has the alias."""
        if self.settings.model_names is not None:
            return self.settings.model_names
        available = set(self.store.models()) if self.store.root.is_dir() else set()
        return [name for name in sorted(TASKS) if name in available and self.settings.alias in self.store.aliases(name)]

    def load(self, spec: str) -> Any:
        from captioning.accel import trim_heap

        s = self.settings
        try:
            return self.loader(self.store, spec, device=s.device_name, precision=s.precision_name,
                               vision_runtime=s.vision_runtime_name)
        finally:
            trim_heap()  # what loading freed (buffers, converted copies) leaves the heap, not just the objects

    async def start(self) -> None:
        """Load every wanted model (one at a time, in a thread) and start its pool. A model that fails is
        recorded in ``failures`` (readiness reports it) and the others are still served."""
        try:
            names = await asyncio.to_thread(self.wanted)
        except CaptionerError as exc:
            names = []
            self.failures["store"] = str(exc)
        for name in names:
            spec = f"{name}@{self.settings.alias}"
            try:
                runtime = await asyncio.to_thread(self.load, spec)
                await self._add(name, runtime)
            except Exception as exc:  # noqa: BLE001 - any failure: report, keep serving the rest
                log.error("cannot serve %s: %s", spec, exc, exc_info=not isinstance(exc, CaptionerError))
                self.failures[name] = f"{spec}: {exc}"
        self.loading = False

    async def _add(self, name: str, runtime: Any) -> None:
        spec = task_spec(runtime)
        s = self.settings
        pool = BatchPool(
            name,
            run_pool_batch,
            max_batch_size=s.max_batch_size,
            max_wait_ms=s.max_wait_ms,
            capacity=s.queue_size,
            max_waiting=s.max_waiting,
            replicas=s.replicas_for(spec.kind, spec.task),
            torch_threads=s.threads_for(spec.kind, spec.task),
            metrics=self.metrics,
        )
        await pool.start()
        self.served[name] = Served(name=name, runtime=runtime, pool=pool, spec=spec)
        self._report(name)
        self.metrics.workers_up.labels(name).set(pool.replicas)

    async def close(self, timeout: float) -> None:
        await asyncio.gather(*(s.pool.close(timeout) for s in self.served.values()))
        for name in self.served:
            self.metrics.workers_up.labels(name).set(0)

    @property
    def ready(self) -> bool:
        return not self.loading and not self.failures and bool(self.served) and all(
            s.pool.alive for s in self.served.values()
        )

    # --- lookup ---------------------------------------------------------------------------------------
    def names(self, kind: str) -> list[str]:
        return [s.name for s in self.served.values() if s.kind == kind]

    def pick(self, kind: str, requested: str | None = None) -> Served:
        """The served model for ``kind``: the one ``requested`` names (a store name or a request name such as
        ``ucm``), else the default (``CAPTIONER_DEFAULT_CAPTION_MODEL`` for captions, else the lowest rank).

        A request naming no model is refused (503) rather than quietly given another model when the default
        failed to load: the answer names the model and why."""
        if requested is None and kind == "caption" and self.settings.default_caption_model != "auto":
            requested = self.settings.default_caption_model
        if requested is not None:
            for served in self.served.values():
                if served.kind == kind and served.answers_to(requested):
                    return served
            known = ", ".join(self.names(kind)) or "none"
            raise Problem("unknown-model", f"model {requested!r} is not served for {kind} (served: {known})")
        candidates = sorted((s for s in self.served.values() if s.kind == kind), key=lambda s: s.spec.rank)
        broken = [
            (name, why) for name, why in self.failures.items()
            if name in TASKS and TASKS[name].kind == kind
            and (not candidates or TASKS[name].rank < candidates[0].spec.rank)
        ]
        if broken:
            name, why = broken[0]
            raise Problem(
                "model-unavailable",
                f"the default {kind} model {name!r} failed to load ({why}); name a served model explicitly"
                + (f" (served: {', '.join(s.name for s in candidates)})" if candidates else ""),
            )
        if candidates:
            return candidates[0]
        why = "; ".join(self.failures.values())
        raise Problem(
            "model-unavailable",
            f"no {kind} model is loaded" + (" yet (loading)" if self.loading else "") + (f" ({why})" if why else ""),
        )

    # --- hot swap -------------------------------------------------------------------------------------
    async def reload(self, name: str) -> dict[str, Any]:
        served = self.served.get(name)
        spec = f"{name}@{self.settings.alias}"
        if served is None and name in self.failures:
            return await self._retry(name, spec)
        if served is None:
            known = ", ".join(self.served) or "none"
            raise Problem("unknown-model", f"model {name!r} is not served here (served: {known})")
        async with served.reload_lock:
            old = served.runtime
            try:
                new = await asyncio.to_thread(self.load, spec)
            except Exception as exc:  # noqa: BLE001 - refused: keep serving the old object
                self.metrics.reloads.labels(name, "refused").inc()
                log.warning("reload of %s refused: %s", spec, exc)
                raise Problem(
                    "reload-failed",
                    f"{spec} could not be loaded ({exc}); version {old.version} keeps serving",
                    serving_version=old.version,
                ) from None
            new_spec = TASKS.get(new.manifest.get("task"))
            if new_spec is None or new_spec.kind != served.kind:
                self.metrics.reloads.labels(name, "refused").inc()
                raise Problem(
                    "reload-failed",
                    f"{spec} is a {new.manifest.get('task')!r} model, not a {served.spec.task!r} model; "
                    f"version {old.version} keeps serving",
                    serving_version=old.version,
                )
            outcome = "unchanged" if new.version == old.version else "swapped"
            served.runtime = new  # the swap: one reference assignment
            served.loaded_at = time.time()
            self._report(name)
            self.metrics.reloads.labels(name, outcome).inc()
            log.info("reload %s: %s (version %s -> %s)", name, outcome, old.version, new.version)
            return {"name": name, "previous_version": old.version, "version": new.version, "outcome": outcome}

    async def _retry(self, name: str, spec: str) -> dict[str, Any]:
        """Reload of a model that failed to load at start: load it now (e.g. after the store was fixed)."""
        try:
            runtime = await asyncio.to_thread(self.load, spec)
            await self._add(name, runtime)
        except Exception as exc:  # noqa: BLE001
            self.metrics.reloads.labels(name, "refused").inc()
            self.failures[name] = f"{spec}: {exc}"
            raise Problem("reload-failed", f"{spec} could not be loaded ({exc}); it is still not served") from None
        del self.failures[name]
        self.metrics.reloads.labels(name, "swapped").inc()
        log.info("reload %s: now served (version %s)", name, runtime.version)
        return {"name": name, "previous_version": None, "version": runtime.version, "outcome": "swapped"}

    def _report(self, name: str) -> None:
        runtime = self.served[name].runtime
        manifest = runtime.manifest
        self.metrics.model_info.labels(name).info(
            {
                "version": str(runtime.version),
                "task": str(manifest.get("task", "")),
                "profile": str(manifest.get("profile", "")),
                "alias": self.settings.alias,
                "device": str(runtime.device),
                "precision": self.settings.precision_name,
                "vision_runtime": self.settings.vision_runtime_name,
            }
        )

    # --- description ----------------------------------------------------------------------------------
    def describe(self, name: str) -> dict[str, Any]:
        served = self.served[name]
        try:
            aliases = self.store.aliases(name)
            versions = [
                {
                    "version": mv.version,
                    "profile": mv.profile,
                    "created": mv.manifest.get("created"),
                    "metrics": mv.metrics,
                    **({"error": mv.error} if mv.error else {}),
                }
                for mv in self.store.list(name)
            ]
        except CaptionerError as exc:
            aliases, versions = {}, [{"error": str(exc)}]
        manifest = served.manifest
        return {
            "name": name,
            "task": served.spec.task,
            "kind": served.kind,
            "request_names": [served.name, *(n for n in served.spec.request_names if served.answers_to(n))],
            "serving_version": served.version,
            "serving_alias": self.settings.alias,
            "device": str(served.runtime.device),
            "precision": self.settings.precision_name,
            "vision_runtime": self.settings.vision_runtime_name,
            "alias_version": aliases.get(self.settings.alias),
            "aliases": aliases,
            "profile": manifest.get("profile"),
            "metrics": manifest.get("metrics", {}),
            "parents": manifest.get("parents", []),
            "created": manifest.get("created"),
            "loaded_at": served.loaded_at,
            "queue_depth": served.pool.depth(),
            "versions": versions,
        }

