"""captioning/weights.py: safetensors state dicts in a chosen dtype, read back in float32, errors naming the file."""

import pytest
import torch
from safetensors import safe_open

from captioning.errors import ConfigError, StoreError
from captioning.weights import load_into, load_state, save_state


def _state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "layer.weight": torch.randn(4, 3, generator=gen),
        "layer.bias": torch.randn(4, generator=gen),
        "other.scale": torch.randn(2, generator=gen).double(),
        "counter": torch.tensor([7, 11], dtype=torch.int64),
        "mask": torch.tensor([True, False]),
    }


@pytest.mark.parametrize(
    ("dtype", "stored", "tol"),
    [("float32", "F32", 0.0), ("float16", "F16", 1e-3), ("bfloat16", "BF16", 1e-2)],
)
def test_round_trip_stores_floats_in_dtype_and_loads_float32(tmp_path, dtype, stored, tol):
    state = _state()
    path = save_state(state, tmp_path / "w.safetensors", dtype)
    with safe_open(str(path), framework="pt") as f:
        kinds = {key: f.get_slice(key).get_dtype() for key in f.keys()}
    assert kinds == {"layer.weight": stored, "layer.bias": stored, "other.scale": stored, "counter": "I64", "mask": "BOOL"}
    back = load_state(path)
    assert set(back) == set(state)
    for key in ("layer.weight", "layer.bias", "other.scale"):
        assert back[key].dtype == torch.float32
        torch.testing.assert_close(back[key], state[key].float(), rtol=tol, atol=tol)
    assert back["counter"].dtype == torch.int64 and back["counter"].tolist() == [7, 11]
    assert back["mask"].dtype == torch.bool and back["mask"].tolist() == [True, False]


def test_prefix_selects_and_strips_keys(tmp_path):
    path = save_state(_state(), tmp_path / "w.safetensors")
    assert set(load_state(path, prefix="layer.")) == {"weight", "bias"}
    with pytest.raises(StoreError, match=rf"{path}: no weights under 'decoder\.'"):
        load_state(path, prefix="decoder.")


def test_load_into_fills_a_module_and_names_the_file_when_it_does_not_fit(tmp_path):
    source = torch.nn.Linear(3, 4)
    path = save_state({f"layer.{k}": v for k, v in source.state_dict().items()}, tmp_path / "w.safetensors", "float16")
    target = torch.nn.Linear(3, 4)
    load_into(target, path, prefix="layer.")
    torch.testing.assert_close(target.weight, source.weight.half().float())
    with pytest.raises(StoreError, match=rf"{path}: weights under 'layer\.' do not fit the model"):
        load_into(torch.nn.Linear(5, 4), path, prefix="layer.")


def test_missing_and_corrupt_files_are_store_errors_naming_them(tmp_path):
    missing = tmp_path / "absent.safetensors"
    with pytest.raises(StoreError, match=rf"{missing}: weights file missing"):
        load_state(missing)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00\x01 not a safetensors file")
    with pytest.raises(StoreError, match=rf"{corrupt}: not a readable safetensors file"):
        load_state(corrupt)


def test_bad_dtype_and_non_tensors_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="weights_dtype must be one of float16, bfloat16, float32, got 'int8'"):
        save_state(_state(), tmp_path / "w.safetensors", "int8")
    with pytest.raises(StoreError, match="'step' is a int, not a tensor"):
        save_state({"step": 3}, tmp_path / "w.safetensors")
    assert not (tmp_path / "w.safetensors").exists()


def test_weights_io_has_one_home():
    """captioning.weights is the only module that reads or writes safetensors; the old per-family names
    (concepts_data.save_tensors / load_tensors, store_io.save_weights / load_into) are gone, not re-exported."""
    from pathlib import Path

    from captioning.models.lightcap import concepts_data
    from captioning.models.ucm import store_io

    assert not any(hasattr(concepts_data, n) for n in ("save_tensors", "load_tensors", "save_state", "load_state"))
    assert not any(hasattr(store_io, n) for n in ("save_weights", "load_into", "save_state"))
    root = Path(__file__).resolve().parents[1]
    readers = sorted(
        str(p.relative_to(root)) for d in ("captioning", "service", "training") for p in (root / d).rglob("*.py")
        if "safetensors" in p.read_text() and ("from safetensors" in p.read_text() or "import safetensors" in p.read_text())
    )
    assert readers == ["captioning/weights.py"]
