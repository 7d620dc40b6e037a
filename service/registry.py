"""The live models: one :class:`Served` per model name, each with its batching pool; hot swap on reload.

A model is loaded only through ``captioning.inference.load_model(store, "<name>@<alias>")`` (hashes
verified). ``reload`` loads the alias's current version in a thread while the old object keeps serving,
then replaces ``Served.model`` -- a single reference assignment, atomic for every reader. A request takes
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
from captioning.inference import LOADERS, load_model
from service.backends import ROLES, runner_for
from service.pool import BatchPool
from service.problems import Problem
from service.settings import Settings

log = logging.getLogger(__name__)

# the `model` values a caption request may use for a family, besides the store name itself
FAMILIES = {"lightcap": "lightcap", "ucm": "ucm-captioner"}


@dataclass
class Served:
    name: str
    model: Any  # the live runtime object (captioning.inference contract)
    pool: BatchPool
    role: str  # caption | labels | concepts
    loaded_at: float = field(default_factory=time.time)
    reload_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def version(self) -> int:
        return self.model.version

    @property
    def manifest(self) -> dict[str, Any]:
        return self.model.manifest

    @property
    def task(self) -> str:
        return self.model.manifest.get("task", "")


class ModelRegistry:
    def __init__(self, settings: Settings, store: Any, metrics: Any, loader: Callable[[Any, str], Any] = load_model):
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.loader = loader
        self.served: dict[str, Served] = {}
        self.failures: dict[str, str] = {}  # name -> why it could not be loaded at start
        self.loading = True

    # --- start / stop ---------------------------------------------------------------------------------
    def wanted(self) -> list[str]:
        """The names to serve: the explicit list, or (auto) every servable name that has the alias."""
        if self.settings.model_names is not None:
            return self.settings.model_names
        names = []
        available = set(self.store.models()) if self.store.root.is_dir() else set()
        for name in sorted(LOADERS):
            if name in available and self.settings.alias in self.store.aliases(name):
                names.append(name)
        return names

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
                model = await asyncio.to_thread(self.loader, self.store, spec)
                await self._add(name, model)
            except Exception as exc:  # noqa: BLE001 - any failure: report, keep serving the rest
                log.error("cannot serve %s: %s", spec, exc, exc_info=not isinstance(exc, CaptionerError))
                self.failures[name] = f"{spec}: {exc}"
        self.loading = False

    async def _add(self, name: str, model: Any) -> None:
        task = model.manifest.get("task")
        role = ROLES.get(task)
        if role is None:
            raise CaptionerError(f"{name}: task {task!r} has no service route")
        s = self.settings
        pool = BatchPool(
            name,
            runner_for(role),
            max_batch_size=s.max_batch_size,
            max_wait_ms=s.max_wait_ms,
            capacity=s.queue_size,
            replicas=s.replicas,
            torch_threads=s.threads_per_replica,
            metrics=self.metrics,
        )
        await pool.start()
        self.served[name] = Served(name=name, model=model, pool=pool, role=role)
        self._report(name)
        self.metrics.workers_up.labels(name).set(s.replicas)

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
    def get(self, name: str, role: str) -> Served:
        served = self.served.get(FAMILIES.get(name, name) if role == "caption" else name)
        if served is None or served.role != role:
            known = ", ".join(self.names(role)) or "none"
            raise Problem("unknown-model", f"model {name!r} is not served for {role} (served: {known})")
        return served

    def names(self, role: str) -> list[str]:
        return [s.name for s in self.served.values() if s.role == role]

    def first(self, role: str) -> Served:
        for served in self.served.values():
            if served.role == role:
                return served
        why = "; ".join(self.failures.values())
        raise Problem(
            "model-unavailable",
            f"no {role} model is loaded" + (" yet (loading)" if self.loading else "") + (f" ({why})" if why else ""),
        )

    def default_captioner(self) -> Served:
        choice = self.settings.default_caption_model
        if choice != "auto":
            return self.get(choice, "caption")
        for name in ("lightcap", "ucm-captioner"):
            if name in self.served:
                return self.served[name]
        return self.first("caption")

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
            old = served.model
            try:
                new = await asyncio.to_thread(self.loader, self.store, spec)
            except Exception as exc:  # noqa: BLE001 - refused: keep serving the old object
                self.metrics.reloads.labels(name, "refused").inc()
                log.warning("reload of %s refused: %s", spec, exc)
                raise Problem(
                    "reload-failed",
                    f"{spec} could not be loaded ({exc}); version {old.version} keeps serving",
                    serving_version=old.version,
                ) from None
            if ROLES.get(new.manifest.get("task")) != served.role:
                self.metrics.reloads.labels(name, "refused").inc()
                raise Problem(
                    "reload-failed",
                    f"{spec} is a {new.manifest.get('task')!r} model, not a {served.role} model; "
                    f"version {old.version} keeps serving",
                    serving_version=old.version,
                )
            outcome = "unchanged" if new.version == old.version else "swapped"
            served.model = new  # the swap: one reference assignment
            served.loaded_at = time.time()
            self._report(name)
            self.metrics.reloads.labels(name, outcome).inc()
            log.info("reload %s: %s (version %s -> %s)", name, outcome, old.version, new.version)
            return {"name": name, "previous_version": old.version, "version": new.version, "outcome": outcome}

    async def _retry(self, name: str, spec: str) -> dict[str, Any]:
        """Reload of a model that failed to load at start: load it now (e.g. after the store was fixed)."""
        try:
            model = await asyncio.to_thread(self.loader, self.store, spec)
            await self._add(name, model)
        except Exception as exc:  # noqa: BLE001
            self.metrics.reloads.labels(name, "refused").inc()
            self.failures[name] = f"{spec}: {exc}"
            raise Problem("reload-failed", f"{spec} could not be loaded ({exc}); it is still not served") from None
        del self.failures[name]
        self.metrics.reloads.labels(name, "swapped").inc()
        log.info("reload %s: now served (version %s)", name, model.version)
        return {"name": name, "previous_version": None, "version": model.version, "outcome": "swapped"}

    def _report(self, name: str) -> None:
        model = self.served[name].model
        manifest = model.manifest
        self.metrics.model_info.labels(name).info(
            {
                "version": str(model.version),
                "task": str(manifest.get("task", "")),
                "profile": str(manifest.get("profile", "")),
                "alias": self.settings.alias,
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
            "task": served.task,
            "role": served.role,
            "serving_version": served.version,
            "serving_alias": self.settings.alias,
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

