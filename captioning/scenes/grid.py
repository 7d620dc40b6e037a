"""The tile grid over a scene: overlapping windows that cover every pixel, edges included.

Along each axis tiles start every ``stride = size - overlap`` pixels from 0; when the last regular tile
stops short of the edge, one more tile is added that *ends exactly at the edge* (it overlaps its
neighbour more than ``overlap``), so nothing is padded beyond the scene and no pixel is left out. An axis
shorter than one tile gets a single, shorter window (the reader pads it to the tile size with nodata).
All sizes are in scene (source) pixels.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from captioning.errors import SceneError


@dataclass(frozen=True)
class Tile:
    """One window of the grid, in scene pixels; ``index`` is its row-major number in the plan."""

    index: int
    row: int
    col: int
    x: int
    y: int
    w: int
    h: int

    @property
    def bounds(self) -> tuple[int, int, int, int]:
        return self.x, self.y, self.x + self.w, self.y + self.h


def axis_starts(length: int, size: int, stride: int) -> list[int]:
    """Start offsets of the windows along one axis of ``length`` pixels (see the module docstring)."""
    if length <= size:
        return [0]
    starts = list(range(0, length - size + 1, stride))
    if starts[-1] + size < length:
        starts.append(length - size)
    return starts


class TileGrid:
    """``TileGrid(width, height, size, overlap)``: ``tiles`` in row-major order, ``rows`` x ``cols``."""

    def __init__(self, width: int, height: int, size: int, overlap: int):
        for name, v in (("width", width), ("height", height), ("size", size)):
            if not isinstance(v, int) or v < 1:
                raise SceneError(f"tile grid: {name} must be a positive integer, got {v!r}")
        if not isinstance(overlap, int) or not 0 <= overlap < size:
            raise SceneError(f"tile grid: overlap must be an integer from 0 to size - 1 ({size - 1}), got {overlap!r}")
        self.width, self.height, self.size, self.overlap = width, height, size, overlap
        self.stride = size - overlap
        self.xs = axis_starts(width, size, self.stride)
        self.ys = axis_starts(height, size, self.stride)
        self.rows, self.cols = len(self.ys), len(self.xs)
        w, h = min(size, width), min(size, height)
        self.tiles = [
            Tile(r * self.cols + c, r, c, x, y, w, h) for r, y in enumerate(self.ys) for c, x in enumerate(self.xs)
        ]

    def __len__(self) -> int:
        return len(self.tiles)

    def __iter__(self):
        return iter(self.tiles)

    def __getitem__(self, index: int) -> Tile:
        return self.tiles[index]

    def inner_edges(self, tile: Tile) -> tuple[bool, bool, bool, bool]:
        """(left, top, right, bottom): whether that side of the tile lies inside the scene (another tile
        continues there), so an object touching it may be cut."""
        return tile.x > 0, tile.y > 0, tile.x + tile.w < self.width, tile.y + tile.h < self.height

    def neighbours(self, tile: Tile) -> list[Tile]:
        out = []
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                r, c = tile.row + dr, tile.col + dc
                if (dr or dc) and 0 <= r < self.rows and 0 <= c < self.cols:
                    out.append(self.tiles[r * self.cols + c])
        return out

    def cell_shape(self) -> tuple[int, int]:
        """(rows, cols) of the coverage raster: one cell per ``stride`` pixels (the last may be partial)."""
        return -(-self.height // self.stride), -(-self.width // self.stride)

    def cell_tile(self, cell_row: int, cell_col: int) -> Tile:
        """The tile that stands for coverage cell ``(cell_row, cell_col)``: the one whose window holds the
        cell's centre and starts last (the shifted edge tile for the last cells)."""
        cy = min((cell_row + 0.5) * self.stride, self.height - 0.5)
        cx = min((cell_col + 0.5) * self.stride, self.width - 0.5)
        r = bisect.bisect_right(self.ys, cy) - 1
        c = bisect.bisect_right(self.xs, cx) - 1
        return self.tiles[r * self.cols + c]
