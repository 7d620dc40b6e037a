"""Every knob of the service, read from ``CAPTIONER_*`` environment variables (pydantic-settings).

``Settings()`` reads the environment (and a ``.env`` file in the working directory, if any);
``Settings(max_batch_size=1)`` overrides in code (tests, benchmarks, ``captioner serve --port``).
The table in docs/service.md lists every field; ``python -m service.settings`` prints it from this class,
so the two cannot drift apart unnoticed (tests compare them).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MB = 1024 * 1024
# Pillow's names, as accepted by Image.open(fp, formats=[...]).
KNOWN_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="CAPTIONER_", env_file=".env", extra="ignore", validate_default=True, frozen=True
    )

    # --- server -------------------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="address uvicorn binds (0.0.0.0 in a container)")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0: any free port)")
    workers: int = Field(1, ge=1, description="uvicorn worker processes; each loads its own models")
    log_level: str = Field("info", description="uvicorn / service log level")
    shutdown_timeout_s: float = Field(
        30.0, gt=0, description="graceful shutdown: how long in-flight requests and batches may take to finish"
    )

    # --- models ---------------------------------------------------------------------------------------
    model_store: Path | None = Field(
        None, description="model store root (unset: the repository's model_store/, as captioning.store decides)"
    )
    models: str = Field(
        "auto",
        description="comma-separated model names to serve, e.g. `ucm-captioner,ucm-classifier`; `auto`: every "
        "servable model in the store that has the serving alias",
    )
    alias: str = Field("production", description="store alias that is served and that reload switches to")
    default_caption_model: str = Field(
        "auto", description="captioner used when a request names none; `auto`: lightcap if served, else ucm "
        "(if lightcap fails to load, such requests get 503 naming it, not another model)"
    )
    device: str = Field(
        "auto", description="where models run: `auto` (the first GPU if any, else cpu), `cpu`, `cuda`, `cuda:N`"
    )
    precision: str = Field(
        "auto", description="compute precision: `auto` (bf16 on a GPU or a CPU with native bf16, else fp32), "
        "`fp32`, `bf16`"
    )
    vision_runtime: str = Field(
        "auto", description="what runs the convolutional networks (CLIP, YOLO, UCM ResNet): `auto` (OpenVINO "
        "on the CPU, torch on a GPU), `openvino`, `torch`"
    )
    ov_cache_dir: str | None = Field(
        None, description="folder of the converted OpenVINO networks, reused by later loads (unset: "
        "`$XDG_CACHE_HOME/captioner-openvino`, else `~/.cache/...`, else the temp dir; `off`: convert at every load)"
    )

    # --- data -----------------------------------------------------------------------------------------
    data_dir: Path = Field(Path("captioner-data"), description="jobs database and job files live here")

    # --- auth -----------------------------------------------------------------------------------------
    api_key: SecretStr | None = Field(
        None, description="if set, every /v1 route needs `Authorization: Bearer KEY` (or `X-API-Key: KEY`)"
    )
    admin_key: SecretStr | None = Field(
        None, description="key for admin routes (model reload); unset: admin routes are refused"
    )

    # --- intake ---------------------------------------------------------------------------------------
    max_body_bytes: int = Field(20 * MB, gt=0, description="request body cap, enforced while reading (413)")
    max_job_body_bytes: int = Field(1024 * MB, gt=0, description="body cap of POST /v1/jobs uploads (413)")
    max_image_pixels: int = Field(
        50_000_000, gt=0, description="per-image width x height cap, read from the header before decoding (413)"
    )
    max_images_per_request: int = Field(32, ge=1, description="images one interactive request may carry (413)")
    formats: str = Field(
        ",".join(KNOWN_FORMATS), description="allowed image formats (Pillow names; subset of the default)"
    )
    intake_threads: int = Field(0, ge=0, description="threads decoding / preprocessing images (0: CPUs, max 4)")
    max_inflight_pixels: int = Field(
        200_000_000, gt=0, description="decoded pixels held at once across all requests and jobs; an image waits "
        "briefly for room, else 429 with Retry-After (at least CAPTIONER_MAX_IMAGE_PIXELS)"
    )

    # --- pool -----------------------------------------------------------------------------------------
    max_batch_size: int = Field(8, ge=1, description="largest batch a worker runs (1 turns batching off)")
    max_wait_ms: float = Field(
        5.0, ge=0, description="how long a batch waits for more compatible requests once it has one"
    )
    queue_size: int = Field(64, ge=1, description="per-model bound on queued images of each priority (429 when full)")
    admission_wait_ms: float = Field(
        1000.0, ge=0, description="how long a request may wait for room in a full queue before its 429 "
        "(0: refuse at once); it waits in line, its body unread when it is one raw image, nothing decoded"
    )
    max_waiting: int = Field(256, ge=0, description="per-model bound on images waiting for queue room (429 at once beyond)")
    replicas: int = Field(
        0, ge=0, description="worker threads per model, each running one batch at a time (0: auto -- on a CPU "
        "with 2+ CPUs 3 for LightCap and 2 for the UCM captioner, whose one-core decoding loops then overlap the "
        "other replicas' networks; else 1)"
    )
    torch_threads: int = Field(0, ge=0, description="torch threads per replica (0: CPUs / the model's replicas)")
    cpus: int = Field(
        0, ge=0, description="CPUs the server may use (0: detect -- the process's CPU affinity, capped by a "
        "cgroup CPU quota)"
    )
    request_timeout_s: float = Field(30.0, gt=0, description="per-request deadline (504 when passed)")
    max_beam_size: int = Field(5, ge=1, description="largest beam_size a request may ask for")
    max_length_limit: int = Field(64, ge=1, description="largest max_length a request may ask for")

    # --- scenes ---------------------------------------------------------------------------------------
    scene_roots: str = Field(
        "", description="comma-separated folders POST /v1/scenes may read a raster from by `path`; unset: uploads only"
    )
    max_scene_body_bytes: int = Field(
        64 * 1024 * MB, gt=0, description="body cap of POST /v1/scenes uploads, streamed to disk (413)"
    )

    # --- jobs -----------------------------------------------------------------------------------------
    job_inflight: int = Field(16, ge=1, description="images of the running job queued in the pool at once")
    job_max_entries: int = Field(100_000, ge=1, description="archive entries a job may have")
    job_max_entry_bytes: int = Field(64 * MB, gt=0, description="largest archive entry extracted (bigger: refused)")
    job_max_total_bytes: int = Field(8 * 1024 * MB, gt=0, description="total extracted bytes of one job")

    @field_validator("api_key", "admin_key", mode="before")
    @classmethod
    def _empty_is_unset(cls, value):
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        from captioning.accel import resolve_device

        resolve_device(value)  # ValueError names the value (no GPU, bad index, unknown word)
        return value.strip().lower()

    @field_validator("precision")
    @classmethod
    def _check_precision(cls, value: str) -> str:
        from captioning.accel import resolve_precision

        resolve_precision(value)
        return value.strip().lower()

    @field_validator("vision_runtime")
    @classmethod
    def _check_vision_runtime(cls, value: str) -> str:
        from captioning.ov_runtime import VISION_RUNTIMES

        choice = value.strip().lower()
        if choice not in VISION_RUNTIMES:
            raise ValueError(f"vision runtime {value!r} is not one of {', '.join(VISION_RUNTIMES)}")
        return choice

    @field_validator("formats")
    @classmethod
    def _check_formats(cls, value: str) -> str:
        names = [f.strip().upper() for f in value.split(",") if f.strip()]
        unknown = [f for f in names if f not in KNOWN_FORMATS]
        if unknown or not names:
            raise ValueError(f"unknown image format(s) {unknown or value!r}; choose from {', '.join(KNOWN_FORMATS)}")
        return ",".join(names)

    @field_validator("models")
    @classmethod
    def _check_models(cls, value: str) -> str:
        names = [m.strip() for m in value.split(",") if m.strip()]
        if not names:
            raise ValueError("models must be `auto` or a comma-separated list of model names")
        return ",".join(names)

    @model_validator(mode="after")
    def _check_pixels(self) -> Settings:
        if self.max_inflight_pixels < self.max_image_pixels:
            raise ValueError(
                f"CAPTIONER_MAX_INFLIGHT_PIXELS ({self.max_inflight_pixels}) must be at least "
                f"CAPTIONER_MAX_IMAGE_PIXELS ({self.max_image_pixels}), or the largest allowed image could never run"
            )
        return self

    @model_validator(mode="after")
    def _check_keys(self) -> Settings:
        for name in ("api_key", "admin_key"):
            secret = getattr(self, name)
            if secret is not None and len(secret.get_secret_value()) < 8:
                raise ValueError(f"CAPTIONER_{name.upper()} must be at least 8 characters")
        return self

    # --- derived --------------------------------------------------------------------------------------
    @property
    def format_list(self) -> list[str]:
        return self.formats.split(",")

    @property
    def model_names(self) -> list[str] | None:
        """Explicit model names, or None for ``auto``."""
        return None if self.models == "auto" else self.models.split(",")

    @property
    def scene_root_list(self) -> list[Path]:
        return [Path(r.strip()).expanduser().resolve() for r in self.scene_roots.split(",") if r.strip()]

    @property
    def device_name(self) -> str:
        """The resolved device, e.g. ``cpu`` or ``cuda:0``."""
        from captioning.accel import resolve_device

        return str(resolve_device(self.device))

    @property
    def precision_name(self) -> str:
        """The resolved precision on the resolved device: ``fp32`` or ``bf16``."""
        from captioning.accel import resolve_precision

        return resolve_precision(self.precision, self.device_name)

    @property
    def vision_runtime_name(self) -> str:
        """The resolved runtime of the convolutional networks on the resolved device: ``openvino`` or ``torch``."""
        from captioning.ov_runtime import resolve_vision_runtime

        return resolve_vision_runtime(self.vision_runtime, self.device_name)

    @property
    def cpu_budget(self) -> int:
        return self.cpus or available_cpus()

    def replicas_for(self, kind: str, task: str | None = None) -> int:
        """Worker replicas of a model of ``kind`` (``caption``, ``labels``, ``concepts``) and ``task`` (its manifest
        task, e.g. ``lightcap``). Auto, measured on 2 CPUs (bench/results/service.md, docs/service.md): a captioner
        gets two 1-thread replicas (1.04-1.61x the requests/s of one 2-thread replica: a batch's decoding loop
        runs on one core, which the other replica's networks fill), LightCap three (with its compiled search, two
        replicas left a third of a core idle between them, in Python glue and GIL hand-offs: 1.08-1.18x two at 8
        and 32 clients; four lost again; the UCM captioner lost with three); the label and concept models, all
        networks, gain nothing or lose."""
        if self.replicas:
            return self.replicas
        if kind != "caption" or self.device_name != "cpu" or self.cpu_budget < 2:
            return 1
        return 3 if task == "lightcap" else 2

    def threads_for(self, kind: str, task: str | None = None) -> int:
        """torch (and OpenVINO) threads of each replica of a model of ``kind`` / ``task``: the CPUs shared among
        its replicas, at least one (LightCap's third replica on 2 CPUs oversubscribes them by design, above)."""
        return self.torch_threads or max(1, self.cpu_budget // self.replicas_for(kind, task))

    @property
    def decode_threads(self) -> int:
        return self.intake_threads or min(4, self.cpu_budget)


def available_cpus() -> int:
    """CPUs this process may run on: its CPU affinity, capped by a cgroup v2 CPU quota (``cpu.max``: a container's
    CPU limit, which the affinity does not show)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def settings_table() -> str:
    """The markdown table of every setting (docs/service.md embeds it)."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.default
        if isinstance(default, Path):
            default = str(default)
        shown = "unset" if default is None else f"`{default}`"
        rows.append(f"| `CAPTIONER_{name.upper()}` | {shown} | {field.description} |")
    return "\n".join(rows)


if __name__ == "__main__":  # pragma: no cover
    print(settings_table())
