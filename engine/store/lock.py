"""One writer per store: a lock object beside the store that names its owner.

The lock is `STORE.lock` beside the store (so replacing the store never removes it), holding host,
pid, user and start time. A second `tributary index` on a locked store is refused with the owner's
details. Stale locks: a lock whose host is this machine and whose pid is no longer alive is taken
over (logged as a warning); a lock held from another host is never broken automatically —
`tributary index --break-lock` removes it once you have made sure that run is gone. Local stores
(plain paths and file:// URLs) create the lock with O_EXCL, so two writers racing on one file system
cannot both win, and remove a stale lock under a flock of its directory after reading it again, so
two writers that both found it stale cannot remove each other's new lock; object stores have no
exclusive create, so the lock is written, read back and kept only if it is still ours.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator

from engine.errors import TributaryError
from engine.store.location import filesystem, local_path, redact

log = logging.getLogger(__name__)
LOCK_SUFFIX = ".lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner_text(owner: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("started", 0)))
    return f"host {owner.get('host')} pid {owner.get('pid')} user {owner.get('user')} since {started}"


class StoreLock:
    def __init__(self, store_location: str, break_lock: bool = False):
        self.location = store_location.rstrip("/") + LOCK_SUFFIX
        self.store_location = store_location
        self.break_lock = break_lock
        self.owner = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "user": _user(),
            "started": time.time(),
            "token": uuid.uuid4().hex,
        }
        self.held = False

    def _read(self) -> dict | None:
        fs, path = filesystem(self.location)
        try:
            return json.loads(fs.cat_file(path))
        except FileNotFoundError:
            return None
        except (ValueError, OSError):
            return {"host": "?", "pid": -1, "user": "?", "started": 0, "token": "unreadable"}

    def _is_stale(self, owner: dict) -> bool:
        return owner.get("host") == socket.gethostname() and not _pid_alive(int(owner.get("pid", -1)))

    def acquire(self) -> None:
        fs, path = filesystem(self.location)
        current = self._read()
        if current is not None:
            if self.break_lock or self._is_stale(current):
                reason = "--break-lock" if self.break_lock else "its process is gone"
                log.warning(
                    "removing the lock of %s on %s (%s)", _owner_text(current), redact(self.store_location), reason
                )
                self._remove(current)
            else:
                raise TributaryError(
                    f"store {redact(self.store_location)} is being written by {_owner_text(current)}; wait for "
                    "that run to finish, or, if it is gone, run again with --break-lock"
                )
        payload = json.dumps(self.owner).encode()
        if local_path(self.location) is not None:  # a plain path or a file:// URL
            fs.makedirs(os.path.dirname(path), exist_ok=True)
            try:
                descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                raise TributaryError(
                    f"store {redact(self.store_location)} was locked by another writer just now; try again later"
                ) from None
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(payload)
        else:
            fs.pipe_file(path, payload)
            if (self._read() or {}).get("token") != self.owner["token"]:
                raise TributaryError(f"store {redact(self.store_location)} was locked by another writer just now")
        self.held = True

    def _remove(self, judged: dict) -> None:
        """Remove the lock judged stale (or broken), and only that one.

        Between reading a lock and removing it, another writer may have taken the stale lock over and
        written its own live one. On a local file system the removal therefore re-reads the lock under an
        exclusive flock of the lock's directory, which every takeover holds: the lock it removes is the
        one it judged. (Object stores have no such lock; there the window stays.)
        """
        fs, path = filesystem(self.location)
        local = local_path(self.location)
        if local is None:
            fs.rm_file(path)
            return
        with _takeover_guard(os.path.dirname(os.path.abspath(local))):
            now = self._read()
            if now is None:
                return  # removed meanwhile: the exclusive create below decides who writes next
            if now != judged:
                raise TributaryError(
                    f"store {redact(self.store_location)} was locked by {_owner_text(now)} just now; wait for "
                    "that run to finish"
                )
            os.remove(local)

    def release(self) -> None:
        if not self.held:
            return
        fs, path = filesystem(self.location)
        if (self._read() or {}).get("token") == self.owner["token"]:
            fs.rm_file(path)
        self.held = False

    def __enter__(self) -> StoreLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def _takeover_guard(directory: str) -> Iterator[None]:
    """An exclusive flock of the directory (held by one takeover at a time on this host; no file is left
    behind). Without flock (Windows, or a file system that refuses it) there is no guard."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        except OSError as error:
            log.debug("no flock on %s (%s): stale-lock takeover is unguarded", directory, error)
        yield
    finally:
        os.close(descriptor)  # releases the flock


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "?"
