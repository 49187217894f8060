"""Store locations: local paths or fsspec URLs (s3://, gs://, file://), with credentials kept out of text.

Credentials come from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL,
GOOGLE_APPLICATION_CREDENTIALS, ... as fsspec and boto read them) and are never written into the
manifest, logs or error messages; a URL's user-info part is redacted wherever a location is shown.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

import fsspec
from fsspec.implementations.local import LocalFileSystem

_USERINFO = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@]*@")


def redact(location: str) -> str:
    """The location with any user:password@ part replaced, safe to log and to store."""
    return _USERINFO.sub(r"\1***@", location)


def is_url(location: str) -> bool:
    return "://" in location


def filesystem(location: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, root = fsspec.core.url_to_fs(location)
    return fs, root.rstrip("/")


def local_path(location: str) -> str | None:
    """The file-system path of a local location (a plain path or a file:// URL); None for remote URLs."""
    if not is_url(location):
        return location
    fs, root = filesystem(location)
    return root if isinstance(fs, LocalFileSystem) else None


def zarr_location(location: str) -> str:
    """What to hand Zarr: a file:// URL as its plain path (Zarr's LocalStore creates the directories a
    nested array needs; fsspec's local file system does not), any other URL unchanged."""
    path = local_path(location)
    return location if path is None else path


def join(location: str, name: str) -> str:
    if not is_url(location):
        return f"{location.rstrip('/')}/{name}"
    parts = urlsplit(location)
    return urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/" + name))


def exists(location: str) -> bool:
    fs, root = filesystem(location)
    return fs.exists(root)


def remove(location: str) -> None:
    fs, root = filesystem(location)
    if fs.exists(root):
        fs.rm(root, recursive=True)
