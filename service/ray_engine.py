"""``captioner batch SOURCE --out DEST --engine ray``: batch captioning on Ray Data, on one machine or a cluster.

Pipeline (docs/batch.md)::

    source listing (driver)  ->  read + decode + preprocess (Ray tasks, CPU)
                             ->  models (an actor pool: each actor builds one ``service.offline.Engine``)
                             ->  records streamed back to the driver, written as part files under DEST

* SOURCE is a folder (every image under it by suffix, keyed by relative path, as the local batch does), a
  Parquet manifest (a ``path`` column), or a list file (one path or URI a line; blank lines and ``#``
  comments skipped). Relative entries are resolved against the manifest's / list's folder; keys are the
  entries as written. URIs: ``file://`` and whatever ``pyarrow.fs`` opens (``s3://``, ``gs://``, ``hdfs://``).
* The models run only in the actors, through ``Engine.infer``; the tasks run only ``Engine.preparer()``
  (preprocessing, no weights by the runtime contract; a larger one is named in a warning). Same code path
  as ``captioner batch`` and the service: no second copy of model logic.
* A file that cannot be read, or is not a valid image, becomes an error record naming it (same shape as
  the local batch: ``{"path", "error": {"type", "status", "detail"}}``); it never fails the run.
* Output: DEST is a folder of part files ``part-<run>-<n>.parquet`` (or ``.jsonl``), each written to a
  temporary name and renamed when complete, so a killed run leaves only whole parts. The driver writes
  them (records are small; images never travel to the driver) and drops a key it has already written, so
  a part holds each key once even when Ray re-executes work after a node failure. Re-running with the same
  DEST skips every key already in a part (resume); the union of the parts is each input exactly once.
* Parquet: one column per top-level record key; values that are objects or lists (``error``, ``labels``,
  ``concepts``, ``tokens``) are stored as JSON text and listed in the file's metadata
  (``captioner.json_columns``); :func:`read_records` turns the rows back into records. A key a record does
  not have reads back as absent (so does a key whose value is null). JSON lines parts hold the records as is.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from captioning.errors import UsageError

FORMATS = ("parquet", "jsonl")
JSON_COLUMNS_KEY = b"captioner.json_columns"
PART_PREFIX = "part-"
TMP_PREFIX = ".tmp-"


# --- sources --------------------------------------------------------------------------------------------
@dataclass
class Source:
    """What to caption: ``keys[i]`` (recorded as ``path``) is read from ``uris[i]``."""

    kind: str  # "folder" | "parquet" | "list"
    location: str
    keys: list[str]
    uris: list[str]


def _has_scheme(text: str) -> bool:
    scheme = urlparse(text).scheme
    return len(scheme) > 1  # "C:" style drive letters are not schemes


def _resolve(entry: str, base: Path) -> str:
    if _has_scheme(entry):
        return entry
    path = Path(entry).expanduser()
    return str(path if path.is_absolute() else base / path)


def _checked(kind: str, location: str, keys: list[str], base: Path) -> Source:
    seen: set[str] = set()
    for number, key in enumerate(keys, 1):
        if not key:
            raise UsageError(f"{location}: entry {number} is empty")
        if key in seen:
            raise UsageError(f"{location}: {key!r} is listed twice (entry {number}); each input must be unique")
        seen.add(key)
    return Source(kind, location, keys, [_resolve(k, base) for k in keys])


def list_source(source: str | Path) -> Source:
    """A folder, a Parquet manifest (column ``path``) or a list file -> keys and where to read them."""
    from service.offline import list_images

    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir():
        keys = list_images(path)
        return Source("folder", text, keys, [str(path / k) for k in keys])
    if not path.is_file():
        raise UsageError(f"{text}: no such folder or file (SOURCE is a folder, a Parquet manifest or a list file)")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic == b"PAR1" or path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        try:
            schema = pq.read_schema(path)
        except Exception as exc:  # pyarrow raises ArrowInvalid/OSError for a broken file
            raise UsageError(f"{text}: not a readable Parquet file ({exc})") from None
        if "path" not in schema.names:
            raise UsageError(f"{text}: a Parquet manifest needs a 'path' column (it has: {', '.join(schema.names)})")
        column = pq.read_table(path, columns=["path"]).column("path")
        if column.null_count:
            raise UsageError(f"{text}: column 'path' has {column.null_count} null value(s)")
        try:
            keys = [str(v) for v in column.to_pylist()]
        except Exception:
            raise UsageError(f"{text}: column 'path' must hold strings") from None
        return _checked("parquet", text, keys, path.parent)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UsageError(f"{text}: a list file must be UTF-8 text, one path or URI a line") from None
    keys = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return _checked("list", text, keys, path.parent)


def read_bytes(uri: str) -> bytes:
    """The bytes at a local path, a ``file://`` URI or any URI ``pyarrow.fs`` opens."""
    if _has_scheme(uri):
        parsed = urlparse(uri)
        if parsed.scheme == "file":
            return Path(unquote(parsed.path)).read_bytes()
        import pyarrow.fs as pafs

        fs, inner = pafs.FileSystem.from_uri(uri)
        with fs.open_input_stream(inner) as fh:
            return fh.read()
    return Path(uri).read_bytes()


# --- the stages that run on the cluster --------------------------------------------------------------------
def _problem(key: str, message: str) -> dict[str, Any]:
    """An error record built as the local engine builds it (``Engine.records``), so both write the same."""
    from service.inference import error_of
    from service.intake import ImageProblem

    return {"path": key, "error": error_of(ImageProblem("invalid-image", 0, key, message))}


def _read_error(key: str, exc: Exception) -> dict[str, Any]:
    return _problem(key, f"cannot read ({getattr(exc, 'strerror', None) or exc or type(exc).__name__})")


def _decode_error(key: str, exc: Exception) -> dict[str, Any]:
    return _problem(key, f"cannot be decoded ({type(exc).__name__}: {exc})")


_PREPARERS: dict[Any, Any] = {}  # per worker process: the preparer, fetched once from the object store


def prepare_batch(table: Any, preparer_ref: Any) -> Any:
    """Ray task: read, decode and preprocess one block of ``{path, uri}`` rows.

    Out: ``path``, ``prepared`` (the pickled ``Prepared``; null for a failed image) and ``record`` (the
    error record as JSON; null for a prepared image)."""
    import pyarrow as pa
    import ray

    if isinstance(preparer_ref, ray.ObjectRef):
        preparer = _PREPARERS.get(preparer_ref.hex())
        if preparer is None:
            preparer = _PREPARERS[preparer_ref.hex()] = ray.get(preparer_ref)
    else:  # the preparer itself (tests, or a caller that ships it in the task)
        preparer = preparer_ref
    blobs: list[bytes | None] = []
    records: list[str | None] = []
    keys = table.column("path").to_pylist()
    for key, uri in zip(keys, table.column("uri").to_pylist(), strict=True):
        try:
            data = read_bytes(uri)
        except (OSError, ValueError) as exc:
            prepared: Any = _read_error(key, exc)
        else:
            try:
                prepared = preparer(key, data)
            except Exception as exc:  # a decoder crash on one odd file must not fail the run: record it
                prepared = _decode_error(key, exc)
        if isinstance(prepared, dict):
            blobs.append(None)
            records.append(json.dumps(prepared))
        else:
            blobs.append(pickle.dumps(prepared, protocol=pickle.HIGHEST_PROTOCOL))
            records.append(None)
    return pa.table({"path": pa.array(keys, pa.string()), "prepared": pa.array(blobs, pa.binary()),
                     "record": pa.array(records, pa.string())})


class InferActor:
    """One per actor in the pool: builds the Engine once (weights load here, not in the tasks), then turns
    blocks of prepared rows into records. ``node``/``pid`` say where each record was made (run stats)."""

    def __init__(self, engine_kwargs: dict[str, Any]):
        import ray

        from service.offline import Engine

        self.engine = Engine.from_store(**engine_kwargs)
        self.node = ray.get_runtime_context().get_node_id()
        self.pid = os.getpid()

    def __call__(self, table: Any) -> Any:
        import pyarrow as pa

        keys = table.column("path").to_pylist()
        blobs = table.column("prepared").to_pylist()
        records = table.column("record").to_pylist()
        prepared = [pickle.loads(b) for b in blobs if b is not None]
        named = [k for k, b in zip(keys, blobs, strict=True) if b is not None]
        made = iter(self.engine.infer(prepared, keys=named) if prepared else [])
        out: list[str] = []
        for key, blob, record in zip(keys, blobs, records, strict=True):
            if blob is None:
                out.append(record)
                continue
            line = next(made)
            if line.get("path") != key:
                raise RuntimeError(f"Engine.infer returned a record for {line.get('path')!r} in place of {key!r}")
            out.append(json.dumps(line))
        n = len(keys)
        return pa.table({"path": pa.array(keys, pa.string()), "record": pa.array(out, pa.string()),
                         "node": pa.array([self.node] * n, pa.string()), "pid": pa.array([self.pid] * n, pa.int64())})


# --- output: part files, resume, reading back ----------------------------------------------------------
def _parts(dest: Path) -> list[Path]:
    if not dest.exists():
        return []
    if not dest.is_dir():
        raise UsageError(f"{dest}: --out for --engine ray is a folder of part files, and this is a file")
    return sorted(p for p in dest.iterdir() if p.name.startswith(PART_PREFIX) and p.suffix in (".parquet", ".jsonl"))


def _format_of(parts: list[Path], dest: Path) -> str | None:
    found = {p.suffix[1:] for p in parts}
    if len(found) > 1:
        raise UsageError(f"{dest}: holds both Parquet and JSON lines parts; use one --format per DEST")
    return found.pop() if found else None


def _part_rows(part: Path) -> Iterator[dict[str, Any]]:
    if part.suffix == ".jsonl":
        with open(part, encoding="utf-8") as fh:
            for number, raw in enumerate(fh, 1):
                try:
                    line = json.loads(raw)
                    line["path"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise UsageError(f"{part}: line {number} is not a result line (JSON with 'path')") from None
                yield line
        return
    import pyarrow.parquet as pq

    table = pq.read_table(part)
    meta = table.schema.metadata or {}
    json_columns = set(json.loads(meta.get(JSON_COLUMNS_KEY, b"[]")))
    for row in table.to_pylist():
        yield {k: (json.loads(v) if k in json_columns else v) for k, v in row.items() if v is not None}


def read_records(dest: str | Path) -> list[dict[str, Any]]:
    """Every record under DEST (all parts), sorted by path; refuses a key that is there twice."""
    dest = Path(dest)
    seen: dict[str, Path] = {}
    out = []
    for part in _parts(dest):
        for row in _part_rows(part):
            if row["path"] in seen:
                raise UsageError(f"{dest}: {row['path']!r} is in {seen[row['path']].name} and {part.name}")
            seen[row["path"]] = part
            out.append(row)
    return sorted(out, key=lambda r: r["path"])


def written_keys(dest: Path) -> set[str]:
    """Keys already in DEST's parts (for resume); a key in two parts is refused, naming both."""
    import pyarrow.parquet as pq

    seen: dict[str, Path] = {}
    for part in _parts(dest):
        keys = (pq.read_table(part, columns=["path"]).column("path").to_pylist() if part.suffix == ".parquet"
                else [row["path"] for row in _part_rows(part)])
        for key in keys:
            if key in seen:
                raise UsageError(f"{dest}: {key!r} is in {seen[key].name} and {part.name}")
            seen[key] = part
    return set(seen)


def _records_table(records: list[dict[str, Any]]) -> Any:
    import pyarrow as pa

    columns: dict[str, None] = {}
    for record in records:
        columns.update(dict.fromkeys(record))
    json_columns = [c for c in columns if any(isinstance(r.get(c), (dict, list)) for r in records)]
    data = {}
    for c in columns:
        values = [r.get(c) for r in records]
        if c in json_columns:
            values = [None if v is None else json.dumps(v) for v in values]
        data[c] = values
    try:
        table = pa.table(data)
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # a column mixing scalar types: keep it exact as JSON text
        mixed = [c for c in columns if c not in json_columns and _mixed(data[c])]
        for c in mixed:
            data[c] = [None if v is None else json.dumps(v) for v in data[c]]
        json_columns += mixed
        table = pa.table(data)
    return table.replace_schema_metadata({JSON_COLUMNS_KEY: json.dumps(json_columns).encode()})


def _mixed(values: list[Any]) -> bool:
    kinds = {type(v) for v in values if v is not None}
    return len(kinds - {int, float}) > 1 or (bool in kinds and len(kinds) > 1) or (str in kinds and len(kinds) > 1)


class PartWriter:
    """Writes records into whole part files under DEST, one key once."""

    def __init__(self, dest: Path, fmt: str, rows_per_part: int = 1000, seconds_per_part: float = 60.0):
        self.dest, self.fmt = dest, fmt
        self.rows_per_part, self.seconds_per_part = rows_per_part, seconds_per_part
        self.run = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
        self.count = 0
        self.pending: list[dict[str, Any]] = []
        self.since = time.monotonic()
        dest.mkdir(parents=True, exist_ok=True)
        for stale in dest.glob(TMP_PREFIX + "*"):  # left by a killed run: never complete, never counted
            stale.unlink()

    def add(self, record: dict[str, Any]) -> None:
        self.pending.append(record)
        if len(self.pending) >= self.rows_per_part or time.monotonic() - self.since >= self.seconds_per_part:
            self.flush()

    def flush(self) -> None:
        self.since = time.monotonic()
        if not self.pending:
            return
        name = f"{PART_PREFIX}{self.run}-{self.count:05d}.{self.fmt}"
        tmp = self.dest / f"{TMP_PREFIX}{name}"
        if self.fmt == "jsonl":
            with open(tmp, "w", encoding="utf-8") as fh:
                for record in self.pending:
                    fh.write(json.dumps(record) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
        else:
            import pyarrow.parquet as pq

            pq.write_table(_records_table(self.pending), tmp)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, self.dest / name)
        self.count += 1
        self.pending = []


# --- the run -----------------------------------------------------------------------------------------------
@dataclass
class RayOptions:
    address: str | None = None  # None: start Ray in this process (or use the one already initialised)
    actors: int = 1
    batch_size: int = 8  # images per Engine.infer call in an actor
    num_gpus: float = 0.0  # per actor
    num_cpus: float = 1.0  # per actor (its torch threads)
    read_block: int = 16  # images per decode/preprocess task (at most)
    actor_memory: int = 1 << 30  # bytes of memory each actor reserves (its models and batches)


@dataclass
class RunStats:
    images: int = 0
    skipped: int = 0
    captioned: int = 0
    failed: int = 0
    duplicates_dropped: int = 0
    parts: int = 0
    seconds: float = 0.0
    nodes: dict[str, int] = field(default_factory=dict)  # node id -> images inferred there
    actors: dict[str, int] = field(default_factory=dict)  # "node:pid" -> images

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def build_dataset(todo: list[tuple[str, str]], preparer_ref: Any, engine_kwargs: dict[str, Any],
                  options: RayOptions) -> Any:
    """The Ray Data plan: ``{path, uri}`` blocks -> prepare tasks -> InferActor pool -> ``{path, record, ...}``.

    The two stages stay separate operators (Ray Data would fuse a task stage into the actor stage when their
    resource requests match): the actors ask for ``actor_memory`` (they hold the models) and GPUs, the tasks
    for one CPU each, so decoding runs in tasks, spread over the CPU nodes, while the actors only infer."""
    import pyarrow as pa
    import ray.data

    # blocks of read_block images, smaller for a small collection so that every actor gets blocks
    step = max(1, min(options.read_block, math.ceil(len(todo) / (4 * options.actors))))
    tables = [pa.table({"path": [k for k, _ in todo[i:i + step]], "uri": [u for _, u in todo[i:i + step]]})
              for i in range(0, len(todo), step)]
    ds = ray.data.from_arrow(tables)
    ds = ds.map_batches(prepare_batch, batch_format="pyarrow", batch_size=None,
                        fn_kwargs={"preparer_ref": preparer_ref}, num_cpus=1)
    return ds.map_batches(InferActor, batch_format="pyarrow", batch_size=options.batch_size,
                          fn_constructor_kwargs={"engine_kwargs": engine_kwargs},
                          compute=ray.data.ActorPoolStrategy(size=options.actors),
                          num_cpus=options.num_cpus, num_gpus=options.num_gpus or None,
                          memory=options.actor_memory)


def connect(address: str | None, options: RayOptions | None = None) -> bool:
    """Join (or start) Ray; True when this call started it (then the caller shuts it down).

    Started here, Ray gets at least one logical CPU more than the actors reserve, so the decode tasks always
    have somewhere to run (a pool of N one-CPU actors on an N-core machine would otherwise starve them)."""
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"log_to_driver": bool(os.environ.get("CAPTIONER_RAY_LOGS"))}
    if address is None:
        kwargs["include_dashboard"] = False
        if options is not None:
            kwargs["num_cpus"] = max(os.cpu_count() or 1, math.ceil(options.actors * options.num_cpus) + 1)
    try:
        ray.init(address=address, **kwargs)
    except ConnectionError as exc:
        raise UsageError(f"--address {address}: no Ray cluster there ({exc}); start one (`ray start --head`) "
                         "or leave --address out to run Ray on this machine") from None
    return True


def check_capacity(options: RayOptions, wait_s: float = 0.0) -> None:
    """Refuse a pool the cluster cannot hold (GPUs; after waiting up to ``wait_s`` for nodes still joining),
    warn when the actors leave no CPU for the decode tasks."""
    import ray

    gpus = options.actors * options.num_gpus
    deadline = time.monotonic() + wait_s
    have = ray.cluster_resources()
    while gpus > have.get("GPU", 0) and time.monotonic() < deadline:
        time.sleep(5)
        have = ray.cluster_resources()
    if gpus > have.get("GPU", 0):
        raise UsageError(f"--actors {options.actors} x --num-gpus {options.num_gpus:g} needs {gpus:g} GPU(s); "
                         f"the Ray cluster has {have.get('GPU', 0):g}")
    if options.actors * options.num_cpus >= have.get("CPU", 0):
        print(f"warning: {options.actors} actor(s) x {options.num_cpus:g} CPU take all {have.get('CPU', 0):g} "
              "CPUs of the Ray cluster; the decode tasks wait for more nodes", file=sys.stderr)


def run(source: str | Path, dest: str | Path, engine_kwargs: dict[str, Any], options: RayOptions | None = None, *,
        fmt: str = "parquet", progress: bool = True,
        on_progress: Callable[[RunStats], None] | None = None, rows_per_part: int = 1000) -> RunStats:
    """Caption SOURCE into DEST on Ray; resumes what DEST already holds. ``engine_kwargs`` go to
    ``Engine.from_store`` (on the driver once, to check them and make the preparer; in every actor)."""

    options = options or RayOptions()
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r}: choose {' or '.join(FORMATS)}")
    for name, value in (("--actors", options.actors), ("--batch-size", options.batch_size)):
        if value < 1:
            raise UsageError(f"{name} must be at least 1")
    if options.num_gpus < 0:
        raise UsageError("--num-gpus must be >= 0")
    dest = Path(dest)
    src = list_source(source)
    existing = _format_of(_parts(dest), dest)
    if existing and existing != fmt:
        raise UsageError(f"{dest}: already holds {existing} parts; resume it with --format {existing}")
    done = written_keys(dest)
    todo = [(k, u) for k, u in zip(src.keys, src.uris, strict=True) if k not in done]
    stats = RunStats(images=len(src.keys), skipped=len(src.keys) - len(todo))
    writer = PartWriter(dest, fmt, rows_per_part=rows_per_part)
    started = time.perf_counter()
    if not todo:
        stats.seconds = round(time.perf_counter() - started, 3)
        return stats

    from service.offline import Engine

    # On the driver: checks model/alias/options before any cluster work, and makes the (weightless) preparer.
    try:
        preparer = Engine.from_store(**engine_kwargs).preparer()
    except ValueError as exc:  # the options' range checks (pydantic), as the local engine reports them
        raise UsageError(str(exc)) from None

    import ray
    import ray.data
    from tqdm.auto import tqdm

    started_ray = connect(options.address, options)
    try:
        check_capacity(options, wait_s=0.0 if started_ray else float(os.environ.get("CAPTIONER_RAY_WAIT_S", 300)))
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        shipped = len(pickle.dumps(preparer, protocol=pickle.HIGHEST_PROTOCOL))
        if shipped > 8 << 20:  # the contract: preprocessing only; a bound runtime method drags its weights along
            print(f"warning: the Engine's preparer pickles to {shipped / 2**20:.0f} MiB (model weights?); every "
                  "decode worker loads it once", file=sys.stderr)
        preparer_ref = ray.put(preparer)
        ds = build_dataset(todo, preparer_ref, engine_kwargs, options)
        wanted = {k for k, _ in todo}
        written: set[str] = set()
        bar = tqdm(total=len(todo), desc="batch (ray)", unit="img",
                   disable=not progress or bool(os.environ.get("CAPTIONER_NO_PROGRESS")))
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for key, text, node, pid in zip(*(batch.column(c).to_pylist() for c in ("path", "record", "node", "pid")),
                                            strict=True):
                if key in written or key not in wanted:
                    stats.duplicates_dropped += 1
                    continue
                written.add(key)
                record = json.loads(text)
                writer.add(record)
                if "error" in record:
                    stats.failed += 1
                else:
                    stats.captioned += 1
                stats.nodes[node] = stats.nodes.get(node, 0) + 1
                stats.actors[f"{node}:{pid}"] = stats.actors.get(f"{node}:{pid}", 0) + 1
                bar.update(1)
            if on_progress is not None:
                on_progress(stats)
        writer.flush()
        bar.close()
        missing = wanted - written
        if missing:
            shown = ", ".join(sorted(missing)[:5])
            raise CaptionerRayError(f"the run ended with {len(missing)} image(s) not written (e.g. {shown}); "
                                    "run again with the same --out to finish them")
    finally:
        writer.flush()
        if started_ray:
            ray.shutdown()
    stats.parts = writer.count
    stats.seconds = round(time.perf_counter() - started, 3)
    return stats


class CaptionerRayError(UsageError):
    """The run could not finish every input (the parts written so far stay; a re-run resumes)."""


# --- command line ------------------------------------------------------------------------------------------
def add_ray_args(parser: Any) -> None:
    """The `captioner batch` flags of the Ray engine (and --format, which only it honours)."""
    group = parser.add_argument_group(
        "engine", "--engine ray: DIR may also be a list file (one path or URI a line) or a Parquet manifest "
        "(column 'path'); --out is then a folder of part files (resumed). See docs/batch.md.")
    group.add_argument("--engine", choices=("local", "ray"), default="local",
                       help="local: this process (default); ray: Ray Data, on this machine or a cluster")
    group.add_argument("--address", default=None,
                       help="ray: cluster to join (auto, ray://HOST:10001, HOST:6379; default: start one here)")
    group.add_argument("--actors", type=int, default=None, help="ray: model actors, each loads the models once "
                       "(default 1)")
    group.add_argument("--num-gpus", type=float, default=None, help="ray: GPUs per actor (default 0: CPU actors)")
    group.add_argument("--format", choices=FORMATS, default=None,
                       help="ray: part file format under --out (default parquet; the local engine writes JSON lines)")


def engine_kwargs_from_args(args: Any) -> dict[str, Any]:
    """``Engine.from_store`` arguments from the `captioner batch` flags (as the local engine reads them)."""
    options = {k: getattr(args, k, None) for k in ("beam_size", "max_length", "threshold", "min_score", "group")}
    return {
        "store_root": str(args.store) if getattr(args, "store", None) else None,
        "tasks": getattr(args, "tasks", None) or "caption",
        "model": getattr(args, "model", None),
        "alias": getattr(args, "alias", None),
        "options": {k: v for k, v in options.items() if v is not None} or None,
        "device": getattr(args, "device", None),
        "precision": getattr(args, "precision", None),
    }


def run_ray(args: Any) -> int:
    """`captioner batch SOURCE --out DEST --engine ray ...`"""
    if getattr(args, "shard", None):
        raise UsageError("--shard is for the local engine (Kubernetes Indexed Job); Ray splits the work itself")
    source = getattr(args, "source", None) or args.dir
    options = RayOptions(address=args.address, actors=args.actors or 1, batch_size=args.batch_size or 8,
                         num_gpus=args.num_gpus or 0.0)
    stats = run(source, args.out, engine_kwargs_from_args(args), options, fmt=args.format or "parquet")
    print(f"{args.out}: {stats.captioned} captioned, {stats.failed} failed, {stats.skipped} already there "
          f"({stats.images} images; {stats.parts} part(s) written; {len(stats.nodes)} node(s), "
          f"{len(stats.actors)} actor(s); {stats.seconds} s)", file=sys.stderr)
    return 1 if getattr(args, "strict", False) and stats.failed else 0


def check_local_args(args: Any) -> None:
    """--engine local: refuse the Ray-only flags instead of ignoring them."""
    if getattr(args, "format", None) == "parquet":
        raise UsageError("--format parquet needs --engine ray (the local engine writes one JSON lines file)")
    for flag in ("address", "actors", "num_gpus"):
        if getattr(args, flag, None) is not None:
            raise UsageError(f"--{flag.replace('_', '-')} needs --engine ray")


__all__ = ["InferActor", "PartWriter", "RayOptions", "RunStats", "Source", "add_ray_args", "check_local_args",
           "connect", "list_source", "prepare_batch", "read_bytes", "read_records", "run", "run_ray",
           "written_keys"]

