"""One run owns an output directory: an OS-level lock next to it, held from before anything is written until the
run ends, so a second run into the same `output_dir` stops at once instead of replacing the first one's model and
writing into its checkpoints.

The lock is `filelock`'s `flock(2)` lock on `<output_dir>.lock`. The kernel drops it when its process dies, however
it dies, so a lock file that a `kill -9` left behind is not held: the next run simply takes it (and says so). The
holder's pid, host and start time go into `<output_dir>.lock.json`, for the message a second run prints. Both files
sit next to the output directory, never inside it, and are removed when the run ends.

Only the standard library and `filelock` are imported, so a process can take the lock before it loads torch.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class OutputDirBusyError(FileExistsError):
    """Another live run holds the lock of this output directory."""


def lock_files(directory: str | os.PathLike) -> tuple[Path, Path]:
    """The lock file and the holder record of `directory`: `<directory>.lock` and `<directory>.lock.json`."""
    final = Path(directory).expanduser().resolve()
    return final.with_name(final.name + ".lock"), final.with_name(final.name + ".lock.json")


class OutputDirLock:
    """Exclusive ownership of an output directory (and of `<directory>.checkpoints`, named after it) by one run.

    A context manager: `with OutputDirLock(output_dir): ...`. Acquiring never waits.

    Args:
        directory: the output directory; it need not exist yet.
        field: how messages name the directory, e.g. ``"`output_dir`"``.

    Raises (on acquire):
        OutputDirBusyError: another live process holds it; the message names the holder and the fix.
        ValueError: the lock cannot be written next to `directory` (its parent cannot be created or written).
    """

    def __init__(self, directory: str | os.PathLike, field: str = "`output_dir`") -> None:
        self.directory = Path(directory).expanduser().resolve()
        self.field = field
        self.lock_file, self.owner_file = lock_files(self.directory)
        self._lock: Any = None
        self._created: list[Path] = []  # parent directories made for the lock, removed again if left empty

    @property
    def is_held(self) -> bool:
        return self._lock is not None

    def acquire(self) -> OutputDirLock:
        from filelock import FileLock, Timeout

        if self._lock is not None:
            return self
        self._make_parents()
        lock = FileLock(str(self.lock_file), timeout=0)
        try:
            self._take(lock, Timeout)
        except NotImplementedError:  # filelock < 4 on a filesystem without flock (some NFS/Lustre mounts)
            logger.warning("%s %s: this filesystem has no file locks, so a second run into it would not be "
                           "detected", self.field, self.directory)
            return self
        except BaseException:
            self._remove_created_parents()
            raise
        self._lock = lock
        try:
            stale = read_owner(self.owner_file)
            if stale is not None:
                logger.info("%s %s: taking over the lock of %s, which ended without releasing it", self.field,
                            self.directory, describe_owner(stale))
            self._write_owner()
        except BaseException:
            self.release()
            raise
        return self

    def _take(self, lock: Any, timeout_error: type[Exception]) -> None:
        for _ in range(2):
            try:
                lock.acquire()
                return
            except timeout_error:
                if self.lock_file.exists():
                    raise OutputDirBusyError(self._busy_message(read_owner(self.owner_file))) from None
                # filelock reports a lock file it could not create (e.g. under /proc) as one it could not take
                error = _creation_error(self.lock_file.parent)
                if error is not None:
                    raise self._unwritable(error) from None
                # or the holder removed it between the two looks: try once more
            except OSError as e:
                raise self._unwritable(e) from None
        raise OutputDirBusyError(self._busy_message(None))

    def release(self) -> None:
        """Remove the holder record and the lock file (while still holding the lock), then release it."""
        lock, self._lock = self._lock, None
        if lock is not None:
            try:
                # unlinked while still held, never after: a run that opened the old file just before and wins
                # it just after holds an unlinked inode, which filelock detects (st_nlink == 0) and drops
                for path in (self.owner_file, self.lock_file):
                    path.unlink(missing_ok=True)
            finally:
                lock.release()
        self._remove_created_parents()

    def __enter__(self) -> OutputDirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _make_parents(self) -> None:
        missing = []
        parent = self.lock_file.parent
        while not parent.exists() and parent != parent.parent:
            missing.append(parent)
            parent = parent.parent
        try:
            self.lock_file.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise self._unwritable(e) from None
        self._created = missing  # deepest first

    def _remove_created_parents(self) -> None:
        """A run that fails before it writes anything leaves no directory behind, not even the parents it made."""
        for path in self._created:
            try:
                path.rmdir()  # only when empty: the run's output, or another run's files, keep it
            except OSError:
                break
        self._created = []

    def _write_owner(self) -> None:
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "argv": sys.argv}
        tmp = self.owner_file.with_name(f".{self.owner_file.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(record) + "\n", encoding="utf-8")
        os.replace(tmp, self.owner_file)  # a second run never reads a half-written record

    def _busy_message(self, owner: dict[str, Any] | None) -> str:
        holder = describe_owner(owner) if owner else "another run (it has not recorded its pid yet)"
        pid = owner.get("pid") if owner else None
        if isinstance(pid, int) and owner.get("host") == socket.gethostname() and not pid_alive(pid):
            holder += ", which has ended, but a process it started still holds the lock: retry in a moment"
        return (f"{self.field} {str(self.directory)!r} is in use by {holder}. Wait for that run to finish or stop "
                f"it, or choose another {self.field}")

    def _unwritable(self, e: OSError) -> ValueError:
        return ValueError(f"{self.field} {str(self.directory)!r} cannot be written ({e.strerror or e}): choose a "
                          "directory you can create and write to")


def read_owner(path: str | os.PathLike) -> dict[str, Any] | None:
    """The holder record written by [`OutputDirLock`], or None when there is none (or it cannot be read)."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def describe_owner(owner: dict[str, Any]) -> str:
    """``pid 4242 on host-a (started 2025-06-01 12:00:03 +0000)``."""
    return f"pid {owner.get('pid', '?')} on {owner.get('host', '?')} (started {owner.get('started', '?')})"


def _creation_error(directory: Path) -> OSError | None:
    """Why a file cannot be created in `directory`, or None when it can."""
    try:
        fd, name = tempfile.mkstemp(prefix=".hf-cpt-probe-", dir=directory)
    except OSError as e:
        return e
    os.close(fd)
    os.unlink(name)
    return None


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host (another user's process counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
