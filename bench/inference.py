"""In-process inference benchmark of the served models, stage by stage, with quality in the same table.

    PYTHONPATH=. python bench/inference.py                 # the full table (about 10-15 min on 2 cores)
    PYTHONPATH=. python bench/inference.py --quick         # a subset: 2 threads, fewer images and repeats
    PYTHONPATH=. python bench/inference.py --device cuda   # on a GPU (bench/gpu_check.sh)

Rows: per model and stage (LightCap: CLIP grid, detector, aligner, decode, end to end; UCM captioner; UCM
classifier), batch 1 and 8, 1 and 2 threads, fp32 and bf16, greedy and the published beam, for the *reference*
path (the networks as trained: unfolded batch norms, ``transformers``' generic decoder with its ``DynamicCache``)
and the *fast* path (what the runtimes serve: folded BN, channels-last, shared-prefix decoder). Each row:

* ``ms/img``: median over ``--repeats`` timed calls (after one warm-up) divided by the batch size;
* ``FLOPs/img``: ``torch.utils.flop_counter.FlopCounterMode`` over one call (matmuls and convolutions);
* ``GFLOP/s`` achieved and its fraction of the fp32 matmul peak measured in the same run (a 2048x2048 matmul at
  the same thread count); ``floor ms/img`` = FLOPs / peak;
* ``CIDEr-D``: of that model, path, precision and decoding on the fixed image sets (batch 8; batch size and
  threads do not change the captions): ``test``: the first ``--images`` pictures of the test split of the
  synthetic set the defaults were trained on (``captioning.data.synth``, seed 0, 100 per class, 256 px, the
  same split rule and TIFF-JPEG round trip as ``captioner synth``); ``unseen``: as many test pictures of seed 777.

The peer in the same run: BLIP-base (``transformers.BlipForConditionalGeneration`` with a default ``BlipConfig``,
random init, 384 px, greedy 20 tokens), batch 1 and 8, 2 threads; reported as a throughput ratio.
Writes ``bench/results/inference.json`` and ``.md`` (``--out`` elsewhere).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import captioning  # noqa: E402,F401,I001  - before torch: it sets torch's OpenMP spin (captioning/__init__.py)
import numpy as np  # noqa: E402
import torch  # noqa: E402

from captioning import accel  # noqa: E402

RESULTS = ROOT / "bench" / "results"


# ---------------------------------------------------------------------------------------------- data
def synth_test_images(seed: int, n: int, per_class: int = 100, size: int = 256) -> tuple[list[Any], list[list[str]]]:
    """The first ``n`` test-split pictures (round robin over the 21 classes) of ``captioner synth --seed seed``,
    rendered in memory and round-tripped through the generator's TIFF-JPEG encoding; and their references."""
    from PIL import Image

    from captioning.data.synth.concepts import UCM_CLASSES
    from captioning.data.synth.generator import TIFF_OPTIONS, render, split_counts

    n_train, n_val, _ = split_counts(per_class)
    per_scene = []
    for ci, _scene in enumerate(UCM_CLASSES):
        order = np.random.default_rng([seed, ci, 99, 99]).permutation(per_class)
        per_scene.append(sorted(int(j) for j in order[n_train + n_val :]))
    chosen = []
    rank = 0
    while len(chosen) < n and rank < max(len(t) for t in per_scene):
        for ci, tests in enumerate(per_scene):
            if rank < len(tests) and len(chosen) < n:
                chosen.append((ci, tests[rank]))
        rank += 1
    images, refs = [], []
    for ci, j in chosen:
        rendered = render(UCM_CLASSES[ci], seed, ci * per_class + j, size)
        buffer = io.BytesIO()
        rendered.image.save(buffer, format="TIFF", **TIFF_OPTIONS)
        buffer.seek(0)
        images.append(Image.open(buffer).convert("RGB"))
        refs.append(list(rendered.captions))
    return images, refs


def cider(texts: list[str], refs: list[list[str]]) -> float:
    from captioning.metrics import caption_metrics

    scores = caption_metrics({i: r for i, r in enumerate(refs)}, {i: t for i, t in enumerate(texts)}, meteor=False)
    return round(float(scores["CIDEr-D"]), 4)


# ---------------------------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], repeats: int, device: torch.device) -> tuple[float, float]:
    """Median wall-clock seconds and median process CPU seconds (all threads) of ``repeats`` calls after one
    warm-up call. On a shared machine the CPU time is the robust one: it does not count time spent preempted."""
    fn()
    sync(device)
    walls, cpus = [], []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        sync(device)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus)


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call by torch's flop counter. It sees only torch operators, so LightCap's compiled CPU search
    (captioning/models/lightcap/compiled_search.py) is counted on the torch search it mirrors step for step."""
    from torch.utils.flop_counter import FlopCounterMode

    from captioning.models.lightcap.captioner import LightCapCaptioner

    generate = LightCapCaptioner.generate

    def torch_search(self, *args, **kwargs):
        return generate(self, *args, **{**kwargs, "compiled": False})

    LightCapCaptioner.generate = torch_search
    try:
        with FlopCounterMode(display=False) as counter:
            fn()
    finally:
        LightCapCaptioner.generate = generate
    return int(counter.get_total_flops())


def matmul_peak(
    threads: int, device: torch.device, dtype: torch.dtype = torch.float32, repeats: int = 5
) -> tuple[float, float]:
    """GFLOP per wall second and per process-CPU second of a 2048x2048 matmul (medians of ``repeats``)."""
    torch.set_num_threads(threads)
    a = torch.randn(2048, 2048, device=device).to(dtype)
    b = torch.randn(2048, 2048, device=device).to(dtype)
    wall, cpu = time_call(lambda: a @ b, repeats, device)
    return 2 * 2048**3 / wall / 1e9, 2 * 2048**3 / max(cpu, 1e-9) / 1e9


# ---------------------------------------------------------------------------------------------- models
PATHS = ("reference", "fast", "openvino")


def load_runtimes(store_path: Path, device: str, precisions: list[str], paths: list[str]) -> dict[tuple, Any]:
    """(model, path, precision) -> runtime; ``reference``: the networks as trained (``fast=False``); ``fast``:
    the fast path with its convolutional networks on torch; ``openvino``: the same on OpenVINO (what the
    service runs on a CPU with ``CAPTIONER_VISION_RUNTIME=auto``)."""
    from captioning.models.lightcap.pipeline import load_lightcap
    from captioning.models.ucm.runtime import load_captioner, load_classifier
    from captioning.store import ModelStore

    store = ModelStore(store_path)
    out = {}
    for precision in precisions:
        for path in paths:
            if path not in PATHS:
                raise SystemExit(f"--paths: unknown path {path!r} (choose from {', '.join(PATHS)})")
            fast, vision = path != "reference", ("openvino" if path == "openvino" else "torch")
            kw = {"device": device, "precision": precision, "fast": fast, "vision_runtime": vision}
            out[("lightcap", path, precision)] = load_lightcap(store.load("lightcap@production"), store, **kw)
            out[("ucm-captioner", path, precision)] = load_captioner(store.load("ucm-captioner@production"), store, **kw)
            out[("ucm-classifier", path, precision)] = load_classifier(store.load("ucm-classifier@production"), store, **kw)
    return out


def lightcap_stages(rt: Any, images: torch.Tensor, options: Any) -> dict[str, Callable[[], Any]]:
    """Callables of LightCap's stages on a fixed batch (inputs precomputed, so each times its own work)."""
    from captioning.accel import to_device

    ex = rt.extractor
    on_device = to_device(images, rt.device)
    with torch.no_grad():
        grid = ex.grid(on_device)
        proposals = ex.propose(on_device)
        boxes = [b for b, _ in proposals]
        ids, scores, _ = ex.extract_tensors(on_device, grid=grid)
    stages = {
        "grid": lambda: ex.grid(on_device),
        "detector": lambda: ex.propose(on_device),
        "aligner": lambda: ex.classify_boxes(on_device, boxes, grid=grid),
        "decode": lambda: rt.caption_features(grid, ids, scores, options),
        "total": lambda: rt.caption(images, options),
    }
    if rt.fast and rt.device.type == "cpu":  # the search the compiled one replaced, for before/after in one run
        concepts = rt.packer(ids.cpu(), scores.cpu())
        tok = rt.tokenizer
        stages["decode-torch"] = lambda: rt.model.generate(
            grid.float(), concepts, options, bos_id=tok.bos_id, eos_id=tok.eos_id, fast=True, compiled=False)
    return stages


def compiled_plans(rt: Any, images: torch.Tensor, cache: dict, seconds: dict) -> list[tuple]:
    """torch.compile'd (inductor) CLIP trunk and YOLO network of a fast LightCap runtime; the first call of each
    shape (the compilation) is timed into ``seconds``."""
    from captioning.accel import to_device
    from captioning.models.lightcap.clip_encoder import resize_batch

    ex = rt.extractor
    key = (id(rt), "grid")
    if key not in cache:
        cache[key] = torch.compile(ex.encoder)
        cache[(id(rt), "detector")] = torch.compile(ex.detector.model)
    grid_fn, yolo_fn = cache[key], cache[(id(rt), "detector")]
    x = to_device(images, rt.device)
    grid_in = resize_batch(x, ex.encoder_size)  # what ConceptExtractor.grid feeds the encoder
    size = ex.detector.imgsz
    y = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).to(rt.dtype)
    plans = [("grid[compile]", "greedy", lambda: grid_fn(grid_in)), ("grid[eager]", "greedy", lambda: ex.encoder(grid_in)),
             ("yolo-net[compile]", "greedy", lambda: yolo_fn(y)), ("yolo-net[eager]", "greedy", lambda: ex.detector.model(y))]
    for name, _, fn in (plans[0], plans[2]):
        t0 = time.perf_counter()
        with torch.no_grad():
            fn()
        seconds[f"{name} {rt.dtype} batch {images.shape[0]} threads {torch.get_num_threads()}"] = round(
            time.perf_counter() - t0, 1
        )
    return plans


def runtime_plans(rt: Any, images: torch.Tensor, cache: dict, seconds: dict, runtimes: list[str]) -> list[tuple]:
    """The CLIP trunk and the YOLO network of a fast LightCap runtime run by OpenVINO and / or ONNX Runtime,
    converted from the same folded modules the runtime converts (``TrunkToGrid``, ``export_network``):
    OpenVINO as the runtime runs it (``captioning.ov_runtime.OpenVinoNet``, the runtime's precision), ONNX
    Runtime in fp32 only; against torch eager on the same inputs. Conversion time goes into ``seconds``, and
    the largest output difference from eager too (as ``diff``)."""
    import copy

    import numpy as np

    from captioning.accel import to_device
    from captioning.models.lightcap.clip_encoder import TrunkToGrid, resize_batch
    from captioning.ov_runtime import OpenVinoNet

    ex = rt.extractor
    threads = torch.get_num_threads()
    x = to_device(images, rt.device)
    grid_in = resize_batch(x, ex.encoder_size)
    enc = ex.encoder
    size = ex.detector.imgsz
    yolo_in = torch.nn.functional.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False)
    nets = {
        "grid": (lambda: TrunkToGrid(copy.deepcopy(enc.trunk).float().to(memory_format=torch.contiguous_format),
                                     mean=enc.pixel_mean, std=enc.pixel_std), grid_in.float().contiguous()),
        "yolo-net": (lambda: ex.detector.export_network().float().to(memory_format=torch.contiguous_format), yolo_in),
    }
    plans: list[tuple] = []
    bf16 = rt.dtype == torch.bfloat16
    for net, (make, example) in nets.items():
        eager = make().eval()
        with torch.no_grad():
            expected = eager(example).float().numpy()
        for name in runtimes:
            if name == "onnxruntime" and bf16:
                continue
            key = (id(rt), net, name, threads)
            if key not in cache:
                t0 = time.perf_counter()
                if name == "openvino":
                    ov_net = OpenVinoNet(eager, example, precision="bf16" if bf16 else "fp32", name=net)
                    ov_net.compiled_for(threads)
                    cache[key] = ov_net
                elif name == "onnxruntime":
                    import io

                    import onnxruntime as ort

                    buf = io.BytesIO()
                    torch.onnx.export(eager, (example[:1],), buf, input_names=["x"], output_names=["y"],
                                      dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, dynamo=False)
                    options = ort.SessionOptions()
                    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
                    session = ort.InferenceSession(buf.getvalue(), options, providers=["CPUExecutionProvider"])
                    cache[key] = lambda a, s=session: torch.from_numpy(s.run(None, {"x": a.numpy()})[0])
                else:
                    raise SystemExit(f"--runtimes: unknown runtime {name!r} (openvino, onnxruntime)")
                seconds[f"{net}[{name}] {rt.dtype} threads {threads}"] = round(time.perf_counter() - t0, 1)
            run = cache[key]
            got = run(example).float().numpy()
            seconds[f"{net}[{name}] {rt.dtype} batch {example.shape[0]} max abs diff vs eager (of max "
                    f"{float(np.abs(expected).max()):.3g})"] = float(np.abs(got - expected).max())
            plans.append((f"{net}[{name}]", "greedy", lambda run=run, example=example: run(example)))
    grid_eager = ex.encoder
    yolo_eager = ex.detector.model
    y = yolo_in.to(rt.dtype)
    if ex.detector.channels_last:
        y = y.contiguous(memory_format=torch.channels_last)
    plans += [("grid[eager]", "greedy", lambda: grid_eager(grid_in)), ("yolo-net[eager]", "greedy", lambda: yolo_eager(y))]
    return plans


def caption_texts(rt: Any, pictures: list[Any], options: Any, batch: int = 8) -> list[str]:
    texts = []
    for start in range(0, len(pictures), batch):
        images = torch.stack([rt.preprocess(p) for p in pictures[start : start + batch]])
        texts.extend(o.text for o in rt.caption(images, options))
    return texts


# ---------------------------------------------------------------------------------------------- BLIP
def blip_rows(threads: int, batches: list[int], repeats: int, device: torch.device) -> list[dict[str, Any]]:
    from transformers import BlipConfig, BlipForConditionalGeneration

    torch.manual_seed(0)
    model = BlipForConditionalGeneration(BlipConfig()).eval().to(device)
    size = model.config.vision_config.image_size
    rows = []
    torch.set_num_threads(threads)
    for batch in batches:
        pixels = torch.rand(batch, 3, size, size, device=device)

        def run(pixels=pixels):  # BLIP's generate starts from its own [BOS]
            with torch.no_grad():
                return model.generate(
                    pixel_values=pixels, max_new_tokens=20, min_new_tokens=20, num_beams=1, do_sample=False
                )

        try:
            run()
        except (RuntimeError, IndexError):  # newer transformers drop BLIP's last prompt token ([SEP]) first: give it [BOS, SEP]
            text = model.config.text_config
            input_ids = torch.tensor([[text.bos_token_id, text.sep_token_id]], device=device).repeat(batch, 1)

            def run(pixels=pixels, input_ids=input_ids):
                with torch.no_grad():
                    return model.generate(
                        pixel_values=pixels, input_ids=input_ids, max_new_tokens=20, min_new_tokens=20,
                        num_beams=1, do_sample=False,
                    )

        seconds, cpu_seconds = time_call(run, repeats, device)
        flops = count_flops(run) if device.type == "cpu" else None
        rows.append({
            "model": "blip-base (random init)", "stage": "total", "path": "transformers", "precision": "fp32",
            "threads": threads, "batch": batch, "decode": "greedy-20", "ms_per_image": round(seconds * 1000 / batch, 2),
            "cpu_ms_per_image": round(cpu_seconds * 1000 / batch, 2),
            "images_per_s": round(batch / seconds, 3),
            "flops_per_image": None if flops is None else flops // batch, "image_size": size,
        })  # fmt: skip
        print(f"  blip batch {batch}: {seconds * 1000 / batch:.1f} ms/img", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------- main
def machine(device: torch.device) -> dict[str, Any]:
    import transformers

    info = {
        **accel.describe_cpu(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", type=Path, default=ROOT / "model_store")
    parser.add_argument("--device", default="cpu", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--precisions", default="fp32,bf16", help="comma list of fp32, bf16")
    parser.add_argument("--paths", default="reference,fast,openvino",
                        help="comma list of reference, fast (torch networks), openvino (fast, OpenVINO networks)")
    parser.add_argument("--threads", default="1,2", help="comma list of CPU thread counts")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--models", default="lightcap,ucm-captioner,ucm-classifier")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--images", type=int, default=64, help="pictures per quality set (test split, unseen seed)")
    parser.add_argument("--unseen-seed", type=int, default=777)
    parser.add_argument("--no-blip", action="store_true")
    parser.add_argument("--no-quality", action="store_true")
    parser.add_argument("--quick", action="store_true", help="2 threads, 3 repeats, 16 pictures per set")
    parser.add_argument(
        "--runtimes", default="",
        help="also time the CLIP trunk and YOLO network (fast path) under these inference runtimes against "
        "eager: openvino, onnxruntime (comma-separated; the packages must be installed)",
    )
    parser.add_argument(
        "--compile", action="store_true",
        help="also time torch.compile'd CLIP grid and YOLO (fast path) against eager, compile time included",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "inference")
    parser.add_argument(
        "--from-json", type=Path, default=None,
        help="measure nothing: recompute the summary and the .md of an earlier run's .json (written to --out)",
    )
    args = parser.parse_args(argv)
    if args.from_json:
        return rerender(args.from_json, args.out)
    if args.quick:
        args.threads, args.repeats, args.images = "2", 3, min(args.images, 16)

    device = accel.resolve_device(args.device)
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    for p in precisions:
        accel.compute_dtype(p)
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    threads_list = [int(t) for t in args.threads.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    started = time.time()
    info = machine(device)
    print(json.dumps(info), flush=True)

    peaks = {}
    for threads in threads_list:
        fp32_wall, fp32_cpu = matmul_peak(threads, device)
        bf16_wall, bf16_cpu = matmul_peak(threads, device, torch.bfloat16)
        peaks[threads] = {
            "fp32_gflops": round(fp32_wall, 1), "bf16_gflops": round(bf16_wall, 1),
            "fp32_gflop_per_cpu_s": round(fp32_cpu, 1), "bf16_gflop_per_cpu_s": round(bf16_cpu, 1),
        }
        print(f"matmul peak, {threads} thread(s): {peaks[threads]}", flush=True)

    runtimes = load_runtimes(args.store, str(device), precisions, paths)
    any_lc = runtimes[("lightcap", paths[0], precisions[0])]
    published = {m: runtimes[(m, paths[0], precisions[0])].decoding for m in ("lightcap", "ucm-captioner")}
    decodes = {
        m: {"greedy": published[m].__class__(**{**published[m].to_dict(), "beam_size": 1}), "beam": published[m]}
        for m in published
    }

    # ---- quality: CIDEr-D per (model, path, precision, decode) on both sets, batch 8
    quality: dict[tuple, dict[str, float]] = {}
    identical: dict[str, Any] = {}
    if not args.no_quality:
        sets = {
            "test": synth_test_images(0, args.images),
            "unseen": synth_test_images(args.unseen_seed, args.images),
        }
        torch.set_num_threads(1)  # captions do not depend on the thread count; 1 thread is fastest on a busy machine
        captions: dict[tuple, list[str]] = {}
        for (model, path, precision), rt in runtimes.items():
            if model not in decodes or model not in models:
                continue
            if path == "reference" and precision != "fp32":  # the reference is the fp32 network as trained
                continue
            for decode_name, options in decodes[model].items():
                row = {}
                for set_name, (pictures, refs) in sets.items():
                    texts = caption_texts(rt, pictures, options)
                    captions[(model, path, precision, decode_name, set_name)] = texts
                    row[set_name] = cider(texts, refs)
                quality[(model, path, precision, decode_name)] = row
                print(f"quality {model} {path} {precision} {decode_name}: {row}", flush=True)
        for model in decodes:
            for decode_name in ("greedy", "beam"):
                for set_name in sets:
                    key_ref = (model, "reference", "fp32", decode_name, set_name)
                    for path in paths:
                        for precision in precisions:
                            key = (model, path, precision, decode_name, set_name)
                            if key == key_ref or key_ref not in captions or key not in captions:
                                continue
                            same = sum(a == b for a, b in zip(captions[key], captions[key_ref], strict=True))
                            identical[f"{model} {path} {precision} {decode_name} {set_name}"] = {
                                "identical": same, "of": len(captions[key]),
                                "differences": [
                                    {"reference": b, "this": a}
                                    for a, b in zip(captions[key], captions[key_ref], strict=True) if a != b
                                ][:5],
                            }  # fmt: skip

    # ---- speed rows
    rows: list[dict[str, Any]] = []
    compiled: dict[tuple, Any] = {}
    compile_seconds: dict[str, float] = {}
    pictures = synth_test_images(0, max(batches))[0]
    for threads in threads_list:
        torch.set_num_threads(threads)
        peak = peaks[threads]["fp32_gflops"]
        cpu_peak = peaks[threads]["fp32_gflop_per_cpu_s"]
        for batch in batches:
            images = torch.stack([any_lc.preprocess(p) for p in pictures[:batch]])
            for (model, path, precision), rt in runtimes.items():
                if model not in models:
                    continue
                if model == "lightcap":
                    plans = []
                    for decode_name, options in decodes[model].items():
                        stages = lightcap_stages(rt, images, options)
                        if decode_name == "greedy":
                            plans += [(s, decode_name, stages[s]) for s in ("grid", "detector", "aligner")]
                        plans += [(s, decode_name, stages[s]) for s in ("decode", "decode-torch", "total") if s in stages]
                elif model == "ucm-captioner":
                    x = torch.stack([rt.preprocess(p) for p in pictures[:batch]])
                    plans = [("total", d, (lambda x=x, o=o, rt=rt: rt.caption(x, o))) for d, o in decodes[model].items()]
                else:
                    x = torch.stack([rt.preprocess(p) for p in pictures[:batch]])
                    plans = [("total", "-", (lambda x=x, rt=rt: rt.predict(x)))]
                if args.compile and model == "lightcap" and path == "fast":
                    plans += compiled_plans(rt, images, compiled, compile_seconds)
                if args.runtimes and model == "lightcap" and path == "fast":
                    plans += runtime_plans(rt, images, compiled, compile_seconds, args.runtimes.split(","))
                for stage, decode_name, fn in plans:
                    with torch.no_grad():
                        seconds, cpu_seconds = time_call(fn, args.repeats, device)
                        flops = count_flops(fn) // batch
                    ms = seconds * 1000 / batch
                    gflops = flops / (seconds / batch) / 1e9
                    q = quality.get((model, path, precision, decode_name), {}) if stage == "total" else {}
                    row = {
                        "model": model, "stage": stage, "path": path, "precision": precision, "threads": threads,
                        "batch": batch, "decode": decode_name, "ms_per_image": round(ms, 2),
                        "flops_per_image": flops, "gflops_per_s": round(gflops, 1),
                        "fraction_of_fp32_peak": round(gflops / peak, 3),
                        "floor_ms_per_image": round(flops / (peak * 1e9) * 1000, 2),
                        "cpu_ms_per_image": round(cpu_seconds * 1000 / batch, 2),
                        "cpu_floor_ms_per_image": round(flops / (cpu_peak * 1e9) * 1000, 2),
                        "cider_test": q.get("test"), "cider_unseen": q.get("unseen"),
                    }  # fmt: skip
                    rows.append(row)
                    print(
                        f"{model:15s} {stage:8s} {path:9s} {precision} t{threads} b{batch} {decode_name:6s} "
                        f"{ms:8.2f} ms/img  {flops / 1e9:6.3f} GFLOP  {gflops:6.1f} GFLOP/s", flush=True,
                    )

    borrow_torch_flops(rows, peaks)

    blip = []
    if not args.no_blip:
        blip_threads = max(threads_list)
        try:
            blip = blip_rows(blip_threads, batches, max(1, min(args.repeats, 3)), device)
        except Exception as exc:  # noqa: BLE001 - the peer must not cost the run its own results
            print(f"BLIP peer failed: {type(exc).__name__}: {exc}", flush=True)
            blip = [{"error": f"{type(exc).__name__}: {exc}"}]

    result = {
        "command": "python bench/inference.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": info,
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "seconds": round(time.time() - started, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "matmul_peak": {str(k): v for k, v in peaks.items()},
        "quality_sets": {
            "test": f"synthetic seed 0 (the defaults' data), first {args.images} test-split pictures",
            "unseen": f"synthetic seed {args.unseen_seed}, first {args.images} test-split pictures",
        },
        "quality": [
            {"model": k[0], "path": k[1], "precision": k[2], "decode": k[3], **v} for k, v in quality.items()
        ],
        "identical_to_reference_fp32": identical,
        "decoding": {m: {k: o.to_dict() for k, o in d.items()} for m, d in decodes.items()},
        "rows": rows,
        "compile_seconds": compile_seconds,
        "blip": blip,
        "summary": summarise(rows, blip, peaks, quality),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    args.out.with_suffix(".md").write_text(markdown(result))
    print(f"wrote {args.out.with_suffix('.json')} and .md in {result['seconds']} s", flush=True)
    return 0


def rerender(source: Path, out: Path) -> int:
    result = json.loads(source.read_text())
    quality = {(q["model"], q["path"], q["precision"], q["decode"]): {"test": q.get("test"), "unseen": q.get("unseen")}
               for q in result["quality"]}
    borrow_torch_flops(result["rows"], {int(k): v for k, v in result["matmul_peak"].items()})
    result["summary"] = summarise(result["rows"], result["blip"], result["matmul_peak"], quality)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(result))
    print(f"re-rendered {source} -> {out.with_suffix('.md')}")
    return 0


def _find(rows, **match) -> dict[str, Any] | None:
    for row in rows:
        if all(row.get(k) == v for k, v in match.items()):
            return row
    return None


def borrow_torch_flops(rows: list[dict[str, Any]], peaks: dict) -> None:
    """torch's flop counter does not see the networks OpenVINO or ONNX Runtime run: an ``openvino`` row takes
    the FLOPs of the same row of the ``fast`` path (the same networks on torch), a ``net[runtime]`` row those of
    ``net[eager]``, and their derived columns are recomputed."""
    for row in rows:
        stage = row["stage"]
        if stage.endswith("]") and not stage.endswith("[eager]"):
            twin_stage, twin_path = stage.split("[")[0] + "[eager]", row["path"]
        elif row["path"] == "openvino":
            twin_stage, twin_path = stage, "fast"
        else:
            continue
        twin = _find(rows, model=row["model"], stage=twin_stage, path=twin_path, precision=row["precision"],
                     threads=row["threads"], batch=row["batch"], decode=row["decode"])
        if not twin:
            continue
        flops = twin["flops_per_image"]
        peak, cpu_peak = peaks[row["threads"]]["fp32_gflops"], peaks[row["threads"]]["fp32_gflop_per_cpu_s"]
        gflops = flops / (row["ms_per_image"] / 1000) / 1e9
        row.update(flops_per_image=flops, gflops_per_s=round(gflops, 1), fraction_of_fp32_peak=round(gflops / peak, 3),
                   floor_ms_per_image=round(flops / (peak * 1e9) * 1000, 2),
                   cpu_floor_ms_per_image=round(flops / (cpu_peak * 1e9) * 1000, 2))


def summarise(rows, blip, peaks, quality) -> dict[str, Any]:
    """The issue's targets, each from this run's rows, per thread count (None where not measured)."""
    out: dict[str, Any] = {}
    served_paths = [p for p in ("fast", "openvino") if any(r["path"] == p for r in rows)]
    for threads in sorted(int(t) for t in peaks):
        for path in served_paths:
            def row(threads=threads, path=path, **match):
                return _find(rows, model=match.pop("model", "lightcap"), stage="total", threads=threads, path=path,
                             **match)

            lc8 = row(precision="fp32", batch=8, decode="beam")
            lc1 = row(precision="fp32", batch=1, decode="beam")
            lcb8 = row(precision="bf16", batch=8, decode="beam")
            lcb1 = row(precision="bf16", batch=1, decode="beam")
            ref8 = row(path="reference", precision="fp32", batch=8, decode="beam")
            ucm8 = row(model="ucm-captioner", precision="fp32", batch=8, decode="beam")
            ucmb8 = row(model="ucm-captioner", precision="bf16", batch=8, decode="beam")
            # wall clock, and process CPU time (robust on a shared machine: preemption is not counted; with N
            # threads it sums them, and its floor is the matmul's FLOPs per CPU-second at the same thread count)
            for clock, ms, floor_key in (
                ("wall", "ms_per_image", "floor_ms_per_image"), ("cpu", "cpu_ms_per_image", "cpu_floor_ms_per_image")
            ):
                p = f"t{threads} {clock} {path}:"
                if lc8:
                    floor = lc8[floor_key]
                    out[f"{p} lightcap fp32 b8 beam ms/img"] = lc8[ms]
                    out[f"{p} lightcap fp32 floor ms/img"] = floor
                    out[f"{p} lightcap fp32 b8 / floor"] = round(lc8[ms] / floor, 2)
                    out[f"{p} TARGET lightcap fp32 b8 <= 2x floor"] = lc8[ms] <= 2 * floor
                if lc1:
                    out[f"{p} lightcap fp32 b1 beam ms/img"] = lc1[ms]
                    out[f"{p} TARGET lightcap fp32 b1 <= 25 ms"] = lc1[ms] <= 25.0
                if lcb1:
                    out[f"{p} lightcap bf16 b1 beam ms/img"] = lcb1[ms]
                if lcb8 and lc8:
                    out[f"{p} lightcap bf16 b8 beam ms/img"] = lcb8[ms]
                    out[f"{p} TARGET lightcap bf16 b8 < fp32 floor"] = lcb8[ms] < lc8[floor_key]
                if ref8 and lc8:
                    out[f"{p} lightcap fp32 b8 speed-up vs reference"] = round(ref8[ms] / lc8[ms], 2)
                for precision in ("fp32", "bf16"):
                    for batch in (1, 8):
                        new = _find(rows, model="lightcap", stage="decode", threads=threads, path=path,
                                    precision=precision, batch=batch, decode="beam")
                        old = _find(rows, model="lightcap", stage="decode-torch", threads=threads, path=path,
                                    precision=precision, batch=batch, decode="beam")
                        if new and old:
                            out[f"{p} lightcap {precision} b{batch} beam decode: compiled / torch search ms/img"] = (
                                f"{new[ms]} / {old[ms]} ({old[ms] / new[ms]:.2f}x)")
                if ucm8:
                    out[f"{p} ucm-captioner fp32 b8 beam ms/img"] = ucm8[ms]
                    out[f"{p} TARGET ucm-captioner fp32 b8 <= 5 ms"] = ucm8[ms] <= 5.0
                if ucmb8:
                    out[f"{p} ucm-captioner bf16 b8 beam ms/img"] = ucmb8[ms]
                for batch in (1, 8):
                    b = _find([x for x in blip if "error" not in x], batch=batch, threads=threads)
                    for precision, lc in (("fp32", lc8 if batch == 8 else lc1), ("bf16", lcb8 if batch == 8 else lcb1)):
                        if b and lc:
                            out[f"{p} lightcap {precision} vs blip-base b{batch} throughput ratio"] = round(b[ms] / lc[ms], 1)
    for path in served_paths:
        for model in ("lightcap", "ucm-captioner"):
            for decode in ("beam", "greedy"):
                base = quality.get((model, path, "fp32", decode))
                bf = quality.get((model, path, "bf16", decode))
                if base and bf:
                    delta = {k: round(abs(bf[k] - base[k]), 4) for k in base}
                    out[f"{path}: {model} {decode}: bf16 vs fp32 CIDEr-D |delta|"] = delta
                    out[f"{path}: {model} {decode}: TARGET bf16 within 0.02"] = all(v <= 0.02 for v in delta.values())
    return out


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        "# Inference benchmark (bench/inference.py)",
        "",
        f"`{result['command']}` in {result['seconds']} s.",
        "",
        f"Machine: {m['cpu']}, {m['usable_cores']} usable of {m['logical_cores']} logical cores, native bf16: "
        f"{m['native_bf16']} (torch capability {m['torch_cpu_capability']}), device {m['device']}"
        + (f" ({m['gpu']})" if m.get("gpu") else "")
        + (f"; OpenMP spin: {m['openmp_spin']}" if m.get("openmp_spin") else "")
        + f"; torch {m['torch']}, transformers {m['transformers']}, Python {m['python']}; load average "
        f"{m['load_average_start']} at start, {result['load_average_end']} at the end (a shared machine: "
        "compare rows of this run with each other, as ratios). Peak RSS of the bench process "
        f"{result['peak_rss_mib']} MiB.",
        "",
        "Matmul peak (2048x2048): "
        + "; ".join(
            f"{t} thread(s): fp32 {v['fp32_gflops']} GFLOP/s wall, {v['fp32_gflop_per_cpu_s']} per CPU-second; "
            f"bf16 {v['bf16_gflops']} wall, {v['bf16_gflop_per_cpu_s']} per CPU-second"
            for t, v in result["matmul_peak"].items()
        ),
        "",
        "Columns: `ms/img` wall clock (median), `floor` = FLOPs / the fp32 matmul peak; `CPU ms/img` = process CPU "
        "time (all threads) per image, `CPU floor` = FLOPs / the matmul's FLOPs per CPU-second at the same thread "
        "count. On a shared, loaded machine the CPU columns are the trustworthy ones (preemption is not counted).",
        "",
        "Quality sets: " + "; ".join(f"`{k}`: {v}" for k, v in result["quality_sets"].items()) + ".",
        "",
        "## Targets",
        "",
    ]
    for k, v in result["summary"].items():
        lines.append(f"- {k}: {v}")
    lines += [
        "",
        "## Quality (CIDEr-D, batch 8)",
        "",
        "| model | path | precision | decode | test | unseen |",
        "|---|---|---|---|---:|---:|",
    ]
    for q in result["quality"]:
        lines.append(f"| {q['model']} | {q['path']} | {q['precision']} | {q['decode']} | {q.get('test')} | {q.get('unseen')} |")
    if result["identical_to_reference_fp32"]:
        lines += ["", "Captions identical to the reference fp32 path:", ""]
        for k, v in result["identical_to_reference_fp32"].items():
            lines.append(f"- {k}: {v['identical']}/{v['of']}")
    lines += [
        "",
        "## Speed",
        "",
        "| model | stage | path | precision | threads | batch | decode | ms/img | GFLOP/img | GFLOP/s | of fp32 peak | floor ms/img | CPU ms/img | CPU floor | CIDEr-D test | unseen |",
        "|---|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['model']} | {r['stage']} | {r['path']} | {r['precision']} | {r['threads']} | {r['batch']} | "
            f"{r['decode']} | {r['ms_per_image']} | {r['flops_per_image'] / 1e9:.3f} | {r['gflops_per_s']} | "
            f"{r['fraction_of_fp32_peak']} | {r['floor_ms_per_image']} | {r['cpu_ms_per_image']} | "
            f"{r['cpu_floor_ms_per_image']} | {r['cider_test'] or ''} | {r['cider_unseen'] or ''} |"
        )
    if result["blip"] and "error" in result["blip"][0]:
        lines += ["", f"Peer BLIP-base failed: {result['blip'][0]['error']}"]
    elif result["blip"]:
        lines += ["", "## Peer: BLIP-base (random init, 384 px, greedy 20 tokens)", "",
                  "| threads | batch | ms/img | CPU ms/img | img/s | GFLOP/img |", "|---:|---:|---:|---:|---:|---:|"]
        for b in result["blip"]:
            flops = "" if b["flops_per_image"] is None else f"{b['flops_per_image'] / 1e9:.1f}"
            lines.append(
                f"| {b['threads']} | {b['batch']} | {b['ms_per_image']} | {b['cpu_ms_per_image']} | {b['images_per_s']} | {flops} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
