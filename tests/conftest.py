import os

# Offline, quiet, fair: no hubs, no progress bars in logs, one torch thread per test process.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("CAPTIONER_NO_PROGRESS", "1")
# torch runs the convolutional networks unless a test asks for OpenVINO (tests/test_ov_runtime.py,
# test_fast_inference.py): converting them at every model load would cost the suite minutes
os.environ.setdefault("CAPTIONER_VISION_RUNTIME", "torch")
# converted OpenVINO networks are cached in a folder of this test session, not the user's cache
if "CAPTIONER_OV_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["CAPTIONER_OV_CACHE_DIR"] = tempfile.mkdtemp(prefix="captioner-ov-tests-")
    atexit.register(shutil.rmtree, os.environ["CAPTIONER_OV_CACHE_DIR"], True)

import torch  # noqa: E402

torch.set_num_threads(1)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory):
    """A small synthetic dataset (3 pictures per class, seed 0, 256 px, UCM layout); returns its folder."""
    from captioning.data.synth import generate

    out = tmp_path_factory.mktemp("synth") / "data"
    generate(out, per_class=3, seed=0, size=256, workers=1)
    return out
