"""Read a scene (GeoTIFF or any raster GDAL opens) window by window, as 8-bit RGB tiles for the models.

``SceneReader(path, bands=None, target_gsd=None)`` opens the file with rasterio and never reads the whole
raster at full resolution: tiles are windowed reads, statistics and previews are decimated reads (GDAL
takes them from the overviews when the file has them, as a Cloud-Optimized GeoTIFF does).

* **Bands.** 3 colour bands (by colour interpretation when the file says red/green/blue, else bands 1-3);
  an alpha band becomes part of the validity mask; 1 band (or 2, grey + something) is read as grey and
  replicated to RGB with a warning; more than 3 without colour interpretation: bands 1, 2, 3 with a
  warning (choose with ``bands=``).
* **Scaling.** 8-bit data is used as is. 16-bit, 32-bit and float data are stretched to 0-255 per band
  between the 2nd and 98th percentile of the *whole scene* (measured once on a decimated read), so every
  tile of a scene is scaled alike and tiles are comparable.
* **Validity.** The dataset mask (nodata values, alpha band, internal/external mask band) plus non-finite
  floats; masked pixels are filled with black in the tile image and counted in ``valid`` (0..1).
* **Memory.** Every GDAL call runs under ``rasterio.Env(GDAL_CACHEMAX=cache_mb)`` (default 128 MB), so
  GDAL's block cache cannot grow to its default 5 % of RAM while a large scene is read.
* **Resolution.** The ground sample distance (metres per pixel) comes from the CRS: projected CRS units
  times the pixel size; geographic CRS (degrees): approximated at the scene centre (a warning says so);
  no CRS or a pixel-unit transform: unknown, and the scene is processed at its native resolution with a
  warning. With a known GSD and ``target_gsd``, ``zoom = target_gsd / gsd`` source pixels make one model
  pixel; reads use ``out_shape`` with average resampling (downsampling, where GDAL takes the overview
  level that matches) or bilinear (upsampling).

A reader holds an open rasterio dataset, which is not thread-safe: use one reader per thread.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from captioning.errors import SceneError

log = logging.getLogger(__name__)

GDAL_CACHE_MB = 128  # GDAL's block cache for a reader's reads (GDAL's default is 5 % of RAM: it alone grew to
# 850 MB reading a 20,000 x 20,000 scene tile by tile); 128 MB holds four 512-px block rows of a 20k-wide scene
STATS_SIDE = 1024  # the decimated read that scene statistics and previews come from (longest side)
PERCENTILES = (2.0, 98.0)
ZOOM_TOLERANCE = 0.02  # |zoom - 1| below this: read at native resolution (no resampling)
METRES_PER_DEGREE_LAT = 110_574.0
METRES_PER_DEGREE_LON_EQUATOR = 111_320.0


@dataclass
class SceneInfo:
    """What the reader found out about a scene (JSON-friendly through ``to_dict``)."""

    path: str
    width: int
    height: int
    count: int
    dtype: str
    bands: tuple[int, ...]
    crs: str | None  # "EPSG:32633" when it has an EPSG code, else WKT; None when not georeferenced
    transform: tuple[float, ...]  # affine a, b, c, d, e, f (pixel -> map)
    gsd: float | None  # metres per pixel, None when unknown
    gsd_source: str  # "crs" | "approximate (geographic CRS, at the scene centre)" | "unknown"
    zoom: float  # source pixels per model pixel (1.0 at native resolution)
    overviews: list[int]
    masked: bool  # the file declares nodata / alpha / a mask band
    scaling: list[tuple[float, float]] | None  # per band (low, high) mapped to 0..255, None for 8-bit
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "path": self.path, "width": self.width, "height": self.height, "count": self.count,
            "dtype": self.dtype, "bands": list(self.bands), "crs": self.crs, "transform": list(self.transform),
            "gsd": self.gsd, "gsd_source": self.gsd_source, "zoom": self.zoom, "overviews": self.overviews,
            "masked": self.masked, "scaling": [list(s) for s in self.scaling] if self.scaling else None,
            "warnings": list(self.warnings),
        }  # fmt: skip


def _open(path: Path):
    import rasterio
    from rasterio.errors import RasterioIOError

    if not path.exists():
        raise SceneError("no such file", path=path)
    if path.is_dir():
        raise SceneError("is a folder, not a raster file", path=path)
    try:
        return rasterio.open(path)
    except RasterioIOError as exc:
        raise SceneError(f"not a readable raster (GDAL: {str(exc).strip()[:200]})", path=path) from None


class SceneReader:
    """Windowed, scaled, masked reads of one scene; see the module docstring."""

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        bands: list[int] | tuple[int, ...] | None = None,
        target_gsd: float | None = None,
        cache_mb: int = GDAL_CACHE_MB,
    ):
        from rasterio.enums import ColorInterp

        self.path = Path(path)
        self.cache_mb = int(cache_mb)
        with self._env():
            self.ds = _open(self.path)
            self._setup(bands, target_gsd, ColorInterp)

    def _env(self):
        import rasterio

        return rasterio.Env(GDAL_CACHEMAX=self.cache_mb)

    def _setup(self, bands, target_gsd, ColorInterp) -> None:
        path = self.path
        ds = self.ds
        warnings: list[str] = []
        try:
            if ds.width < 1 or ds.height < 1 or ds.count < 1:
                raise SceneError(f"has no pixels to read ({ds.width} x {ds.height}, {ds.count} bands)", path=path)
            self.bands = self._choose_bands(bands, ds, warnings, ColorInterp)
            dtypes = {ds.dtypes[b - 1] for b in self.bands}
            if len(dtypes) != 1:
                raise SceneError(f"bands {list(self.bands)} have different data types ({sorted(dtypes)})", path=path)
            self.dtype = dtypes.pop()
            if self.dtype.startswith("complex"):
                raise SceneError(f"complex data ({self.dtype}) cannot be shown as a picture", path=path)
            self.masked = any(
                flag.name in ("nodata", "alpha", "per_dataset") for flags in ds.mask_flag_enums for flag in flags
            ) or ds.nodata is not None
            gsd, source = self._gsd(ds, warnings)
            self.gsd, self.gsd_source = gsd, source
            if target_gsd is not None and not (isinstance(target_gsd, int | float) and target_gsd > 0):
                raise SceneError(f"target_gsd must be a positive number of metres, got {target_gsd!r}")
            zoom = 1.0
            if target_gsd is not None and gsd is not None:
                zoom = float(target_gsd) / gsd
                if abs(zoom - 1.0) < ZOOM_TOLERANCE:
                    zoom = 1.0
                elif zoom < 0.5:
                    warnings.append(
                        f"the scene's {gsd:.3g} m/pixel is much coarser than the models' {target_gsd} m/pixel: tiles "
                        f"are enlarged {1 / zoom:.1f}x and hold far less detail than the models learnt from"
                    )
            elif target_gsd is not None:
                warnings.append(
                    f"ground sample distance unknown: tiles are read at the native resolution, not resampled "
                    f"to the models' {target_gsd} m/pixel; results may be off when the scale differs"
                )
            self.zoom = zoom
            self.target_gsd = target_gsd
            self.overviews = list(ds.overviews(self.bands[0]))
            self.scaling = None if self.dtype == "uint8" else self._statistics(warnings)
            self.warnings = warnings
        except BaseException:
            ds.close()
            raise

    # ------------------------------------------------------------------ set-up

    def _choose_bands(self, bands, ds, warnings, ColorInterp) -> tuple[int, ...]:
        if bands is not None:
            bands = tuple(int(b) for b in bands)
            if len(bands) not in (1, 3):
                raise SceneError(f"bands must name 1 or 3 bands, got {list(bands)}", path=self.path)
            bad = [b for b in bands if not 1 <= b <= ds.count]
            if bad:
                raise SceneError(f"band(s) {bad} do not exist (the file has bands 1..{ds.count})", path=self.path)
            return bands
        interp = list(ds.colorinterp)
        colour = [i for i, ci in enumerate(interp, 1) if ci != ColorInterp.alpha]
        if len(colour) == 0:
            raise SceneError("has only an alpha band, no colour or grey band to read", path=self.path)
        rgb = [interp.index(c) + 1 if c in interp else None for c in (ColorInterp.red, ColorInterp.green, ColorInterp.blue)]
        if all(rgb):
            if len(colour) > 3:
                warnings.append(f"{ds.count} bands: the red, green and blue bands {rgb} are used")
            return tuple(rgb)
        if len(colour) < 3:
            warnings.append(
                f"{len(colour)} colour band(s): band {colour[0]} is read as grey (replicated to RGB); the models "
                "were trained on colour pictures"
            )
            return (colour[0],)
        if len(colour) > 3:
            warnings.append(
                f"{len(colour)} bands without a red/green/blue interpretation: bands {colour[:3]} are read as "
                "red, green, blue (choose others with --bands)"
            )
        return tuple(colour[:3])

    def _gsd(self, ds, warnings) -> tuple[float | None, str]:
        t = ds.transform
        if ds.crs is None or t.is_identity:
            warnings.append(
                "not georeferenced (no CRS or a pixel-unit transform): the ground sample distance is unknown; "
                "outputs are in pixel coordinates"
            )
            return None, "unknown"
        px_x, px_y = math.hypot(t.a, t.d), math.hypot(t.b, t.e)
        if ds.crs.is_geographic:
            cx, cy = t @ (ds.width / 2, ds.height / 2)
            if not -90 <= cy <= 90:
                warnings.append("geographic CRS but the centre latitude is out of range: ground sample distance unknown")
                return None, "unknown"
            mx = px_x * METRES_PER_DEGREE_LON_EQUATOR * math.cos(math.radians(cy))
            my = px_y * METRES_PER_DEGREE_LAT
            warnings.append(
                f"geographic CRS (degrees): ground sample distance approximated at the scene centre "
                f"({mx:.3g} x {my:.3g} m)"
            )
            return math.sqrt(mx * my), "approximate (geographic CRS, at the scene centre)"
        try:
            _, factor = ds.crs.linear_units_factor
        except Exception:  # noqa: BLE001 - rasterio raises CRSError for odd units
            warnings.append("projected CRS with unknown linear units: ground sample distance unknown")
            return None, "unknown"
        return math.sqrt(px_x * px_y) * float(factor), "crs"

    def _decimated_shape(self, side: int) -> tuple[int, int]:
        scale = min(1.0, side / max(self.ds.width, self.ds.height))
        return max(1, round(self.ds.height * scale)), max(1, round(self.ds.width * scale))

    def _statistics(self, warnings) -> list[tuple[float, float]]:
        """Per band (low, high) percentiles over the valid pixels of a decimated read of the whole scene."""
        from rasterio.enums import Resampling

        h, w = self._decimated_shape(STATS_SIDE)
        data = self.ds.read(self.bands, out_shape=(len(self.bands), h, w), resampling=Resampling.nearest)
        valid = self._valid(data, None, (h, w))
        out = []
        for band, arr in zip(self.bands, data, strict=True):
            values = arr[valid].astype(np.float64)
            values = values[np.isfinite(values)]
            if values.size == 0:
                raise SceneError("holds no valid pixels (everything is nodata or not finite)", path=self.path)
            lo, hi = np.percentile(values, PERCENTILES)
            if hi <= lo:
                lo, hi = float(values.min()), float(values.max())
                if hi <= lo:
                    hi = lo + 1.0
                    warnings.append(f"band {band} is constant ({lo:g})")
            out.append((float(lo), float(hi)))
        warnings.append(
            f"{self.dtype} data stretched to 8 bits per band between the {PERCENTILES[0]:g}th and "
            f"{PERCENTILES[1]:g}th percentile of the scene: " + ", ".join(f"band {b}: {lo:g}..{hi:g}"
                                                                       for b, (lo, hi) in zip(self.bands, out, strict=True))
        )
        return out

    # ------------------------------------------------------------------ reads

    def _valid(self, data: np.ndarray, window, shape: tuple[int, int]) -> np.ndarray:
        valid = np.ones(shape, dtype=bool)
        if self.masked:
            from rasterio.enums import Resampling

            valid = self.ds.dataset_mask(window=window, out_shape=shape, resampling=Resampling.nearest) > 0
        if data.dtype.kind == "f":
            valid &= np.isfinite(data).all(axis=0)
        return valid

    def _to_uint8(self, data: np.ndarray) -> np.ndarray:
        if self.scaling is None:
            return data.astype(np.uint8, copy=False)
        out = np.empty(data.shape, dtype=np.uint8)
        for k, (lo, hi) in enumerate(self.scaling):
            band = data[k].astype(np.float32)
            band = np.nan_to_num(band, nan=lo, posinf=hi, neginf=lo)
            band -= lo
            band *= 255.0 / (hi - lo)
            np.clip(band, 0, 255, out=band)
            out[k] = (band + 0.5).astype(np.uint8)
        return out

    def read(self, x: int, y: int, w: int, h: int, out_w: int, out_h: int) -> tuple[np.ndarray, np.ndarray]:
        """Window ``(x, y, w, h)`` in scene pixels, resampled to ``out_w x out_h`` -> (RGB uint8 [H, W, 3],
        valid bool [H, W])."""
        from rasterio.enums import Resampling
        from rasterio.windows import Window

        window = Window(x, y, w, h)
        resampling = Resampling.average if out_w < w else Resampling.bilinear
        try:
            with self._env():
                data = self.ds.read(self.bands, window=window, out_shape=(len(self.bands), out_h, out_w),
                                    resampling=resampling)
                valid = self._valid(data, window, (out_h, out_w))
        except Exception as exc:  # noqa: BLE001 - GDAL read errors (truncated / corrupt blocks)
            from rasterio.errors import RasterioError

            if not isinstance(exc, RasterioError):
                raise
            raise SceneError(
                f"cannot read pixels {w} x {h} at ({x}, {y}) (GDAL: {str(exc).strip()[:200]}); the file is "
                "damaged or truncated", path=self.path,
            ) from None
        rgb = self._to_uint8(data)
        if rgb.shape[0] == 1:
            rgb = np.repeat(rgb, 3, axis=0)
        rgb = np.ascontiguousarray(rgb.transpose(1, 2, 0))
        rgb[~valid] = 0
        return rgb, valid

    def preview(self, side: int = STATS_SIDE) -> tuple[np.ndarray, np.ndarray]:
        """The whole scene at most ``side`` pixels on its longest side (from the overviews when present)."""
        h, w = self._decimated_shape(side)
        return self.read(0, 0, self.ds.width, self.ds.height, w, h)

    # ------------------------------------------------------------------ info

    @property
    def width(self) -> int:
        return self.ds.width

    @property
    def height(self) -> int:
        return self.ds.height

    @property
    def crs(self):
        return self.ds.crs

    @property
    def transform(self):
        return self.ds.transform

    def crs_name(self) -> str | None:
        crs = self.ds.crs
        if crs is None or self.gsd_source == "unknown" and self.ds.transform.is_identity:
            return None
        epsg = crs.to_epsg()
        return f"EPSG:{epsg}" if epsg else crs.to_wkt()

    def info(self) -> SceneInfo:
        return SceneInfo(
            path=str(self.path), width=self.width, height=self.height, count=self.ds.count, dtype=self.dtype,
            bands=self.bands, crs=self.crs_name(), transform=tuple(self.ds.transform)[:6], gsd=self.gsd,
            gsd_source=self.gsd_source, zoom=self.zoom, overviews=self.overviews, masked=self.masked,
            scaling=self.scaling, warnings=list(self.warnings),
        )  # fmt: skip

    def close(self) -> None:
        self.ds.close()

    def __enter__(self) -> SceneReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
