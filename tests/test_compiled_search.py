"""The compiled CPU search (captioning/models/lightcap/compiled_search.py) against the torch search it replaces on
the CPU (``FastLightCapDecoder`` + ``captioning.decoding``): same hypotheses, scores to float32 rounding (1e-4),
for every decoding option; its GELU; no out-of-bounds access (numba does not check indices unless asked); the
warm-up compiles exactly the signatures a real search uses; the cache directory fallback."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from test_fast_inference import BOS, EOS, make_inputs, make_model

from captioning.decoding import DecodeOptions
from captioning.models.lightcap import compiled_search
from captioning.models.lightcap.captioner import FastLightCapDecoder

ROOT = Path(__file__).resolve().parents[1]

OPTIONS = [
    DecodeOptions(beam_size=3, max_length=10, min_length=3, length_penalty=1.0, no_repeat_ngram_size=3, max_repeat_run=2),
    DecodeOptions(beam_size=2, max_length=9, min_length=0, length_penalty=0.0),
    DecodeOptions(beam_size=4, max_length=8, min_length=2, length_penalty=0.6, no_repeat_ngram_size=2),
    DecodeOptions(beam_size=3, max_length=7, repetition_penalty=1.5, no_repeat_ngram_size=1),
    DecodeOptions(beam_size=3, max_length=6, min_length=6, max_repeat_run=1),
    DecodeOptions(beam_size=2, max_length=1),
    DecodeOptions(beam_size=1, max_length=10, min_length=2, no_repeat_ngram_size=2, max_repeat_run=2),
    DecodeOptions(beam_size=1, max_length=8, repetition_penalty=2.0, length_penalty=1.0),
]


@pytest.mark.parametrize("options", OPTIONS, ids=[f"beam{o.beam_size}-{i}" for i, o in enumerate(OPTIONS)])
@pytest.mark.parametrize("seed", [0, 3])
def test_compiled_search_gives_the_torch_search_hypotheses(options, seed):
    model = make_model(seed=seed, std=0.5)
    grid, concepts = make_inputs(B=6, seed=seed + 1)
    kw = dict(bos_id=BOS, eos_id=EOS, fast=True)
    compiled = model.generate(grid, concepts, options, **kw)
    torch_search = model.generate(grid, concepts, options, **kw, compiled=False)
    assert [h.tokens for h in compiled] == [h.tokens for h in torch_search]
    for a, b in zip(compiled, torch_search, strict=True):
        assert a.log_prob == pytest.approx(b.log_prob, abs=1e-4)
        assert a.score == pytest.approx(b.score, abs=1e-4)


def test_compiled_step_log_probs_match_the_torch_step():
    """Step by step on the same tokens (no search in between): the kernel's log-probabilities vs the torch step's,
    for all rows and for a subset (the rows of finished images and dead beams are left out of a step)."""
    model = make_model(seed=5)
    grid, concepts = make_inputs(B=3, seed=6)
    decoder = FastLightCapDecoder(model, 8)
    state = decoder.init_state((grid, concepts))
    weights = compiled_search.step_weights(decoder, state["caption_base"])
    prefix_k = compiled_search._array(torch.stack(state["prefix_k"]).transpose(-1, -2))
    prefix_v = compiled_search._array(torch.stack(state["prefix_v"]).transpose(-1, -2))
    mask = compiled_search._array(state["mask"][:, 0, 0, :])
    cache = np.zeros((8, len(decoder.layers), 2, 3, decoder.heads, decoder.head_dim), np.float32)
    log_probs = np.empty((3, model.arch["vocab_size"]), np.float32)
    tokens = torch.randint(4, model.arch["vocab_size"], (3, 6), generator=torch.Generator().manual_seed(7))
    last = torch.full((3,), BOS)
    some = np.empty_like(log_probs)
    for t in range(tokens.shape[1]):
        expected, state = decoder.step(last, state)
        args = (last.numpy().astype(np.int64), t, 1, weights, prefix_k, prefix_v, mask, cache)
        compiled_search._step(args[0], np.array([2, 0]), *args[1:], some)  # a subset of the rows, in any order
        compiled_search._step(args[0], np.arange(3), *args[1:], log_probs)
        np.testing.assert_allclose(log_probs, expected.numpy(), atol=1e-5, rtol=0)
        np.testing.assert_allclose(some[[0, 2]], expected.numpy()[[0, 2]], atol=1e-5, rtol=0)
        last = tokens[:, t]


def test_gelu_is_berts_exact_gelu():
    x = torch.linspace(-12, 12, 200_001)
    got = x.numpy().copy()
    compiled_search._gelu(got)
    exact = torch.nn.functional.gelu(x.double())
    assert float((torch.from_numpy(got).double() - exact).abs().max()) < 2e-6


def test_warm_up_compiles_the_signatures_a_search_uses():
    """A request must not pay for compilation: after ``warm_up`` a real search adds no new signature."""
    model = make_model(seed=1)
    grid, concepts = make_inputs(B=2, seed=2)
    compiled_search.warm_up(FastLightCapDecoder(model, 11))
    before = (len(compiled_search._beam_search.signatures), len(compiled_search._greedy_search.signatures))
    assert min(before) >= 1
    for beam in (3, 1):
        model.generate(grid, concepts, DecodeOptions(beam_size=beam, max_length=10), bos_id=BOS, eos_id=EOS, fast=True)
    assert (len(compiled_search._beam_search.signatures), len(compiled_search._greedy_search.signatures)) == before


def test_kernel_warm_up_covers_the_generic_beam_search():
    """``search_kernels.warm_up`` (UCM's runtime calls it at load) compiles what ``decoding.beam_search`` calls."""
    from test_fast_inference import ToyModel

    from captioning import search_kernels
    from captioning.decoding import beam_search

    search_kernels.warm_up()
    kernels = (search_kernels.new_book, search_kernels.adjust, search_kernels.beam_select, search_kernels.advance)
    before = [len(k.signatures) for k in kernels]
    beam_search(ToyModel(9, 3), [0.2, 0.7, 1.1], DecodeOptions(beam_size=3, max_length=6, repetition_penalty=1.2,
                                                              length_penalty=0.6), bos_id=0, eos_id=1)
    assert [len(k.signatures) for k in kernels] == before


def test_the_search_stays_in_bounds(tmp_path):
    """numba does not check indices: recompile with bounds checking on (a fresh cache) and search with the
    options above, LightCap's compiled loop and the generic beam search's kernels; an out-of-bounds access raises
    IndexError in the child."""
    script = textwrap.dedent(
        """
        from test_compiled_search import OPTIONS
        from test_fast_inference import BOS, EOS, ToyModel, make_inputs, make_model
        from captioning.decoding import beam_search
        model = make_model(seed=2, std=0.5)
        grid, concepts = make_inputs(B=3, seed=4)
        for options in OPTIONS:
            model.generate(grid, concepts, options, bos_id=BOS, eos_id=EOS, fast=True)
            if options.beam_size > 1:  # the generic driver (UCM; LightCap on a GPU) on the same kernels
                beam_search(ToyModel(7, 1), [0.5, 1.5], options, bos_id=0, eos_id=1)
        print("in bounds")
        """
    )
    env = {**os.environ, "NUMBA_BOUNDSCHECK": "1", "NUMBA_CACHE_DIR": str(tmp_path),
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "in bounds" in run.stdout, run.stderr[-3000:]


def test_cache_dir_falls_back_when_the_package_is_read_only(monkeypatch, tmp_path):
    import numba

    from captioning import search_kernels

    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setattr(numba.config, "CACHE_DIR", numba.config.CACHE_DIR)  # restored after the test
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    real_access = os.access
    package = Path(search_kernels.__file__).parent
    monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == package else real_access(path, mode))
    search_kernels._cache_dir()
    assert os.environ["NUMBA_CACHE_DIR"] == numba.config.CACHE_DIR == str(tmp_path / "captioner-numba")
    monkeypatch.setenv("NUMBA_CACHE_DIR", "/somewhere/else")  # an explicit setting is kept
    search_kernels._cache_dir()
    assert os.environ["NUMBA_CACHE_DIR"] == "/somewhere/else"
