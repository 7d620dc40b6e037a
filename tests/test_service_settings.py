"""Settings come from CAPTIONER_* variables and refuse bad values with the variable's name."""

import pytest
from pydantic import ValidationError

from service.settings import Settings


def test_environment_variables_are_read(monkeypatch):
    monkeypatch.setenv("CAPTIONER_MAX_BATCH_SIZE", "3")
    monkeypatch.setenv("CAPTIONER_MODELS", " ucm-captioner , concepts ")
    monkeypatch.setenv("CAPTIONER_FORMATS", "png,jpeg")
    monkeypatch.setenv("CAPTIONER_API_KEY", "")  # empty means unset
    s = Settings(_env_file=None)
    assert s.max_batch_size == 3 and s.model_names == ["ucm-captioner", "concepts"]
    assert s.format_list == ["PNG", "JPEG"] and s.api_key is None
    assert Settings(_env_file=None, max_batch_size=5).max_batch_size == 5  # code overrides the environment


def test_bad_values_are_refused():
    with pytest.raises(ValidationError, match="CAPTIONER_ADMIN_KEY must be at least 8"):
        Settings(_env_file=None, admin_key="short")
    with pytest.raises(ValidationError, match="unknown image format"):
        Settings(_env_file=None, formats="PNG,HEIC")
    with pytest.raises(ValidationError, match="max_batch_size"):
        Settings(_env_file=None, max_batch_size=0)
    with pytest.raises(ValidationError, match="(?s)vision_runtime.*'onnx' is not one of auto, torch, openvino"):
        Settings(_env_file=None, vision_runtime="onnx")
    assert Settings(_env_file=None, vision_runtime=" Torch ").vision_runtime_name == "torch"


def test_threads_per_replica_split_the_cores(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert Settings(_env_file=None, replicas=2).threads_per_replica == 4
    assert Settings(_env_file=None, replicas=2, torch_threads=1).threads_per_replica == 1
    assert Settings(_env_file=None, replicas=16).threads_per_replica == 1
