"""WebDataset tar shards (img2dataset's default output) as image-caption rows: plain Python, no Ray.

    shards = shard_uris("s3://bucket/laion/{00000..09999}.tar")   # or a folder, or one .tar
    for sample in read_samples(shards[0]): ...                     # Sample(key, caption, image, extra, problem)

A shard holds samples as consecutive members sharing a key (the member name up to its first
dot, as webdataset groups them): ``000000001.jpg`` + ``000000001.txt`` + ``000000001.json``.
The image is the first of ``.jpg .jpeg .png .webp``, the caption the ``.txt``; the ``.json``
sidecar's scalar fields are kept (img2dataset writes ``url``, ``width``, ``height``, ``status``...).

Brace lists follow webdataset's and img2dataset's notation: ``{00000..00099}`` is a zero-padded
range, ``{a,b,c}`` a choice; several braces multiply. A list that matches no shard, or a first
shard that is not a tar, is an error before anything is read; a shard that breaks while being
read ends there: its lost sample is counted as ``truncated_shard`` (or the shard, when nothing of
it could be read, as ``unreadable_shard``).
"""

from __future__ import annotations

import itertools
import json
import logging
import posixpath
import re
import tarfile
from dataclasses import dataclass, field
from typing import Iterator, Optional

from dalle2.data import storage
from dalle2.data.schema import DatasetError

log = logging.getLogger(__name__)

TAR_SUFFIX = ".tar"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTENSION = "txt"
METADATA_EXTENSION = "json"
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(\d+)\.\.(\d+)$")


@dataclass
class Sample:
    key: str
    caption: Optional[str] = None
    image: Optional[bytes] = None
    extra: dict = field(default_factory=dict)  # the .json sidecar's scalar fields
    problem: Optional[str] = None  # a drop reason found while reading (truncated_shard)


def expand_braces(pattern: str) -> list[str]:
    """All strings of a brace pattern, in order: ``a{0..2}`` -> a0 a1 a2 (zero padding kept)."""
    parts: list[list[str]] = []
    position = 0
    for match in _BRACE.finditer(pattern):
        parts.append([pattern[position : match.start()]])
        body = match.group(1)
        numbers = _RANGE.match(body)
        if numbers:
            low, high = numbers.groups()
            if int(high) < int(low):
                raise DatasetError(f"{pattern}: the range {{{body}}} runs backwards")
            width = len(low) if low.startswith("0") or len(low) == len(high) else 0
            parts.append([str(n).zfill(width) for n in range(int(low), int(high) + 1)])
        else:
            parts.append(body.split(","))
        position = match.end()
    parts.append([pattern[position:]])
    return ["".join(choice) for choice in itertools.product(*parts)]


def is_webdataset_source(src: str) -> bool:
    """A tar, a brace list, or a folder holding tar shards (and no Parquet)."""
    if "{" in src or src.lower().endswith(TAR_SUFFIX):
        return True
    try:
        return bool(storage.list_files(src, suffix=TAR_SUFFIX)) and not storage.list_files(src, suffix=".parquet")
    except FileNotFoundError:
        return False


def shard_uris(src: str) -> list[str]:
    """The shards that ``src`` names (brace list, one tar, or a folder of tars), each checked to
    exist; one DatasetError if none does, a warning for each missing one of a list."""
    if "{" in src:
        wanted = expand_braces(src)
        folders = sorted({posixpath.dirname(uri) for uri in wanted})
        present: set[str] = set()
        for folder in folders:
            try:
                present.update(storage.list_files(folder, suffix=TAR_SUFFIX, recursive=False))
            except FileNotFoundError:
                pass
        shards = [uri for uri in wanted if uri in present]
        if not shards:
            raise DatasetError(f"{src}: the brace list names {len(wanted)} shards and none exists")
        if len(shards) < len(wanted):
            missing = [uri for uri in wanted if uri not in present]
            log.warning("%d of %d shards of %s do not exist (first: %s); importing the rest", len(missing), len(wanted), src, missing[0])
    else:
        shards = storage.list_files(src, suffix=TAR_SUFFIX)
        if not shards:
            raise DatasetError(f"{src}: no {TAR_SUFFIX} shards there")
    check_tar(shards[0])
    return shards


def check_tar(uri: str) -> None:
    """A DatasetError unless ``uri`` starts with a tar header (reads 512 bytes)."""
    with storage.open_input(uri) as file:
        header = file.read(tarfile.BLOCKSIZE)
    try:
        tarfile.TarInfo.frombuf(header, tarfile.ENCODING, "surrogateescape")
    except tarfile.HeaderError as error:
        raise DatasetError(f"{uri}: not a tar file ({error})") from None


def count_samples(uri: str) -> int:
    """Samples in a shard: img2dataset's ``<shard>_stats.json`` (``successes``) when it is there,
    else a scan of the tar's member headers (the member data is seeked over, not read)."""
    stats = uri[: -len(TAR_SUFFIX)] + "_stats.json"
    if storage.exists(stats):
        try:
            return int(json.loads(storage.read_bytes(stats))["successes"])
        except (ValueError, KeyError, TypeError):
            pass  # not img2dataset's: count
    keys = set()
    with storage.open_input(uri) as file:
        try:
            with tarfile.open(fileobj=file, mode="r:") as archive:
                for member in archive:
                    if member.isfile():
                        keys.add(_split_name(member.name)[0])
        except (tarfile.TarError, EOFError, OSError) as error:
            log.warning("%s: counted %d samples before it broke: %s", uri, len(keys), error)
    return len(keys)


def _split_name(name: str) -> tuple[str, str]:
    """``dir/000001.jpg`` -> (``dir/000001``, ``jpg``): the key ends at the base name's first dot."""
    folder, base = posixpath.split(name)
    stem, _, extension = base.partition(".")
    return posixpath.join(folder, stem) if folder else stem, extension.lower()


def _sample(key: str, members: dict[str, bytes], prefix: str) -> Sample:
    image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
    caption = members[CAPTION_EXTENSION].decode("utf-8", errors="replace") if CAPTION_EXTENSION in members else None
    extra = {}
    if METADATA_EXTENSION in members:
        try:
            metadata = json.loads(members[METADATA_EXTENSION])
        except ValueError:
            metadata = {}
        if isinstance(metadata, dict):
            extra = {k: v for k, v in metadata.items() if isinstance(v, (str, int, float, bool)) and k not in ("key", "caption", "image")}
    return Sample(key=f"{prefix}/{key}", caption=caption, image=image, extra=extra)


def read_samples(uri: str) -> Iterator[Sample]:
    """The samples of one shard, streamed (the tar is read once, front to back). Keys are
    ``<shard name>/<member key>``, unique across shards."""
    prefix = posixpath.splitext(posixpath.basename(uri))[0]
    key, members = None, {}
    with storage.open_input(uri) as file:
        try:
            with tarfile.open(fileobj=file, mode="r|") as archive:
                for member in archive:
                    if not member.isfile():
                        continue
                    member_key, extension = _split_name(member.name)
                    if member_key != key and key is not None:
                        yield _sample(key, members, prefix)
                        members = {}
                    key = member_key
                    members[extension] = archive.extractfile(member).read()
        except (tarfile.TarError, EOFError, OSError) as error:
            log.warning("%s breaks after %s: %s", uri, key, error)
            # A shard that breaks after some samples lost the one being read; one that gives
            # nothing (not a tar at all) is counted once as a whole.
            yield Sample(key=f"{prefix}/{key or 'start'}", problem="truncated_shard" if key else "unreadable_shard")
            return
    if key is not None:
        yield _sample(key, members, prefix)
