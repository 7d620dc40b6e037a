"""Core library of the captioning service: data formats, models, decoding, metrics, model store.

Import layering (see docs/ARCHITECTURE.md): ``captioning`` imports neither ``training`` nor ``service``.

Importing the package sets one process-wide default before anything here imports torch: ``GOMP_SPINCOUNT``
(``OMP_SPIN_DEFAULT`` iterations, about 60 microseconds) unless the environment sets it or
``OMP_WAIT_POLICY``. torch's OpenMP threads (libgomp) otherwise spin for about 2 ms after every parallel op,
and the fast path hands the cores from torch ops straight to OpenVINO's and numba's own threads, which the
spinning threads then slow down (an OpenVINO network call took 4.6 ms right after a 0.3 ms torch op instead
of 2.4 ms; ``bench/omp_spin.py`` measures the whole path both ways, docs/performance.md). libgomp reads the
variable once, when torch loads: a process that imported torch before ``captioning`` keeps libgomp's default
(``accel.openmp_spin`` says which applies).
"""

import os as _os
import sys as _sys

__version__ = "0.1.0"

OMP_SPIN_DEFAULT = "10000"
# set here, but too late when torch (so libgomp) was loaded before this package: it has read its environment
_SPIN_SET_TOO_LATE = False
if "GOMP_SPINCOUNT" not in _os.environ and "OMP_WAIT_POLICY" not in _os.environ:
    _os.environ["GOMP_SPINCOUNT"] = OMP_SPIN_DEFAULT
    _SPIN_SET_TOO_LATE = "torch" in _sys.modules
