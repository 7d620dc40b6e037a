"""captioning.scenes without models: grid coverage, reader on awkward files, resumable records, merging
across tile edges, output coordinates and files (an oracle ``infer`` built from the mosaic's truth)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from captioning.data.synth.mosaic import load_truth, write_mosaic
from captioning.errors import SceneError
from captioning.scenes import (
    Instance,
    SceneJob,
    SceneParams,
    SceneReader,
    TileGrid,
    TileResult,
    merge_instances,
    run_scene,
)

LABELS3 = ["a", "b", "c"]


@pytest.fixture(scope="module")
def mosaic(tmp_path_factory):
    """900 x 650 px (not multiples of the 256 tile), seed 4242, 4 regions with airplanes/tanks/cars."""
    path = tmp_path_factory.mktemp("mosaic") / "m.tif"
    write_mosaic(path, 900, 650, 4242, classes=["airplane", "storagetanks", "parkinglot"], block=1)
    return path


def fake_infer(images):
    """Deterministic per-picture 'labels' from its mean colour; no objects."""
    out = []
    for im in images:
        m = np.asarray(im, dtype=np.float32).mean(axis=(0, 1)) / 255.0
        out.append(TileResult(dict(zip(LABELS3, m.tolist(), strict=True)), 0.4))
    return out


# ------------------------------------------------------------------------------------ grid


@pytest.mark.parametrize(
    "width,height,size,overlap",
    [(1000, 700, 256, 32), (255, 300, 256, 32), (256, 256, 256, 0), (257, 513, 256, 32), (5000, 37, 512, 100)],
)
def test_grid_covers_every_pixel_without_leaving_the_scene(width, height, size, overlap):
    grid = TileGrid(width, height, size, overlap)
    hits = np.zeros((height, width), dtype=np.int32)
    for t in grid:
        assert 0 <= t.x and t.x + t.w <= width and 0 <= t.y and t.y + t.h <= height
        assert t.w == min(size, width) and t.h == min(size, height)
        hits[t.y : t.y + t.h, t.x : t.x + t.w] += 1
    assert hits.min() >= 1
    assert grid.xs[-1] + min(size, width) == width and grid.ys[-1] + min(size, height) == height
    assert all(b - a <= size - overlap for a, b in zip(grid.xs, grid.xs[1:], strict=False))
    rows, cols = grid.cell_shape()
    assert rows * grid.stride >= height and cols * grid.stride >= width


def test_grid_rejects_bad_sizes():
    with pytest.raises(SceneError, match="overlap"):
        TileGrid(100, 100, 64, 64)
    with pytest.raises(SceneError, match="width"):
        TileGrid(0, 100, 64, 0)


# ------------------------------------------------------------------------------------ reader


def test_reader_keeps_crs_transform_and_gsd(mosaic):
    with SceneReader(mosaic, target_gsd=0.3) as r:
        info = r.info()
        assert info.crs == "EPSG:32633" and info.gsd == pytest.approx(0.3) and info.zoom == 1.0
        assert info.transform[:3] == (0.3, 0.0, 500000.0) and info.overviews == [2]
        assert info.bands == (1, 2, 3) and info.scaling is None and info.warnings == []
        rgb, valid = r.read(100, 50, 256, 256, 256, 256)
        with rasterio.open(mosaic) as ds:
            ref = ds.read(window=((50, 306), (100, 356)))
        assert valid.all() and np.array_equal(rgb, ref.transpose(1, 2, 0))
    with SceneReader(mosaic, target_gsd=0.6) as r:  # coarser models: 2 scene pixels a model pixel
        assert r.zoom == pytest.approx(2.0)


def _write(path, data, **profile):
    base = {"driver": "GTiff", "width": data.shape[2], "height": data.shape[1], "count": data.shape[0],
            "dtype": data.dtype.name}  # fmt: skip
    base.update(profile)
    with rasterio.open(path, "w", **base) as dst:
        dst.write(data)
    return path


@pytest.fixture(scope="module")
def pixels(mosaic):
    with rasterio.open(mosaic) as ds:
        return ds.read(), ds.transform, ds.crs


def test_non_georeferenced_scene_is_processed_in_pixels_with_a_warning(tmp_path, pixels):
    data, _, _ = pixels
    path = _write(tmp_path / "plain.tif", data)
    job = SceneJob(path, tmp_path / "out", SceneParams(tile=256, overlap=32))
    assert any("not georeferenced" in w for w in job.warnings) and job.zoom == 1.0
    outputs = run_scene(job, fake_infer)
    doc = json.loads(outputs.geojson.read_text())
    assert "crs" not in doc and outputs.summary["output_crs"] is None
    assert any("pixel coordinates" in w for w in outputs.summary["warnings"])
    first = doc["features"][0]["geometry"]["coordinates"][0]
    assert first[0] == [0, 0] and max(p[1] for p in first) == 256  # pixels, y down
    with pytest.raises(SceneError, match="not georeferenced"):
        job.finish(crs="EPSG:4326")
    job.close()


def test_one_band_is_read_as_grey(tmp_path, pixels):
    data, transform, crs = pixels
    path = _write(tmp_path / "grey.tif", data[:1], crs=crs, transform=transform)
    with SceneReader(path, target_gsd=0.3) as r:
        assert r.bands == (1,) and any("read as grey" in w for w in r.warnings)
        rgb, _ = r.read(0, 0, 64, 64, 64, 64)
        assert rgb.shape == (64, 64, 3) and np.array_equal(rgb[..., 0], rgb[..., 2])
        assert np.array_equal(rgb[..., 0], data[0, :64, :64])


def test_sixteen_bit_is_stretched_with_scene_statistics(tmp_path, pixels):
    data, transform, crs = pixels
    wide = (data.astype(np.uint16) * 40 + 1000).astype(np.uint16)  # values 1,000..11,200
    path = _write(tmp_path / "u16.tif", wide, crs=crs, transform=transform)
    with SceneReader(path, target_gsd=0.3) as r:
        assert r.scaling is not None and any("stretched to 8 bits" in w for w in r.warnings)
        a, _ = r.read(0, 0, 256, 256, 256, 256)
        b, _ = r.read(600, 300, 256, 256, 256, 256)
        assert a.dtype == np.uint8 and a.max() > 200 and a.min() < 60
        # the same scaling everywhere: a pixel's 8-bit value depends only on its 16-bit value
        lo, hi = r.scaling[0]
        expect = np.clip((wide[0, 300:556, 600:856].astype(np.float32) - lo) * 255 / (hi - lo), 0, 255)
        assert np.abs(b[..., 0].astype(np.float32) - expect).max() <= 1.0


def test_four_bands(tmp_path, pixels):
    data, transform, crs = pixels
    nir = np.full((1, *data.shape[1:]), 77, dtype=np.uint8)
    path = _write(tmp_path / "rgbn.tif", np.concatenate([data, nir]), crs=crs, transform=transform,
                  photometric="minisblack")  # fmt: skip
    with SceneReader(path) as r:  # no colour interpretation: bands 1-3, with a warning
        assert r.bands == (1, 2, 3) and any("4 bands" in w for w in r.warnings)
    with SceneReader(path, bands=(4, 1, 2)) as r:
        rgb, _ = r.read(0, 0, 8, 8, 8, 8)
        assert (rgb[..., 0] == 77).all()
    with pytest.raises(SceneError, match=r"band\(s\) \[5\] do not exist"):
        SceneReader(path, bands=(5, 1, 2))
    alpha = np.full((1, *data.shape[1:]), 255, dtype=np.uint8)
    alpha[0, :, :300] = 0
    path = _write(tmp_path / "rgba.tif", np.concatenate([data, alpha]), crs=crs, transform=transform,
                  photometric="rgb", ALPHA="YES")  # fmt: skip
    with SceneReader(path) as r:  # alpha: part of the mask, not a colour band
        assert r.bands == (1, 2, 3) and r.masked and r.warnings == []
        _, valid = r.read(0, 0, 600, 10, 600, 10)
        assert not valid[:, :300].any() and valid[:, 300:].all()


def test_nodata_heavy_scene_skips_empty_tiles(tmp_path, pixels):
    data, transform, crs = pixels
    holey = data.copy()
    holey[:, :, :] = np.maximum(holey, 1)
    holey[:, :, 260:] = 0  # right part: nodata
    holey[:, 400:, :] = 0
    path = _write(tmp_path / "holes.tif", holey, crs=crs, transform=transform, nodata=0)
    job = SceneJob(path, tmp_path / "out", SceneParams(tile=128, overlap=16))
    outputs = run_scene(job, fake_infer)
    tiles = outputs.summary["tiles"]
    assert tiles["skipped_nodata"] > tiles["processed"] > 0
    feats = json.loads(outputs.geojson.read_text())["features"]
    assert len(feats) == tiles["processed"]
    assert all(f["properties"]["valid"] > 0 for f in feats)
    for f in feats:  # no processed tile lies wholly in the nodata part
        t = job.grid[f["properties"]["tile"]]
        assert t.x < 260 and t.y < 400
    with rasterio.open(outputs.coverage) as cov:
        band = cov.read(1)
        assert (band == -1).any() and (band >= 0).any() and cov.nodata == -1
    job.close()


@pytest.mark.parametrize("what", ["random", "truncated", "empty", "folder", "missing"])
def test_unreadable_inputs_raise_scene_error_naming_the_file(tmp_path, mosaic, what):
    path = tmp_path / "bad.tif"
    if what == "random":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    elif what == "truncated":
        raw = mosaic.read_bytes()
        path.write_bytes(raw[: len(raw) // 3])
    elif what == "empty":
        path.write_bytes(b"")
    elif what == "folder":
        path.mkdir()
    with pytest.raises(SceneError) as err:
        job = SceneJob(path, tmp_path / "out", SceneParams())
        run_scene(job, fake_infer)
    assert str(path) in str(err.value)
    assert any(word in str(err.value) for word in ("not a readable raster", "damaged", "no such file", "folder"))


def test_geographic_crs_gsd_is_approximated(tmp_path, pixels):
    data, _, _ = pixels
    deg = 0.3 / 111_320  # about 0.3 m at the equator
    path = _write(tmp_path / "wgs.tif", data, crs="EPSG:4326", transform=from_origin(10.0, 0.01, deg, deg))
    with SceneReader(path, target_gsd=0.3) as r:
        assert r.gsd == pytest.approx(0.3, rel=0.01) and r.gsd_source.startswith("approximate")
        assert any("approximated" in w for w in r.warnings)


def test_finer_scene_is_resampled_to_the_target_gsd(tmp_path, pixels):
    data, _, crs = pixels
    path = _write(tmp_path / "fine.tif", data, crs=crs, transform=from_origin(500000, 5000000, 0.15, 0.15))
    job = SceneJob(path, tmp_path / "out", SceneParams(tile=128, overlap=16, target_gsd=0.3))
    assert job.zoom == pytest.approx(2.0) and job.grid.size == 256 and job.grid.overlap == 32
    image = job.read(job.tiles()[0])
    assert image.size == (128, 128)
    job.close()
    coarse = _write(tmp_path / "coarse.tif", data, crs=crs, transform=from_origin(500000, 5000000, 2.0, 2.0))
    with SceneReader(coarse, target_gsd=0.3) as r:
        assert r.zoom == pytest.approx(0.15) and any("much coarser" in w for w in r.warnings)


# ------------------------------------------------------------------------------------ resume


def test_restart_mid_scene_resumes_without_duplicate_or_lost_tiles(tmp_path, mosaic):
    out = tmp_path / "out"
    params = SceneParams(tile=128, overlap=16, models=("fake@1",))
    calls = {"n": 0}

    def crashing(images):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("killed")
        return fake_infer(images)

    job = SceneJob(mosaic, out, params)
    total = job.total
    with pytest.raises(RuntimeError, match="killed"):
        run_scene(job, crashing, batch_size=5)
    job.close()
    with open(out / "tiles.jsonl", "ab") as f:  # a crash mid-write leaves a torn line
        f.write(b'{"i": 999, "valid": 0.5, "probab')
    job = SceneJob(mosaic, out, params)
    assert job.done == 15 and len(job.pending()) == total - 15
    assert job.pending()[0].index == 15
    run_scene(job, fake_infer, batch_size=7, finish=False)
    job.record(job.tiles()[3], None)  # a replayed record is ignored
    job.close()
    lines = (out / "tiles.jsonl").read_text().splitlines()
    indices = [json.loads(line)["i"] for line in lines]
    assert sorted(indices) == list(range(total))
    job = SceneJob(mosaic, out, params)
    assert job.complete and job.pending() == []
    outputs = job.finish()
    assert outputs.summary["tiles"]["processed"] == total
    job.close()
    with pytest.raises(SceneError, match="another params"):
        SceneJob(mosaic, out, SceneParams(tile=128, overlap=8, models=("fake@1",)))
    with pytest.raises(SceneError, match="another params"):
        SceneJob(mosaic, out, SceneParams(tile=128, overlap=16, models=("fake@2",)))
    job = SceneJob(mosaic, out, SceneParams(tile=128, overlap=8), restart=True)
    assert job.done == 0
    job.close()


def test_finish_refuses_an_unfinished_job(tmp_path, mosaic):
    job = SceneJob(mosaic, tmp_path / "out", SceneParams())
    with pytest.raises(SceneError, match="not processed yet"):
        job.finish()
    job.close()


# ------------------------------------------------------------------------------------ merging


def test_merge_joins_pieces_cut_by_a_tile_edge_and_drops_duplicates():
    grid = TileGrid(480, 256, 256, 32)  # tiles at x 0 and 224 (overlap 224..256)
    boxes = np.array([
        [200, 10, 256, 40],   # tile 0: a car cut by its right edge
        [224, 10, 250, 40],   # tile 1: the same car's other piece, cut by its left edge
        [230, 100, 250, 120],  # tile 0: a car wholly in the overlap
        [230.5, 100, 250, 120.5],  # tile 1: the same car
        [100, 100, 120, 120],  # tile 0: another car
        [300, 100, 320, 120],  # tile 1: another car
        [230, 200, 250, 220],  # tile 0: a tank in the overlap
        [231, 200, 251, 220],  # tile 1: the same tank
    ], dtype=np.float64)  # fmt: skip
    concepts = np.array([0, 0, 0, 0, 0, 0, 1, 1])
    tiles = np.array([0, 1, 0, 1, 0, 1, 0, 1])
    scores = np.linspace(0.9, 0.5, len(boxes))
    mb, ms, mc, mm = merge_instances(boxes, scores, concepts, tiles, grid)
    assert (mc == 0).sum() == 4 and (mc == 1).sum() == 1
    joined = mb[mm == 2]
    assert [200, 10, 256, 40] in joined.tolist()
    # two different cars next to each other in one tile stay two
    mb, *_ = merge_instances(np.array([[10, 10, 30, 30], [32, 10, 52, 30]]), np.array([0.9, 0.8]),
                             np.array([0, 0]), np.array([0, 0]), grid)  # fmt: skip
    assert len(mb) == 2


# ------------------------------------------------------------------------------------ coordinates


def _inside(pt, ring) -> bool:
    """Point in polygon (ray casting)."""
    x, y = pt
    hit = False
    for (x1, y1), (x2, y2) in zip(ring, ring[1:], strict=False):
        if (y1 > y) != (y2 > y) and x < x1 + (y - y1) * (x2 - x1) / (y2 - y1):
            hit = not hit
    return hit


def _oracle(job, truth):
    """Every true object as a detector that sees exactly the part of it inside the tile would report it."""
    boxes = [(o["concept"], o["label"], o["box_px"]) for reg in truth["regions"] for o in reg["objects"]]

    def result(tile, image):
        size = job.params.tile
        insts = []
        for concept, label, (x1, y1, x2, y2) in boxes:
            cx1, cy1 = max(x1, tile.x), max(y1, tile.y)
            cx2, cy2 = min(x2, tile.x + tile.w), min(y2, tile.y + tile.h)
            if cx2 - cx1 > 1 and cy2 - cy1 > 1:
                s = size / tile.w
                insts.append(Instance(concept, 0.9, ((cx1 - tile.x) * s, (cy1 - tile.y) * s,
                                                     (cx2 - tile.x) * s, (cy2 - tile.y) * s), label))  # fmt: skip
        return TileResult({"x": 1.0}, 0.5, insts)

    return result


@pytest.mark.parametrize("crs", ["scene", "EPSG:4326"])
def test_concept_polygons_contain_the_true_map_positions_and_edge_objects_count_once(tmp_path, mosaic, crs):
    truth = load_truth(mosaic)
    job = SceneJob(mosaic, tmp_path / "out", SceneParams(tile=256, overlap=32, crs=crs))
    oracle = _oracle(job, truth)
    for tile in job.pending():
        image = job.read(tile)
        job.record(tile, oracle(tile, image) if image is not None else None)
    outputs = job.finish()
    doc = json.loads(outputs.geojson.read_text())
    polys = [(f["properties"]["concept"], f["geometry"]["coordinates"][0]) for f in doc["features"]
             if f["properties"]["kind"] == "concept"]  # fmt: skip
    objects = [o for reg in truth["regions"] for o in reg["objects"]]
    assert len(objects) > 50
    if crs == "scene":
        assert doc["crs"]["properties"]["name"] == "urn:ogc:def:crs:EPSG::32633"
        centres = [tuple(o["center_map"]) for o in objects]
    else:
        from rasterio.warp import transform

        lon, lat = transform("EPSG:32633", "EPSG:4326", [o["center_map"][0] for o in objects],
                             [o["center_map"][1] for o in objects])  # fmt: skip
        centres = list(zip(lon, lat, strict=True))
        assert 14 < lon[0] < 16 and 44 < lat[0] < 46  # UTM 33N, northing 5,000 km
    found = sum(any(c == o["concept"] and _inside(pt, ring) for c, ring in polys)
                for o, pt in zip(objects, centres, strict=True))  # fmt: skip
    assert found == len(objects)
    # objects on tile edges are counted once: the merged count equals the truth's (a few boxes of touching
    # objects may merge)
    true_counts: dict[str, int] = {}
    for o in objects:
        true_counts[o["concept"]] = true_counts.get(o["concept"], 0) + 1
    for concept, n in true_counts.items():
        assert abs(outputs.summary["objects"].get(concept, 0) - n) <= max(1, 0.03 * n), concept
    job.close()


def test_outputs_files_and_schema(tmp_path, mosaic):
    job = SceneJob(mosaic, tmp_path / "out", SceneParams(tile=256, overlap=32))
    outputs = run_scene(job, fake_infer)
    doc = json.loads(outputs.geojson.read_text())
    tiles = [f for f in doc["features"] if f["properties"]["kind"] == "tile"]
    assert len(tiles) == job.total == 12
    p = tiles[0]["properties"]
    assert set(p) >= {"kind", "labels", "probabilities", "threshold", "tile", "valid"} and "caption" not in p
    assert p["labels"] == [k for k, v in p["probabilities"].items() if v >= p["threshold"]]
    ring = tiles[0]["geometry"]["coordinates"][0]
    assert ring[0] == [500000.0, 5000000.0] and ring[2] == [500000 + 256 * 0.3, 5000000 - 256 * 0.3]
    with rasterio.open(outputs.coverage) as cov:
        assert cov.count == 3 and cov.descriptions == tuple(LABELS3)
        assert cov.crs.to_epsg() == 32633 and cov.transform.a == pytest.approx(224 * 0.3)
        assert cov.shape == (-(-650 // 224), -(-900 // 224))
        grid_probs = cov.read(1)
        assert grid_probs[0, 0] == pytest.approx(p["probabilities"]["a"], abs=1e-4)
    s = outputs.summary
    assert s["description_method"].startswith("rule-based") and s["description"].startswith("A 270 x 195 m scene")
    assert set(s["label_fraction"]) == set(LABELS3)
    from PIL import Image

    with Image.open(outputs.overlay) as im:
        assert im.width > 300
    job.close()


# ------------------------------------------------------------------------------------ generator


def test_synth_scene_command_writes_a_tiled_georeferenced_geotiff_and_its_truth(tmp_path, capsys):
    from captioning.cli import main

    out = tmp_path / "g.tif"
    argv = ["synth-scene", str(out), "--width", "700", "--height", "530", "--seed", "9", "--nodata-cells", "0.3",
            "--crs", "EPSG:32632", "--origin", "300000,4000000", "--gsd", "0.5"]  # fmt: skip
    assert main(argv) == 0
    assert capsys.readouterr().out.strip().splitlines()[-2:] == [str(out), str(tmp_path / "g.truth.json")]
    truth = load_truth(out)
    with rasterio.open(out) as ds:
        assert ds.crs.to_epsg() == 32632 and ds.transform.a == 0.5 and ds.transform.c == 300000
        assert ds.block_shapes[0] == (512, 512) and ds.compression.name.lower() == "jpeg" and ds.overviews(1) == [2]
        mask = ds.dataset_mask()
        for reg in truth["regions"]:
            window = mask[reg["y"] : reg["y"] + reg["h"], reg["x"] : reg["x"] + reg["w"]]
            assert (window == 0).all() if reg["nodata"] else (window == 255).all()
            for o in reg["objects"]:
                x1, y1, x2, y2 = o["box_px"]
                mx, my = ds.transform @ ((x1 + x2) / 2, (y1 + y2) / 2)
                assert o["center_map"] == [pytest.approx(mx, abs=0.01), pytest.approx(my, abs=0.01)]
    assert {r["complete"] for r in truth["regions"]} == {True, False}
    assert any(r["nodata"] for r in truth["regions"]) and truth["crs"] == "EPSG:32632"
    assert main(argv) == 2  # exists: needs --overwrite
    assert "--overwrite" in capsys.readouterr().err
