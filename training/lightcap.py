"""``captioner train lightcap``: the LightCap student, distilled from LightCap teachers.

Also the shared machinery of ``captioner train lightcap-teacher`` (training/lightcap_teacher.py) and of
``captioner eval lightcap`` (training/eval_lightcap.py).

Pipeline of one run:

1. The concept extractor (store model ``concepts``, frozen: CLIP grid encoder + detector + aligner) runs once
   over every image of the dataset; the CLIP grids and top-K concepts are cached on disk
   (``--features-cache``, keyed by the dataset file and the extractor version), so teachers, students and
   evaluations of one dataset share them.
2. Teachers (student only, when any KD is on): ``kd.teacher_seeds`` picks the newest ``lightcap-teacher`` of
   this profile trained with each seed (or ``--teachers``). The student takes their tokenizer.
3. Training items: each training image ``samples_per_image`` times per epoch, each time with a caption drawn
   from its pool (its references; with ``kd.sequence`` also the teachers' beam-search captions), the draw a
   function of (seed, epoch, item) so a resumed run sees the same items.
4. Loss = ce_weight * CE (each head branch) + token_weight * KL(teacher_i || branch_i) (temperature tau)
   + hidden_weight * MSE(W h_s, h_t) + attention_weight * KL(attention maps), teachers in eval mode;
   forward passes optionally under bfloat16 autocast (``train.autocast``), losses in fp32.
5. AdamW, linear warm-up then cosine decay; per-epoch checkpoint (``--resume``), val loss, loss curve.
6. Captions of the val and test splits (the config's decoding) scored with pycocoevalcap; published with the
   teachers' and the extractor's versions in the manifest.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from captioning.config import load_config
from captioning.errors import ConfigError, PrerequisiteError, UsageError
from training.runner import TrainRun, add_common_args

log = logging.getLogger(__name__)

STAGE = "lightcap"
TEACHER_STAGE = "lightcap-teacher"
CONCEPTS = "concepts"
DEFAULT_FEATURES = Path("runs") / "lightcap-features"


# ---------------------------------------------------------------------------------------------- arguments
def add_lightcap_args(parser: argparse.ArgumentParser, *, student: bool) -> None:
    parser.add_argument("--concepts", default=None, help="concept extractor spec (default: newest `concepts` of the profile)")
    parser.add_argument(
        "--features-cache", type=Path, default=DEFAULT_FEATURES,
        help=f"where CLIP grids + concepts of a dataset are cached (default {DEFAULT_FEATURES})",
    )
    parser.add_argument("--name", default=TEACHER_STAGE if not student else STAGE, help="store name to publish as")
    if student:
        parser.add_argument(
            "--teachers", default=None,
            help="comma-separated lightcap-teacher specs (default: newest of the profile for each kd.teacher_seeds)",
        )
        parser.add_argument(
            "--teacher-store", type=Path, default=None,
            help="store holding the teachers when it is not --store (they are then recorded in the manifest's "
            "extra.teachers, not as store parents)",
        )


def add_arguments(parser: argparse.ArgumentParser, name: str | None = None) -> None:
    add_common_args(parser)
    add_lightcap_args(parser, student=True)


def run(args: argparse.Namespace) -> int:
    train_lightcap(args, role="student")
    return 0


# ---------------------------------------------------------------------------------------------- store helpers
def open_store(path: Path | None):
    from captioning.store import ModelStore

    return ModelStore(path)


def resolve_concepts(store, spec: str | None, profile: str):
    """The concept extractor version to use: ``spec``, or the newest ``concepts`` of ``profile``."""
    if spec:
        return store.resolve(spec)
    version = store.latest(CONCEPTS, profile)
    if version is None:
        raise PrerequisiteError(
            f"no `{CONCEPTS}` model of profile {profile!r} in {store.root}: run `captioner train concepts-align` first"
        )
    return version


def load_extractor(store, version):
    from captioning.inference import load_model

    extractor = load_model(store, version.spec, vision_runtime="torch")  # features as the defaults were trained on
    extractor.eval()
    return extractor


def resolve_teachers(store, specs: str | None, seeds: list[int], profile: str) -> list:
    if specs:
        return [store.resolve(s.strip()) for s in specs.split(",") if s.strip()]
    out = []
    known = store.list(TEACHER_STAGE) if TEACHER_STAGE in store.models() else []
    for seed in seeds:
        candidates = [
            v for v in known
            if v.profile == profile and (v.manifest.get("extra") or {}).get("seed") == int(seed)
        ]
        if not candidates:
            raise PrerequisiteError(
                f"no lightcap-teacher of profile {profile!r} trained with seed {seed} in {store.root}: run "
                f"`captioner train lightcap-teacher --profile {profile} --seed {seed}` first (or pass --teachers)"
            )
        out.append(max(candidates, key=lambda v: v.version))
    return out


# ---------------------------------------------------------------------------------------------- features
@dataclass
class Features:
    """Frozen inputs of every image of a dataset (row i <-> corpus.images[i])."""

    grid: torch.Tensor        # [N,C,h,w] float16 CLIP grids
    concept_ids: torch.Tensor  # [N,K] long, -1 = none
    scores: torch.Tensor       # [N,K] float

    def __len__(self) -> int:
        return self.grid.shape[0]


def features_key(corpus, concepts_version) -> str:
    source = Path(corpus.source) if corpus.source else Path(corpus.root)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
    tag = concepts_version.manifest.get("digest", "")[:16]
    return f"{corpus.name}-{digest}-{concepts_version.name}{concepts_version.version}-{tag}"


@torch.no_grad()
def compute_features(corpus, extractor, *, batch_size: int = 32, desc: str = "features") -> Features:
    from tqdm.auto import tqdm

    from captioning.data.images import load_image

    grids, ids, scores = [], [], []
    records = corpus.images
    quiet = os.environ.get("CAPTIONER_NO_PROGRESS") == "1"
    for start in tqdm(range(0, len(records), batch_size), desc=desc, disable=quiet):
        batch = torch.stack([extractor.preprocess(load_image(r.path)) for r in records[start : start + batch_size]])
        grid = extractor.grid(batch)
        concept_ids, concept_scores, _ = extractor.extract_tensors(batch, grid=grid)
        grids.append(grid.to(torch.float16).cpu())
        ids.append(concept_ids.cpu())
        scores.append(concept_scores.float().cpu())
    return Features(torch.cat(grids), torch.cat(ids), torch.cat(scores))


def load_features(corpus, extractor, concepts_version, cache_dir: Path | None) -> Features:
    """The cached features of ``corpus`` for this extractor version, computing (and caching) them if needed."""
    path = Path(cache_dir) / f"{features_key(corpus, concepts_version)}.pt" if cache_dir else None
    if path is not None and path.is_file():
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if payload["grid"].shape[0] == len(corpus.images):
            return Features(payload["grid"], payload["concept_ids"], payload["scores"])
    t0 = time.perf_counter()
    feats = compute_features(corpus, extractor)
    log.info("lightcap: features of %d images in %.1f s", len(feats), time.perf_counter() - t0)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"grid": feats.grid, "concept_ids": feats.concept_ids, "scores": feats.scores}, tmp)
        tmp.replace(path)
    return feats


# ---------------------------------------------------------------------------------------------- data
class CaptionItems(torch.utils.data.Dataset):
    """``samples_per_image`` items per image; item i of epoch e takes a caption drawn from its image's pool."""

    def __init__(self, rows: list[int], pools: dict[int, list[list[int]]], samples_per_image: int, seed: int):
        self.rows = list(rows)
        self.pools = pools
        self.samples = int(samples_per_image)
        self.seed = int(seed)
        self.epoch = 0
        empty = [r for r in self.rows if not pools.get(r)]
        if empty:
            raise UsageError(f"{len(empty)} training images have no caption (e.g. row {empty[0]})")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.rows) * self.samples

    def __getitem__(self, index: int) -> tuple[int, list[int]]:
        row = self.rows[index % len(self.rows)]
        pool = self.pools[row]
        pick = np.random.default_rng([self.seed, self.epoch, index]).integers(len(pool))
        return row, pool[int(pick)]


def collate_items(batch):
    return [row for row, _ in batch], [ids for _, ids in batch]


def pad_captions(captions: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(c) for c in captions)
    ids = torch.full((len(captions), T), pad_id, dtype=torch.long)
    for i, c in enumerate(captions):
        ids[i, : len(c)] = torch.tensor(c, dtype=torch.long)
    return ids, ids != pad_id


def teacher_forcing(ids: torch.Tensor, valid: torch.Tensor):
    """[CLS] w1 .. wn [SEP] -> inputs (drop last), targets (drop first), target validity."""
    return ids[:, :-1], valid[:, :-1], ids[:, 1:], valid[:, 1:]


# ---------------------------------------------------------------------------------------------- teachers
@dataclass
class Teacher:
    version: Any
    model: Any
    tokenizer: Any
    packer: Any
    concepts: Any  # ConceptInputs of every image, packed for this teacher


def load_teacher(version, extractor, features: Features, device) -> Teacher:
    from captioning.models.lightcap.captioner import ConceptPacker
    from captioning.models.lightcap.pipeline import load_captioner_folder

    model, tokenizer, _ = load_captioner_folder(version.path)
    model.requires_grad_(False)
    packer = ConceptPacker(
        extractor.vocab.words, extractor.vocab.embeddings, tokenizer,
        max_concepts=model.arch["max_concepts"], max_concept_tokens=model.arch["max_concept_tokens"],
    )
    return Teacher(version, model.to(device).eval(), tokenizer, packer, packer(features.concept_ids, features.scores))


@torch.no_grad()
def generate_rows(
    model, tokenizer, features: Features, concepts, rows: list[int], options, *, batch_size: int, device
) -> list[list[int]]:
    """Generated token ids (no [CLS]/[SEP]) for the given feature rows."""
    model.eval()
    out: list[list[int]] = []
    for start in range(0, len(rows), batch_size):
        idx = torch.tensor(rows[start : start + batch_size])
        hyps = model.generate(
            features.grid[idx].float().to(device), concepts.index(idx).to(device), options,
            bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
        )
        out.extend(h.tokens for h in hyps)
    return out


# ---------------------------------------------------------------------------------------------- evaluation
def caption_scores(corpus, rows: list[int], texts: list[str], *, meteor: bool = True) -> dict[str, float]:
    """pycocoevalcap scores (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D) of one caption per row.

    METEOR runs Java (several seconds per call); ``meteor=False`` leaves it out."""
    from captioning.data import tokenize
    from captioning.metrics import caption_metrics

    refs = {corpus.images[r].imgid: corpus.images[r].references for r in rows}
    cands = {corpus.images[r].imgid: " ".join(tokenize(t)) for r, t in zip(rows, texts, strict=True)}
    return caption_metrics(refs, cands, meteor=meteor)


def evaluate_split(
    model, tokenizer, corpus, features, concepts, split: str, options, *, batch_size: int, device, meteor: bool = True
):
    rows = corpus.split_indices(split)
    if not rows:
        return {}, []
    ids = generate_rows(model, tokenizer, features, concepts, rows, options, batch_size=batch_size, device=device)
    texts = [tokenizer.decode(t) for t in ids]
    return caption_scores(corpus, rows, texts, meteor=meteor), texts


@torch.no_grad()
def validation_loss(model, features, concepts, rows, pools, pad_id, *, batch_size, device) -> float:
    from captioning.models.lightcap.captioner import caption_loss

    model.eval()
    total, count = 0.0, 0
    items = [(r, c) for r in rows for c in pools[r]]
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        idx = torch.tensor([r for r, _ in chunk])
        ids, valid = pad_captions([c for _, c in chunk], pad_id)
        inp, inp_valid, tgt, tgt_valid = teacher_forcing(ids.to(device), valid.to(device))
        out = model(features.grid[idx].float().to(device), concepts.index(idx).to(device), inp, inp_valid)
        n = int(tgt_valid.sum())
        total += float(caption_loss(out.branch_logits, tgt, tgt_valid)) * n
        count += n
    return total / max(count, 1)


# ---------------------------------------------------------------------------------------------- training
def lr_lambda(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def train_lightcap(args: argparse.Namespace, *, role: str) -> Any:
    """Train a teacher (``role="teacher"``) or the student and publish it; returns the store version (or None)."""
    from captioning.data import load_dataset
    from captioning.models.lightcap.captioner import ConceptPacker, caption_loss
    from captioning.models.lightcap.distill import RepresentationDistiller, branch_token_kd_loss
    from captioning.models.lightcap.pipeline import build_captioner, make_tokenizer, save_captioner

    student = role == "student"
    stage = STAGE if student else TEACHER_STAGE
    config = load_config("lightcap", args.profile, path=args.config, overrides=args.set)
    model_cfg = config.model if student else config.teacher
    train_cfg, kd_cfg = config.train, config.kd
    run = TrainRun(stage, args, config)
    if getattr(args, "command_line", None):  # set by the ablation experiment: the equivalent stage command
        run.command = args.command_line
    device = run.device
    store = open_store(args.store)

    corpus = load_dataset(args.data)
    train_rows = corpus.split_indices("train")
    val_rows = corpus.split_indices("val")
    if not train_rows:
        raise UsageError(f"{args.data}: the dataset has no training images")
    concepts_version = resolve_concepts(store, args.concepts or config.concepts, run.profile)
    extractor = load_extractor(store, concepts_version)
    features = load_features(corpus, extractor, concepts_version, args.features_cache)

    # ---- teachers (student with any KD)
    use_token = student and kd_cfg.token
    use_hidden = student and kd_cfg.hidden
    use_attn = student and kd_cfg.attention
    use_seq = student and kd_cfg.sequence
    teachers: list[Teacher] = []
    teacher_store = None
    if use_token or use_hidden or use_attn or use_seq:
        teacher_store = open_store(args.teacher_store) if args.teacher_store else store
        versions = resolve_teachers(teacher_store, args.teachers, kd_cfg.teacher_seeds, run.profile)
        teachers = [load_teacher(v, extractor, features, device) for v in versions]
        for t in teachers:
            used = (t.version.manifest.get("extra") or {}).get("concepts")
            if used and used != {"name": concepts_version.name, "version": concepts_version.version}:
                log.warning("%s was trained on concepts %s, the student uses %s", t.version.spec, used, concepts_version.spec)
        for t in teachers[1:]:
            if not t.tokenizer.same_vocab(teachers[0].tokenizer):
                raise ConfigError(f"{t.version.spec} and {teachers[0].version.spec} have different tokenizers")

    # ---- tokenizer and model
    if teachers:
        tokenizer = teachers[0].tokenizer
    else:
        captions = [s.text for r in train_rows for s in corpus.images[r].sentences]
        tokenizer = make_tokenizer(config.tokenizer, model_cfg, captions)
    model = build_captioner(
        model_cfg, grid_channels=features.grid.shape[1], concept_dim=extractor.vocab.dim, tokenizer=tokenizer
    )
    packer = ConceptPacker(
        extractor.vocab.words, extractor.vocab.embeddings, tokenizer,
        max_concepts=model.arch["max_concepts"], max_concept_tokens=model.arch["max_concept_tokens"],
    )
    concepts = packer(features.concept_ids, features.scores)
    if (use_hidden or use_attn) and any(
        t.concepts.token_ids.shape[1] != concepts.token_ids.shape[1]
        or t.model.arch["use_concepts"] != model.arch["use_concepts"]
        for t in teachers
    ):
        raise ConfigError(
            "hidden/attention distillation needs teachers with the student's prefix layout "
            "(same use_concepts and max_concept_tokens)"
        )
    max_len = int(model.arch["max_caption_length"])
    pools: dict[int, list[list[int]]] = {
        r: [tokenizer.encode_caption(s.text, max_len) for s in corpus.images[r].sentences]
        for r in range(len(corpus.images))
    }

    # ---- sequence-level KD: the teachers' captions of the training images join the pools
    seq_info: dict[str, Any] = {}
    if use_seq:
        options = config.decoding.options(beam_size=kd_cfg.sequence_beam_size)
        cache = run.run_dir / "teacher_captions.json"
        key = [t.version.spec + ":" + t.version.manifest.get("digest", "") for t in teachers]
        cached = json.loads(cache.read_text()) if cache.is_file() else None
        if cached and cached.get("teachers") == key and cached.get("options") == options.to_dict():
            generated = cached["captions"]
        else:
            generated = []
            for t in teachers:
                log.info("lightcap: sequence-level KD: %s captions the training images", t.version.spec)
                generated.append(
                    generate_rows(t.model, tokenizer, features, t.concepts, train_rows, options,
                                  batch_size=config.eval.batch_size, device=device)
                )
            if run.is_main:
                cache.write_text(json.dumps({"teachers": key, "options": options.to_dict(), "captions": generated}))
        for per_teacher in generated:
            for r, tokens in zip(train_rows, per_teacher, strict=True):
                pools[r].append([tokenizer.bos_id, *tokens[: max_len - 2], tokenizer.eos_id])
        seq_info = {"teacher_captions": sum(len(g) for g in generated), "beam_size": options.beam_size}

    # ---- optimisation
    distiller = None
    if use_hidden or use_attn:
        distiller = RepresentationDistiller(
            model.fusion.hidden_size, model.fusion.num_layers,
            [(t.model.fusion.hidden_size, t.model.fusion.num_layers) for t in teachers],
        )
    model = run.wrap_model(model)
    core = getattr(model, "module", model)
    params = list(model.parameters()) + (list(distiller.parameters()) if distiller is not None else [])
    if distiller is not None:
        distiller.to(device)
    optimizer = torch.optim.AdamW(params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    items = CaptionItems(train_rows, pools, train_cfg.samples_per_image, run.seed)
    batch_size = train_cfg.batch_size
    epochs = train_cfg.epochs
    steps_per_epoch = math.ceil(len(items) / max(1, run.world_size) / batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(train_cfg.warmup_steps, epochs * steps_per_epoch))
    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler}
    if distiller is not None:
        state["distiller"] = distiller
    run.load_checkpoint(**state)

    temperature = kd_cfg.temperature
    smoothing = train_cfg.label_smoothing
    weights = {
        "ce": kd_cfg.ce_weight if student else 1.0,
        "token": kd_cfg.token_weight if use_token else 0.0,
        "hidden": kd_cfg.hidden_weight if use_hidden else 0.0,
        "attention": kd_cfg.attention_weight if use_attn else 0.0,
    }
    grid_all = features.grid
    amp = train_cfg.autocast  # None or "bfloat16" (the schema allows nothing else)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bfloat16")

    for epoch in run.epochs(epochs):
        model.train()
        items.set_epoch(epoch)
        loader = run.loader(items, batch_size=batch_size, shuffle=True, collate_fn=collate_items)
        for rows, caps in run.progress(loader, desc=f"{stage} epoch {epoch + 1}/{epochs}", total=len(loader)):
            idx = torch.tensor(rows)
            ids, valid = pad_captions(caps, tokenizer.pad_id)
            inp, inp_valid, tgt, tgt_valid = teacher_forcing(ids.to(device), valid.to(device))
            grid = grid_all[idx].float().to(device)
            with autocast():
                out = model(
                    grid, concepts.index(idx).to(device), inp, inp_valid,
                    output_hidden_states=use_hidden, output_attentions=use_attn,
                )
                t_outs = []
                if teachers and (use_token or use_hidden or use_attn):
                    with torch.no_grad():
                        t_outs = [
                            t.model(grid, t.concepts.index(idx).to(device), inp, inp_valid,
                                    output_hidden_states=use_hidden, output_attentions=use_attn)
                            for t in teachers
                        ]
            # losses in fp32 (the forward passes may have run in bfloat16)
            losses = {"ce": caption_loss(out.branch_logits.float(), tgt, tgt_valid, smoothing)}
            if use_token:
                losses["token"] = branch_token_kd_loss(
                    out.branch_logits.float(), [o.branch_logits[0].float() for o in t_outs], tgt_valid, temperature
                )
            if use_hidden:
                losses["hidden"] = distiller.hidden_loss(
                    [h.float() for h in out.hidden_states], [[h.float() for h in o.hidden_states] for o in t_outs],
                    out.sequence_valid,
                )
            if use_attn:
                losses["attention"] = distiller.attention_loss(
                    [a.float() for a in out.attentions], [[a.float() for a in o.attentions] for o in t_outs],
                    out.sequence_valid,
                )
            loss = sum(weights[k] * v for k, v in losses.items())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, train_cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            run.log_step(loss=float(loss.detach()), **{k: float(v.detach()) for k, v in losses.items()})
        val = validation_loss(
            core, features, concepts, val_rows, pools, tokenizer.pad_id, batch_size=64, device=device
        ) if val_rows else math.nan
        run.end_epoch(extra={"val_loss": val}, **state)

    # ---- evaluation, files, publish
    options = config.decoding.options()
    metrics: dict[str, Any] = {
        "parameters": core.num_parameters(),
        "vocab_size": tokenizer.vocab_size,
        "val_loss": run.history[-1]["val_loss"] if run.history else math.nan,
        "decoding": options.to_dict(),
    }
    examples = {}
    for split in ("val", "test"):
        scores, texts = evaluate_split(
            core, tokenizer, corpus, features, concepts, split, options,
            batch_size=config.eval.batch_size, device=device,
            meteor=split == "test" and config.eval.meteor,
        )
        metrics.update({f"{split}_{k}": v for k, v in scores.items()})
        rows = corpus.split_indices(split)
        examples[split] = [
            {"imgid": corpus.images[r].imgid, "caption": t, "references": corpus.images[r].references[:2]}
            for r, t in list(zip(rows, texts, strict=True))[:5]
        ]
    log.info("%s: %s", stage, {k: v for k, v in metrics.items() if k.startswith("test_")})

    parents = [{"name": concepts_version.name, "version": concepts_version.version}]
    teacher_records = [
        {"name": t.version.name, "version": t.version.version, "digest": t.version.manifest.get("digest"),
         "seed": (t.version.manifest.get("extra") or {}).get("seed"), "store": str(teacher_store.root)}
        for t in teachers
    ]
    if teachers and teacher_store is not None and Path(teacher_store.root).resolve() == Path(store.root).resolve():
        parents += [{"name": t.version.name, "version": t.version.version} for t in teachers]
    version = None
    if run.is_main:
        staging = run.run_dir / "export"
        if staging.exists():
            import shutil

            shutil.rmtree(staging)
        save_captioner(staging, core, tokenizer, dtype=config.weights_dtype, decoding=config.decoding)
        run.plot_loss(staging / "loss_curve.png", keys=("loss", "val_loss"))
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=1))
        (staging / "examples.json").write_text(json.dumps(examples, indent=1))
        version = run.publish(
            args.name, staging, task=stage, metrics=metrics, data=corpus.manifest_record(), parents=parents,
            extra={"concepts": {"name": concepts_version.name, "version": concepts_version.version},
                   "teachers": teacher_records, "sequence_kd": seq_info, "role": role},
        )
    run.close()
    return version

