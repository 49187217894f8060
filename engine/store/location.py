"""Store locations: local paths or fsspec URLs (s3://, gs://, file://), with credentials kept out of text.

Credentials come from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL,
GOOGLE_APPLICATION_CREDENTIALS, ... as fsspec and boto read them) and are never written into the
manifest, logs or error messages; a URL's user-info part is redacted wherever a location is shown.

S3 without credentials: boto would ask the EC2 instance-metadata service (169.254.169.254) for them,
from any machine, and fail later with a traceback. Unless the user set AWS_EC2_METADATA_DISABLED
(`false` on EC2 with an instance role), it is set to `true` before an S3 location is opened, and a
location with no credentials found is refused at once, naming what to set.
"""

from __future__ import annotations

import os
import re
from urllib.parse import urlsplit, urlunsplit

import fsspec
import fsspec.config
from fsspec.implementations.local import LocalFileSystem

from engine.errors import TributaryError

_USERINFO = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@]*@")
_S3_SCHEMES = ("s3", "s3a")
_aws_credentials_found = False


def redact(location: str) -> str:
    """The location with any user:password@ part replaced, safe to log and to store."""
    return _USERINFO.sub(r"\1***@", location)


def is_url(location: str) -> bool:
    return "://" in location


def _require_object_store_credentials(location: str) -> None:
    """For an S3 location: no instance-metadata lookups unless asked for, and credentials found, or a
    TributaryError that says what to set."""
    global _aws_credentials_found
    if urlsplit(location).scheme not in _S3_SCHEMES or _aws_credentials_found:
        return
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    configured = fsspec.config.conf.get("s3", {})  # s3fs options from fsspec's config (FSSPEC_S3_*, s3.json)
    if any(configured.get(option) for option in ("anon", "key", "token", "profile", "session")):
        return
    try:
        import botocore.exceptions
        import botocore.session
    except ImportError:
        return  # s3fs, when it is missing, says so itself
    try:
        found = botocore.session.Session().get_credentials() is not None
    except botocore.exceptions.BotoCoreError as error:
        raise TributaryError(f"{redact(location)}: the AWS configuration is unusable: {error}") from None
    if not found:
        raise TributaryError(
            f"{redact(location)}: no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(or AWS_PROFILE, or a profile in ~/.aws); on an EC2 instance with an instance role, set "
            "AWS_EC2_METADATA_DISABLED=false"
        )
    _aws_credentials_found = True


def filesystem(location: str) -> tuple[fsspec.AbstractFileSystem, str]:
    _require_object_store_credentials(location)
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
    _require_object_store_credentials(location)
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
