"""``captioner train lightcap-teacher``: one LightCap teacher (the config's ``teacher`` section).

Same family and pipeline as the student (training/lightcap.py): concept extractor features, prefix-LM BERT
fusion, ensemble head code path with one branch -- only a larger fusion module (more layers, wider). The
paper trains three teachers that differ by their initialisation: run this with ``--seed 1``, ``--seed 2``,
``--seed 3``; the student finds them by seed (``kd.teacher_seeds``). Teachers are trained with
cross-entropy only and published as ``lightcap-teacher`` (not served; the student lists them).
"""

from __future__ import annotations

import argparse

from training.lightcap import add_lightcap_args, train_lightcap
from training.runner import add_common_args


def add_arguments(parser: argparse.ArgumentParser, name: str | None = None) -> None:
    add_common_args(parser)
    add_lightcap_args(parser, student=False)


def run(args: argparse.Namespace) -> int:
    train_lightcap(args, role="teacher")
    return 0
