"""Errors as ``application/problem+json`` (RFC 9457) with stable ``type`` URIs.

Every error the service answers is a :class:`Problem`. Its ``type`` is ``/problems/<slug>`` (relative to
the service; ``GET /problems/<slug>`` explains it), so clients can switch on the slug. ``detail`` is
meant for a person and names what was wrong (image index and filename, parameter, job id); no stack
trace is ever sent. Extra members (``errors``, ``retry_after_s``, ...) carry machine-readable detail.
"""

from __future__ import annotations

from typing import Any

PROBLEM_MEDIA_TYPE = "application/problem+json"
PROBLEM_BASE = "/problems/"

# slug -> (status, title, explanation). The slugs are the stable contract; never rename one.
CATALOG: dict[str, tuple[int, str, str]] = {
    "invalid-request": (400, "Invalid request", "The body could not be read as multipart form, JSON or an image."),
    "invalid-parameter": (422, "Invalid parameter", "A query, form or JSON parameter is missing or out of range; "
                          "`errors` lists each with its location."),
    "no-image": (400, "No image", "The request carried no image."),
    "empty-image": (400, "Empty image", "An image has 0 bytes."),
    "invalid-base64": (400, "Invalid base64", "A JSON image is not valid base64."),
    "invalid-image": (400, "Invalid image", "An image is truncated or corrupt and cannot be decoded."),
    "unsupported-image": (415, "Unsupported image", "An image is not in an allowed format (JPEG, PNG, WebP, BMP, "
                          "GIF, TIFF), e.g. a text file named .jpg."),
    "unsupported-media-type": (415, "Unsupported media type", "The request's Content-Type is not accepted here."),
    "image-too-large": (413, "Image too large", "An image has more pixels than CAPTIONER_MAX_IMAGE_PIXELS "
                        "(checked from its header before decoding), or is a decompression bomb."),
    "payload-too-large": (413, "Payload too large", "The body is larger than the cap (CAPTIONER_MAX_BODY_BYTES; "
                          "CAPTIONER_MAX_JOB_BODY_BYTES for jobs)."),
    "too-many-images": (413, "Too many images", "More images than CAPTIONER_MAX_IMAGES_PER_REQUEST; use a job."),
    "invalid-archive": (400, "Invalid archive", "A job's archive, or one of its entries, is corrupt and cannot be "
                        "read (reported per entry in the job's results)."),
    "refused-entry": (422, "Archive entry refused", "A job's archive entry was not extracted: absolute path, "
                      "'..' escape, link, device, too large, or past the job's limits (reported per entry)."),
    "invalid-scene": (422, "Invalid scene", "A scene job's raster cannot be read or processed (not a raster, "
                      "corrupt, bands out of range, not under CAPTIONER_SCENE_ROOTS as a file); `detail` names it."),
    "scene-not-ready": (409, "Scene not ready", "The scene job has not succeeded (yet); its outputs are written "
                        "when every tile is done."),
    "unauthorized": (401, "Unauthorized", "An API key is required: `Authorization: Bearer KEY` or `X-API-Key`."),
    "forbidden": (403, "Forbidden", "The key is not allowed here (admin routes need CAPTIONER_ADMIN_KEY)."),
    "not-found": (404, "Not found", "No such route, model or job."),
    "method-not-allowed": (405, "Method not allowed", "The route exists but not with this HTTP method."),
    "unknown-model": (404, "Unknown model", "The requested model is not served by this instance; "
                      "GET /v1/models lists those that are."),
    "job-not-active": (409, "Job not active", "The job has already finished; only queued or running jobs can "
                       "be cancelled (add purge=true to delete it)."),
    "reload-failed": (409, "Reload failed", "The alias's version could not be loaded (missing files, hash "
                      "mismatch...); the previous version keeps serving."),
    "overloaded": (429, "Overloaded", "The model's queue is full; retry after `Retry-After` seconds."),
    "deadline-exceeded": (504, "Deadline exceeded", "The request was not answered within "
                          "CAPTIONER_REQUEST_TIMEOUT_S; images still queued were not run."),
    "model-unavailable": (503, "Model unavailable", "No model of the needed kind is loaded on this instance."),
    "shutting-down": (503, "Shutting down", "The server is draining before it stops; retry on another replica."),
    "not-ready": (503, "Not ready", "Models are still loading, one failed to load, or workers are down; "
                  "`reasons` says which."),
    "client-closed": (499, "Client closed request", "The client disconnected before the answer; its queued "
                      "images were dropped (only seen in logs and metrics)."),
    "internal-error": (500, "Internal error", "An unexpected error; the server log has the details."),
}


def problem_type(slug: str) -> str:
    return PROBLEM_BASE + slug


class Problem(Exception):
    """An error answered as problem+json. ``extra`` members are merged into the body."""

    def __init__(
        self,
        slug: str,
        detail: str,
        *,
        status: int | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ):
        if slug not in CATALOG:
            raise ValueError(f"unknown problem slug {slug!r}")
        default_status, title, _ = CATALOG[slug]
        super().__init__(detail)
        self.slug = slug
        self.status = status or default_status
        self.title = title
        self.detail = detail
        self.headers = headers or {}
        self.extra = extra

    def body(self, instance: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": problem_type(self.slug),
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        if instance:
            body["instance"] = instance
        body.update(self.extra)
        return body

    def __repr__(self) -> str:
        return f"Problem({self.slug!r}, {self.detail!r}, status={self.status})"
