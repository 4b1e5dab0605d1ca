"""Files at a URI: a local path, ``file:///path`` or ``s3://bucket/prefix``.

Every module that reads or writes data, checkpoints or model bundles goes through
these few functions, so one code path serves a laptop and a cluster. S3 access uses
the standard AWS configuration, resolved by boto3 exactly as the AWS CLI would:
``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``, ``AWS_PROFILE`` and the profile's
``endpoint_url`` / ``region`` in ``~/.aws/config``, keys from the environment or the
shared credentials file. Any S3-compatible store (AWS S3, MinIO, Ceph, SeaweedFS)
works the same.

Credentials are never copied into the filesystem object: when a filesystem travels
to a Ray worker it carries the endpoint and region only, and the worker resolves its
own credentials through the same AWS chain.
"""

from __future__ import annotations

import functools
import os
import posixpath
from urllib.parse import urlsplit

import boto3
import pyarrow.fs as pafs

SCHEMES = ("", "file", "s3")  # "" is a plain local path


class StorageError(OSError):
    """A location that exists in principle but cannot be used: a bucket we may not
    read, a wrong key, an unreachable endpoint, an unsupported scheme."""


def _split_scheme(uri: str) -> tuple[str, str]:
    """'s3://bucket/prefix' -> ('s3', 'bucket/prefix'); '/a/b' -> ('', '/a/b')."""
    if "://" not in uri:
        return "", uri
    scheme, rest = uri.split("://", 1)
    scheme = scheme.lower()
    if scheme not in SCHEMES:
        raise StorageError(f"unsupported location {uri!r}: use a local path, file:// or s3://")
    return scheme, rest


def configured_s3_endpoint() -> str | None:
    """The S3 endpoint the standard AWS configuration names, or None for AWS itself.

    boto3 resolves ``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL`` and the selected
    profile's ``endpoint_url`` (also its ``services`` section) in the documented order.
    """
    endpoint = boto3.session.Session().client("s3").meta.endpoint_url
    host = urlsplit(endpoint).hostname or ""
    # boto3 falls back to AWS's own endpoint when nothing is configured; leave that to
    # the AWS SDK inside pyarrow, which also finds each bucket's region by itself.
    return None if host.endswith("amazonaws.com") else endpoint


def s3_filesystem() -> pafs.S3FileSystem:
    """A pyarrow S3 filesystem for the endpoint and region of the AWS configuration."""
    # Resolving the configuration costs a boto3 client (~0.1 s); reuse it until an AWS_*
    # variable changes (a new profile, endpoint or key).
    return _s3_filesystem_for(tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_"))))


@functools.lru_cache(maxsize=8)
def _s3_filesystem_for(aws_environment: tuple[tuple[str, str], ...]) -> pafs.S3FileSystem:
    options: dict[str, str] = {}
    region = boto3.session.Session().region_name
    if region:
        options["region"] = region
    endpoint = configured_s3_endpoint()
    if endpoint:
        options["endpoint_override"] = endpoint  # a URL with its scheme, e.g. http://127.0.0.1:8333
    return pafs.S3FileSystem(**options)


def _location(uri: str) -> tuple[str, str]:
    """('s3', 'bucket/prefix') or ('', '/absolute/local/path') or ('file', '/absolute/path')."""
    scheme, rest = _split_scheme(str(uri))
    if scheme == "s3":
        path = rest.strip("/")
        if not path:
            raise StorageError(f"{uri!r} names no bucket")
        return scheme, path
    local = rest if scheme == "" else "/" + rest.lstrip("/")
    return scheme, posixpath.abspath(posixpath.expanduser(local))


def path_of(uri: str) -> str:
    """The path of ``uri`` inside its filesystem: 'bucket/prefix' for s3://, absolute for local."""
    return _location(uri)[1]


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem holding ``uri`` and the path inside it (no scheme, no trailing slash)."""
    scheme, path = _location(uri)
    return (s3_filesystem() if scheme == "s3" else pafs.LocalFileSystem()), path


def _with_scheme(uri: str, path: str) -> str:
    """Write ``path`` (inside the filesystem of ``uri``) in the same style as ``uri``."""
    scheme, _ = _split_scheme(str(uri))
    return f"{scheme}://{path}" if scheme else path


def join(uri: str, *parts: str) -> str:
    """``join('s3://b/data', 'part-00000.parquet') == 's3://b/data/part-00000.parquet'``."""
    scheme, rest = _split_scheme(str(uri))
    path = posixpath.join(rest.rstrip("/") or "/", *(p.strip("/") for p in parts))
    return f"{scheme}://{path}" if scheme else path


def _info(uri: str) -> pafs.FileInfo:
    fs, path = resolve(uri)
    try:
        return fs.get_file_info(path)
    except OSError as error:
        raise StorageError(f"cannot read {uri}: {error}") from error


def exists(uri: str) -> bool:
    """Whether a file or a non-empty folder/prefix (or a bucket) is at ``uri``."""
    return _info(uri).type != pafs.FileType.NotFound


def is_file(uri: str) -> bool:
    return _info(uri).type == pafs.FileType.File


def list_files(uri: str, suffix: str | tuple[str, ...] = "", recursive: bool = True) -> list[str]:
    """Sorted URIs of the files under ``uri`` whose names end with ``suffix``
    (case-insensitive). A file URI lists itself. A missing location is a FileNotFoundError;
    one we may not read is a StorageError."""
    return list(list_file_sizes(uri, suffix, recursive))


def list_file_sizes(uri: str, suffix: str | tuple[str, ...] = "", recursive: bool = True) -> dict[str, int]:
    """{URI: size in bytes} of :func:`list_files`, in its order, from the same single listing."""
    fs, path = resolve(uri)
    suffixes = tuple(s.lower() for s in ((suffix,) if isinstance(suffix, str) else suffix))
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"{uri} does not exist")
        if info.type == pafs.FileType.File:
            infos = [info]
        else:
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive))
    except FileNotFoundError:
        raise
    except OSError as error:
        raise StorageError(f"cannot list {uri}: {error}") from error
    files = sorted((i.path, i.size) for i in infos if i.type == pafs.FileType.File and i.path.lower().endswith(suffixes))
    return {_with_scheme(uri, path): size for path, size in files}


def relative_path(root: str, uri: str) -> str:
    """``relative_path('s3://b/data', 's3://b/data/cats/1.png') == 'cats/1.png'``."""
    (_, root_path), (_, path) = _location(root), _location(uri)
    return posixpath.relpath("/" + path.lstrip("/"), "/" + root_path.lstrip("/"))


def open_input(uri: str) -> pafs.NativeFile:
    """A seekable binary file (what Parquet readers and Pillow need). Close it, or use ``with``."""
    fs, path = resolve(uri)
    try:
        return fs.open_input_file(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri} does not exist") from None
    except OSError as error:
        raise StorageError(f"cannot read {uri}: {error}") from error


def open_output(uri: str) -> pafs.NativeFile:
    """A binary output stream; local parent folders are created. Close it to commit the file."""
    fs, path = resolve(uri)
    try:
        if isinstance(fs, pafs.LocalFileSystem):
            fs.create_dir(posixpath.dirname(path), recursive=True)
        return fs.open_output_stream(path)
    except OSError as error:
        raise StorageError(f"cannot write {uri}: {error}") from error


def delete(uri: str) -> None:
    """Delete the file, or the folder / prefix and everything under it, at ``uri``; nothing
    there is fine."""
    fs, path = resolve(uri)
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            fs.delete_file(path)
        elif info.type == pafs.FileType.Directory:
            fs.delete_dir(path)
    except OSError as error:
        raise StorageError(f"cannot delete {uri}: {error}") from error


def read_bytes(uri: str) -> bytes:
    with open_input(uri) as file:
        return file.read()


def write_bytes(uri: str, data: bytes) -> None:
    with open_output(uri) as file:
        file.write(data)
