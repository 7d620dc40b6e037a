"""One loaded object per key while anything holds it (torch-free).

``shared(key, build)`` returns the live object stored under ``key``, or builds it, stores a weak reference and
returns it: when the last holder drops it (a hot-swap unloading the model that used it), it is freed and the next
call builds again. Used where two served models hold the same read-only, published weights: the ``concepts`` task
and a LightCap captioner trained on that concepts version share one concept extractor
(``captioning.models.lightcap.runtime``); extractors of different concepts versions on the same CLIP or detector
version share their converted OpenVINO networks (``captioning.ov_runtime``). The shared objects are read-only at
run time; whoever shares one must not change it after building.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Hashable
from typing import TypeVar

T = TypeVar("T")

_LIVE: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_LOCK = threading.Lock()


def shared(key: Hashable, build: Callable[[], T]) -> T:
    """The live object under ``key``, else ``build()`` (outside the lock, so a build may share its own parts;
    two threads racing on one key both build and the first stored wins)."""
    with _LOCK:
        found = _LIVE.get(key)
    if found is not None:
        return found
    built = build()
    with _LOCK:
        return _LIVE.setdefault(key, built)


def live_keys() -> list[Hashable]:
    """The keys whose objects are alive now (for tests and diagnostics)."""
    with _LOCK:
        return list(_LIVE.keys())
