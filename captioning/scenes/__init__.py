"""Scenes: labels, object instances and captions over GeoTIFFs of any size, tile by tile, with georeferenced
outputs (docs/scenes.md).

Public API:

* ``SceneReader(path, bands=None, target_gsd=None)`` - windowed, scaled, masked 8-bit RGB reads; ``.info()``;
* ``TileGrid(width, height, size, overlap)`` / ``Tile`` - the overlapping grid that covers every pixel;
* ``SceneParams`` / ``SceneJob(input_path, out_dir, params, restart=False)`` - the plan and the durable record:
  ``.tiles()``, ``.pending()``, ``.read(tile) -> PIL | None``, ``.record(tile, result)``, ``.record_many(pairs)``,
  ``.finish(crs=None) -> SceneOutputs``, ``.total``, ``.done``, ``.complete``, ``.warnings``, ``.close()``;
* ``TileResult(probabilities, threshold, instances, caption)`` / ``Instance(concept, score, box, label)``: what an
  ``infer(images) -> list[TileResult]`` callable returns (boxes in the tile image's pixels);
* ``run_scene(job, infer, batch_size=16, progress=None, should_stop=None)`` - the loop the CLI uses;
  (the models are the service's: ``service.scenes`` turns its records into ``TileResult``s, through its pools
  for ``POST /v1/scenes`` and through ``service.offline.Engine`` for ``captioner scene``);
* ``merge_instances`` - fragment merge + per-concept NMS in scene pixels.
"""

from captioning.errors import SceneError
from captioning.scenes.grid import Tile, TileGrid
from captioning.scenes.job import UCM_GSD, Instance, SceneJob, SceneParams, TileResult, run_scene
from captioning.scenes.merge import merge_instances
from captioning.scenes.outputs import SceneOutputs
from captioning.scenes.reader import SceneInfo, SceneReader

__all__ = [
    "UCM_GSD",
    "Instance",
    "SceneError",
    "SceneInfo",
    "SceneJob",
    "SceneOutputs",
    "SceneParams",
    "SceneReader",
    "Tile",
    "TileGrid",
    "TileResult",
    "merge_instances",
    "run_scene",
]
