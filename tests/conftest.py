import os

# Offline, quiet, fair: no hubs, no progress bars in logs, one torch thread per test process.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("CAPTIONER_NO_PROGRESS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
