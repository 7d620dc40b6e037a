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


def test_replicas_and_threads_split_the_cpus(monkeypatch):
    monkeypatch.setattr("service.settings.available_cpus", lambda: 8)
    cpu = {"_env_file": None, "device": "cpu"}
    assert Settings(**cpu, replicas=2).threads_for("labels") == 4
    assert Settings(**cpu, replicas=2, torch_threads=1).threads_for("caption") == 1
    assert Settings(**cpu, replicas=16).threads_for("concepts") == 1
    # auto: two replicas for a captioner on 2+ CPUs (its decoding loop overlaps the other's networks), three for
    # LightCap, else one
    auto = Settings(**cpu)
    assert (auto.replicas_for("caption"), auto.threads_for("caption")) == (2, 4)
    assert (auto.replicas_for("caption", "ucm-captioner"), auto.threads_for("caption", "ucm-captioner")) == (2, 4)
    assert (auto.replicas_for("caption", "lightcap"), auto.threads_for("caption", "lightcap")) == (3, 2)
    assert (auto.replicas_for("labels"), auto.threads_for("labels")) == (1, 8)
    assert Settings(**cpu, cpus=1).replicas_for("caption", "lightcap") == 1
    assert Settings(**cpu, cpus=2).threads_for("caption") == 1
    assert (Settings(**cpu, cpus=2).replicas_for("caption", "lightcap"), Settings(**cpu, cpus=2).threads_for(
        "caption", "lightcap")) == (3, 1)
    assert Settings(**cpu, replicas=1).replicas_for("caption", "lightcap") == 1  # an explicit setting wins


def test_available_cpus_is_capped_by_the_cgroup_quota(monkeypatch, tmp_path):
    from service import settings as settings_module

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))
    quota = tmp_path / "cpu.max"
    real_path = settings_module.Path

    def fake_path(text):
        return quota if text == "/sys/fs/cgroup/cpu.max" else real_path(text)

    monkeypatch.setattr(settings_module, "Path", fake_path)
    quota.write_text("150000 100000\n")  # a 1.5-CPU limit: 2 threads
    assert settings_module.available_cpus() == 2
    quota.write_text("max 100000\n")
    assert settings_module.available_cpus() == 8
    quota.unlink()  # no cgroup v2 file: the affinity
    assert settings_module.available_cpus() == 8


def test_the_openvino_cache_setting_reaches_the_loaders(monkeypatch, tmp_path):
    """CAPTIONER_OV_CACHE_DIR from a .env file (not the environment) still decides where the loads cache."""
    from captioning.ov_runtime import cache_dir
    from service.app import create_app

    monkeypatch.delenv("CAPTIONER_OV_CACHE_DIR", raising=False)  # restored after the test
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text(f"CAPTIONER_OV_CACHE_DIR={tmp_path / 'ov'}\nCAPTIONER_DATA_DIR={tmp_path / 'data'}\n")
    settings = Settings()
    assert settings.ov_cache_dir == str(tmp_path / "ov") and cache_dir() != tmp_path / "ov"
    create_app(settings)
    assert cache_dir() == tmp_path / "ov"
    monkeypatch.setenv("CAPTIONER_OV_CACHE_DIR", "off")
    assert cache_dir() is None
