"""Opening input files that may be compressed.

Interaction logs are often shipped compressed (Amazon's `reviews_Beauty_5.json.gz`, a
`ratings.csv.gz`, a release `.zip` holding one file). The file's last suffix names the
compression; every reader then sees the same bytes as it would for the unpacked file, and
detection and error messages work on what is inside.
"""

from __future__ import annotations

import io
import lzma
import zipfile
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

import pyarrow as pa

from seqrec.errors import InputError

# Decompressed in Arrow's C++ streams: as fast as the bulk readers that consume them.
_ARROW_CODECS = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd", ".lz4": "lz4"}
COMPRESSED_SUFFIXES = (*_ARROW_CODECS, ".xz", ".zip")

# What a truncated or corrupt compressed stream raises while it is read: Arrow's codecs raise
# OSError ("Truncated compressed stream", "zlib inflate failed"), the standard library the rest.
DECOMPRESSION_ERRORS = (OSError, EOFError, lzma.LZMAError, zlib.error, zipfile.BadZipFile)

_READ_BUFFER = 1 << 20
# Bytes per block of pyarrow's bulk readers: big blocks parse fastest; a line must fit in one.
ARROW_BLOCK_SIZE = 16 << 20


def compression_of(path: Path) -> str | None:
    """The compression suffix of `path` ('.gz', '.zip', ...), or None for a plain file."""
    suffix = path.suffix.lower()
    return suffix if suffix in COMPRESSED_SUFFIXES else None


def content_name(path: Path) -> str:
    """The name of the data inside: `ratings.csv.gz` -> `ratings.csv`; for a zip, its member's name."""
    suffix = compression_of(path)
    if suffix is None:
        return path.name
    if suffix == ".zip":
        return Path(_zip_member(path).filename).name
    return path.name[: -len(suffix)]


@contextmanager
def open_input(path: Path) -> Iterator[BinaryIO]:
    """A buffered binary stream of the file's (decompressed) bytes."""
    suffix = compression_of(path)
    try:
        if suffix is None:
            handle: BinaryIO = open(path, "rb")
        elif suffix in _ARROW_CODECS:
            handle = io.BufferedReader(pa.input_stream(str(path), compression=_ARROW_CODECS[suffix]), _READ_BUFFER)
        elif suffix == ".xz":
            handle = lzma.open(path, "rb")
        else:
            archive = zipfile.ZipFile(path)
            handle = io.BufferedReader(archive.open(_zip_member(path, archive)), _READ_BUFFER)
    except (OSError, zipfile.BadZipFile) as exc:
        raise InputError(path, f"cannot be opened as a {suffix or 'plain'} file ({exc})") from exc
    try:
        yield handle
    except DECOMPRESSION_ERRORS as exc:
        raise corrupt_compressed(path, exc) from exc
    finally:
        handle.close()


@contextmanager
def arrow_source(path: Path) -> Iterator[str | BinaryIO]:
    """What pyarrow's bulk readers take: a plain file's path (read in parallel blocks), else the
    decompressed stream."""
    if compression_of(path) is None:
        yield str(path)
        return
    with open_input(path) as handle:
        yield handle


def corrupt_compressed(path: Path, exc: BaseException) -> InputError:
    if compression_of(path) is None:
        return InputError(path, f"cannot be read ({exc})")
    return InputError(path, f"compressed data is truncated or corrupt ({type(exc).__name__}: {exc})")


def read_head(path: Path, size: int = 1 << 16) -> bytes:
    """The first `size` bytes of the content; a corrupt stream past the first bytes is left to the reader."""
    with open_input(path) as handle:
        return handle.read(size)


def first_undecodable_line(path: Path) -> int | None:
    """Error path only: the 1-based number of the first line that is not UTF-8."""
    with open_input(path) as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return number
    return None


def _zip_member(path: Path, archive: zipfile.ZipFile | None = None) -> zipfile.ZipInfo:
    try:
        archive = archive or zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise InputError(path, f"not a readable zip archive ({exc})") from exc
    members = [info for info in archive.infolist() if not info.is_dir() and not Path(info.filename).name.startswith(".")]
    if len(members) != 1:
        names = [info.filename for info in members][:5]
        raise InputError(path, f"a zip input must hold exactly one file, this one holds {len(members)} {names}; unpack it and pass the log")
    return members[0]
