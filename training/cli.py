"""``captioner train <stage>``, ``captioner eval <target>`` and ``captioner experiment <name>``.

Each stage / evaluator / experiment is a module with ``add_arguments(parser[, name])`` and
``run(args) -> int``; the tables below map command names to modules. A module is imported only when its own
command runs (``captioner train lightcap`` imports ``training.lightcap`` and nothing else of ``training``): the
top-level parser leaves the target's arguments to it (``deferred_args``, captioning/cli.py), so ``captioner
serve`` or ``captioner store list`` never import training code and what it pulls in (torchvision's ops, tqdm,
the datasets).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.util

STAGES: dict[str, tuple[str, str]] = {
    # name: (module, help)
    "ucm-text-ae": ("training.ucm_text_ae", "UCM stage 1: LSTM text autoencoder"),
    "ucm-classifier": ("training.ucm_classifier", "UCM stage 2: ResNet multi-label classifier (17 labels)"),
    "ucm-distill": ("training.ucm_distill", "UCM stage 3: cross-modal distillation of text codes into the image encoder"),
    "ucm-captioner": ("training.ucm_captioner", "UCM stage 4: image encoder + text decoder captioner"),
    "clip": ("training.clip", "LightCap: contrastive CLIP image/text towers (tiny profile)"),
    "concepts-detector": ("training.concepts_detector", "LightCap: class-agnostic YOLOv5n foreground detector"),
    "concepts-align": ("training.concepts_align", "LightCap: ROIAlign region-to-concept alignment"),
    "lightcap-teacher": ("training.lightcap_teacher", "LightCap: a teacher captioner (larger fusion module)"),
    "lightcap": ("training.lightcap", "LightCap: the distilled student captioner"),
}

EVALUATORS: dict[str, tuple[str, str]] = {
    "ucm-captioner": ("training.eval_ucm", "caption metrics of the UCM captioner (+ nearest-neighbour baseline)"),
    "ucm-classifier": ("training.eval_ucm", "multi-label F1 / precision / recall of the UCM classifier"),
    "concepts": ("training.eval_concepts", "box recall / AP and concept P/R/F1 of the concept extractor"),
    "lightcap": ("training.eval_lightcap", "caption metrics of LightCap"),
}

EXPERIMENTS: dict[str, tuple[str, str]] = {
    "ucm-distill-lr": ("training.experiments.ucm_distill_lr", "seed 000's three-way distillation experiment + decoding table"),
    "lightcap-ablation": ("training.experiments.lightcap_ablation", "LightCap teachers / KD / ensemble / concepts / modulator table"),
}


TABLES = {"train": STAGES, "eval": EVALUATORS, "experiment": EXPERIMENTS}


def _add_table(subparsers, command: str, help_text: str, table: dict[str, tuple[str, str]]) -> None:
    parser = subparsers.add_parser(command, help=help_text, description=help_text)
    inner = parser.add_subparsers(dest="target", metavar="TARGET", required=True)
    for name, (module_name, help_line) in table.items():
        if importlib.util.find_spec(module_name) is None:
            continue  # not implemented in this checkout
        # its arguments (and --help) are the module's: parsed by _run_target once this target is chosen
        sub = inner.add_parser(name, help=help_line, description=help_line, add_help=False)
        sub.set_defaults(func=functools.partial(_run_target, command, name), target=name, deferred_args=[])


def _run_target(command: str, name: str, args: argparse.Namespace) -> int:
    """Import the target's module, parse its own arguments (``args.deferred_args``) and run it."""
    module_name, help_line = TABLES[command][name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"captioner {command} {name}", description=help_line)
    module.add_arguments(parser, name) if _takes_name(module.add_arguments) else module.add_arguments(parser)
    full = parser.parse_args(args.deferred_args)
    for key, value in vars(args).items():  # the top-level flags (-v) and the command's words
        if key not in ("func", "deferred_args") and not hasattr(full, key):
            setattr(full, key, value)
    return module.run(full)


def _takes_name(func) -> bool:
    import inspect

    return len(inspect.signature(func).parameters) >= 2


def register(subparsers: argparse._SubParsersAction) -> None:
    _add_table(subparsers, "train", "run an offline training stage and publish to the model store", STAGES)
    _add_table(subparsers, "eval", "evaluate a published model on a dataset split", EVALUATORS)
    _add_table(subparsers, "experiment", "run a documented experiment and print its table", EXPERIMENTS)
