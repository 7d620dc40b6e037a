"""Safe extraction of a job's uploads: zip and tar archives (plain or compressed) and bare image files.

Nothing is ever extracted to a path taken from the archive: each accepted entry is written to
``<files>/<n>-<sanitised basename>``, so traversal cannot happen. The unsafe entries are still refused *and
reported* (one record per entry, not a failure of the whole job):

* absolute paths (``/etc/passwd``, ``C:\\x``) and paths that climb out of the archive (``../../x``);
* symbolic links, hard links, devices, FIFOs and other special files;
* entries larger than ``max_entry_bytes`` (the size is counted while decompressing, so a lying header or a
  zip bomb cannot get past it), and entries past ``max_total_bytes`` or ``max_entries``;
* encrypted or corrupt entries; entries that are not images in an allowed format (checked from their
  first bytes, not their name).

An upload that starts like an archive (zip, gzip, bzip2, xz or tar magic) but cannot be read as one -- a
truncated zip has no central directory, so ``zipfile`` does not even recognise it -- is ``invalid-archive``;
only an upload that is neither an image nor anything archive-like is ``unsupported-image``.
"""

from __future__ import annotations

import lzma
import re
import shutil
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from service.intake import sniff

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
_CHUNK = 1 << 20
_HEAD = 512  # enough for the tar magic ("ustar" at offset 257)
_ARCHIVE_MAGIC = (
    (b"PK\x03\x04", "zip archive"), (b"PK\x05\x06", "zip archive"), (b"PK\x07\x08", "zip archive"),
    (b"\x1f\x8b", "gzip-compressed file"), (b"BZh", "bzip2-compressed file"), (b"\xfd7zXZ\x00", "xz-compressed file"),
)
_READ_ERRORS = (OSError, zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, lzma.LZMAError)


@dataclass
class Entry:
    """One job item: ``path`` (relative to the job folder) for an accepted image, else ``refused``."""

    name: str  # as given in the archive / upload, for the user
    path: str | None = None
    refused: str | None = None  # why (when not accepted)
    slug: str = "refused-entry"


@dataclass
class Limits:
    formats: list[str]
    max_entry_bytes: int
    max_total_bytes: int
    max_entries: int


def unsafe_name(name: str) -> str | None:
    """Why an archive member name is unsafe, or None."""
    if not name:
        return "empty name"
    if "\x00" in name:
        return "NUL character in the name"
    unified = name.replace("\\", "/")
    if unified.startswith("/") or re.match(r"^[A-Za-z]:", unified):
        return "absolute path"
    depth = 0
    for part in PurePosixPath(unified).parts:
        if part == "..":
            depth -= 1
            if depth < 0:
                return "path escapes the archive ('..')"
        elif part not in ("", "."):
            depth += 1
    return None


def archive_kind(head: bytes) -> str | None:
    """What kind of archive the first bytes announce (None: nothing archive-like)."""
    for magic, name in _ARCHIVE_MAGIC:
        if head.startswith(magic):
            return name
    if head[257:262] == b"ustar":
        return "tar archive"
    return None


def image_kind(head: bytes, formats: list[str]) -> str | None:
    """The allowed format the bytes start with, or None."""
    kind = sniff(head).upper()
    return kind if kind in formats else None


class Extractor:
    def __init__(self, job_dir: Path, limits: Limits):
        self.job_dir = job_dir
        self.files = job_dir / "files"
        self.limits = limits
        self.entries: list[Entry] = []
        self.total = 0
        self.skipped = 0  # entries past max_entries, reported as one record

    def run(self, uploads: list[tuple[Path, str]]) -> list[Entry]:
        if self.files.exists():  # a restart during extraction: start it over
            shutil.rmtree(self.files)
        self.files.mkdir(parents=True)
        for path, original in uploads:
            self.upload(path, original)
        if self.skipped:
            self.entries.append(Entry(f"({self.skipped} more entries)",
                                      refused=f"the job's entry limit ({self.limits.max_entries}) was reached"))
        return self.entries

    # --- one upload ----------------------------------------------------------------------------------
    def upload(self, path: Path, original: str) -> None:
        with open(path, "rb") as fh:
            head = fh.read(_HEAD)
        if image_kind(head, self.limits.formats):
            with open(path, "rb") as fh:
                self.accept(original, fh, head_checked=True)
            return
        try:
            if zipfile.is_zipfile(path):
                return self.zip(path, original)
            if tarfile.is_tarfile(path):
                return self.tar(path, original)
        except _READ_ERRORS as exc:
            self.refuse(original, f"the archive cannot be read ({type(exc).__name__}: {exc})", "invalid-archive")
            return
        if kind := archive_kind(head):
            what = "no end-of-central-directory record" if kind == "zip archive" else "no tar archive inside"
            self.refuse(original, f"starts like a {kind} but cannot be read as a zip/tar archive: truncated or "
                        f"corrupt ({what}; {path.stat().st_size} bytes received)", "invalid-archive")
            return
        self.refuse(original, f"neither an allowed image nor a zip/tar archive (looks like {sniff(head)})",
                    "unsupported-image")

    def zip(self, path: Path, original: str) -> None:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.is_dir():
                    continue
                if not self.room(info.filename):
                    continue
                name = info.filename
                mode = info.external_attr >> 16
                kind = stat.S_IFMT(mode)
                if why := unsafe_name(name):
                    self.refuse(name, why)
                elif kind == stat.S_IFLNK:
                    self.refuse(name, "symbolic link")
                elif kind not in (0, stat.S_IFREG):
                    self.refuse(name, "device or special file")
                elif info.flag_bits & 0x1:
                    self.refuse(name, "encrypted entry")
                elif info.file_size > self.limits.max_entry_bytes:
                    self.refuse(name, f"{info.file_size} bytes is more than the entry cap ({self.limits.max_entry_bytes})")
                else:
                    try:
                        with archive.open(info) as src:
                            self.accept(name, src)
                    except (*_READ_ERRORS, NotImplementedError) as exc:
                        self.refuse(name, f"corrupt entry ({type(exc).__name__}: {exc})", "invalid-archive")

    def tar(self, path: Path, original: str) -> None:
        with tarfile.open(path, "r:*") as archive:
            for member in archive:
                if member.isdir():
                    continue
                if not self.room(member.name):
                    continue
                name = member.name
                if why := unsafe_name(name):
                    self.refuse(name, why)
                elif member.issym():
                    self.refuse(name, f"symbolic link (to {member.linkname!r})")
                elif member.islnk():
                    self.refuse(name, f"hard link (to {member.linkname!r})")
                elif not member.isreg():
                    self.refuse(name, "device, FIFO or other special file")
                elif member.size > self.limits.max_entry_bytes:
                    self.refuse(name, f"{member.size} bytes is more than the entry cap ({self.limits.max_entry_bytes})")
                else:
                    src = archive.extractfile(member)
                    if src is None:
                        self.refuse(name, "not a regular file")
                        continue
                    try:
                        with src:
                            self.accept(name, src)
                    except _READ_ERRORS as exc:
                        self.refuse(name, f"corrupt entry ({type(exc).__name__}: {exc})", "invalid-archive")

    # --- entries -------------------------------------------------------------------------------------
    def room(self, name: str) -> bool:
        if len(self.entries) >= self.limits.max_entries:
            self.skipped += 1
            return False
        return True

    def refuse(self, name: str, why: str, slug: str = "refused-entry") -> None:
        self.entries.append(Entry(name, refused=why, slug=slug))

    def accept(self, name: str, src: IO[bytes], head_checked: bool = False) -> None:
        """Copy ``src`` into the job folder, counting bytes; refuse non-images and oversize entries."""
        index = len(self.entries)
        base = _SAFE.sub("_", PurePosixPath(name.replace("\\", "/")).name)[-80:] or "entry"
        rel = f"files/{index:06d}-{base}"
        target = self.job_dir / rel
        size = 0
        head = b""
        cap = self.limits.max_entry_bytes
        with open(target, "wb") as out:
            while chunk := src.read(_CHUNK):
                if not head:
                    head = chunk[:64]
                size += len(chunk)
                if size > cap or self.total + size > self.limits.max_total_bytes:
                    break
                out.write(chunk)
        if size > cap:
            target.unlink()
            return self.refuse(name, f"more than the entry cap of {cap} bytes when decompressed")
        if self.total + size > self.limits.max_total_bytes:
            target.unlink()
            return self.refuse(name, f"the job's total size cap ({self.limits.max_total_bytes} bytes) was reached")
        if not head_checked and not image_kind(head, self.limits.formats):
            target.unlink()
            kind = "empty" if size == 0 else f"looks like {sniff(head)}"
            return self.refuse(name, f"not an image in an allowed format ({kind})", "unsupported-image")
        self.total += size
        self.entries.append(Entry(name, path=rel))
