"""Merge object instances found tile by tile into one set for the scene (in scene pixels).

Two tiles overlap by ``overlap`` pixels, so an object near a shared edge is seen twice: whole in both
(two near-identical boxes), or cut by a tile's edge in one and whole in the other, or cut in both when it
is larger than the overlap. Two passes, per concept word:

1. **fragments**: a box that touches an *inner* edge of its tile (a side where another tile continues) may
   be a cut piece. It is joined with every box of the same concept from a neighbouring tile whose
   intersection covers at least ``merge_ios`` of the smaller box (intersection over smaller); a joined
   group becomes one box (their union) with the best score;
2. **duplicates**: ``torchvision.ops.batched_nms`` in scene space with ``nms_iou``, one class per concept.

Boxes that touch no inner edge and do not overlap another tile's box pass unchanged.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from captioning.scenes.grid import TileGrid


def _find(parent: list[int], i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def merge_instances(
    boxes: np.ndarray,
    scores: np.ndarray,
    concepts: np.ndarray,
    tiles: np.ndarray,
    grid: TileGrid,
    *,
    nms_iou: float = 0.5,
    merge_ios: float = 0.5,
    edge_px: float = 3.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``boxes [N,4]`` (x1, y1, x2, y2 in scene pixels), ``scores [N]``, ``concepts [N]`` (int ids), ``tiles [N]``
    (tile index each came from) -> (boxes [M,4], scores [M], concepts [M], members [M]: how many tile boxes
    each kept box stands for)."""
    from torchvision.ops import batched_nms

    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    concepts = np.asarray(concepts, dtype=np.int64).reshape(-1)
    tiles = np.asarray(tiles, dtype=np.int64).reshape(-1)
    n = len(boxes)
    if n == 0:
        return boxes, scores, concepts, np.zeros(0, dtype=np.int64)

    # 1. fragments
    by_tile: dict[int, list[int]] = defaultdict(list)
    for i, t in enumerate(tiles.tolist()):
        by_tile[t].append(i)
    cut = np.zeros(n, dtype=bool)
    for t, idx in by_tile.items():
        tile = grid[t]
        left, top, right, bottom = grid.inner_edges(tile)
        b = boxes[idx]
        cut[idx] = (
            (left & (b[:, 0] <= tile.x + edge_px))
            | (top & (b[:, 1] <= tile.y + edge_px))
            | (right & (b[:, 2] >= tile.x + tile.w - edge_px))
            | (bottom & (b[:, 3] >= tile.y + tile.h - edge_px))
        )
    parent = list(range(n))
    for t, idx in by_tile.items():
        mine = [i for i in idx if cut[i]]
        if not mine:
            continue
        others = [j for nb in grid.neighbours(grid[t]) for j in by_tile.get(nb.index, ())]
        if not others:
            continue
        a, b = boxes[mine], boxes[others]
        ix = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
        iy = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
        inter = ix * iy
        area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
        area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
        smaller = np.maximum(np.minimum(area_a[:, None], area_b[None, :]), 1e-9)
        same = concepts[mine][:, None] == concepts[others][None, :]
        for p, q in zip(*np.nonzero(same & (inter / smaller >= merge_ios)), strict=True):
            ri, rj = _find(parent, mine[p]), _find(parent, others[q])
            if ri != rj:
                parent[rj] = ri
    groups: dict[int, list[int]] = defaultdict(list)
    for i in range(n):
        groups[_find(parent, i)].append(i)
    merged_boxes, merged_scores, merged_concepts, members = [], [], [], []
    for idx in groups.values():
        g = boxes[idx]
        merged_boxes.append([g[:, 0].min(), g[:, 1].min(), g[:, 2].max(), g[:, 3].max()])
        merged_scores.append(scores[idx].max())
        merged_concepts.append(concepts[idx[0]])
        members.append(len(idx))
    mb = np.asarray(merged_boxes, dtype=np.float64)
    ms = np.asarray(merged_scores, dtype=np.float64)
    mc = np.asarray(merged_concepts, dtype=np.int64)
    mm = np.asarray(members, dtype=np.int64)

    # 2. duplicates
    keep = batched_nms(
        torch.from_numpy(mb).float(), torch.from_numpy(ms).float(), torch.from_numpy(mc), float(nms_iou)
    ).numpy()
    keep = np.sort(keep)
    return mb[keep], ms[keep], mc[keep], mm[keep]
