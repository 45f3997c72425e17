"""One writer per workdir: an advisory lock naming its holder, and atomic file writes.

    with workdir.lock("runs/x", command="etjax train"):
      ...   # a second `etjax train` on runs/x fails with WorkdirLockedError

The lock is `workdir/.etjax.lock`, held with `fcntl.flock` (the kernel drops it when
the holder dies, however it dies; Linux maps it to byte-range locks on NFS; unlike
POSIX record locks it is not lost when the same process closes another descriptor of
the file) and holding a JSON note of the holder: pid, host, start time, command. A second process
is refused with that note. A lock file left by a dead process is not locked, so the
next process takes it over (saying whose it was); no pid guessing is involved, so two
processes racing for a stale lock cannot both win.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import tempfile
import time
from typing import Iterator, Optional

LOCK_FILE = ".etjax.lock"


class WorkdirLockedError(RuntimeError):
  """Another live process holds the workdir's lock; the message names it."""


def _describe(note: dict) -> str:
  started = note.get("start_time")
  when = (datetime.datetime.fromtimestamp(started).isoformat(timespec="seconds")
          if isinstance(started, (int, float)) else "an unknown time")
  return (f"pid {note.get('pid', '?')} on host {note.get('host', '?')}, started "
          f"{when} ({note.get('command', '?')})")


def _read_note(fd: int) -> dict:
  os.lseek(fd, 0, os.SEEK_SET)
  data = b""
  while chunk := os.read(fd, 65536):
    data += chunk
  try:
    note = json.loads(data.decode("utf-8")) if data.strip() else {}
  except (ValueError, UnicodeDecodeError):
    note = {}
  return note if isinstance(note, dict) else {}


def _writable_dir(workdir: str) -> None:
  """Creates `workdir`, failing with an OSError that names it and says why."""
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise OSError(e.errno, f"cannot create workdir {workdir}: {e.strerror}") from None
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise PermissionError(errno.EACCES, f"workdir {workdir} is not writable")


@contextlib.contextmanager
def lock(workdir: str, command: Optional[str] = None) -> Iterator[dict]:
  """Holds `workdir`'s lock for the duration; yields the note written into it.

  Raises:
    WorkdirLockedError: another live process holds it (named in the message).
    OSError: the workdir cannot be created or written (read-only, permissions).
  """
  workdir = os.path.abspath(workdir)
  _writable_dir(workdir)
  path = os.path.join(workdir, LOCK_FILE)
  try:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:
    raise OSError(e.errno, f"cannot write the lock file {path}: {e.strerror}") from None
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno not in (errno.EACCES, errno.EAGAIN, errno.EWOULDBLOCK):
        raise
      raise WorkdirLockedError(
          f"workdir {workdir} is in use by {_describe(_read_note(fd))}; wait for it to "
          f"finish or use another workdir (lock file {path})") from None
    previous = _read_note(fd)
    if previous:
      # The file outlived its holder (a kill or crash): the kernel released its lock.
      logging.warning("took over the lock of %s, which is no longer running",
                      _describe(previous))
    note = {"pid": os.getpid(), "host": socket.gethostname(), "start_time": time.time(),
            "command": command or " ".join(sys.argv)}
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(note).encode("utf-8"))
    os.fsync(fd)
    try:
      yield note
    finally:
      # An empty file means "released cleanly"; the lock goes with the descriptor.
      os.ftruncate(fd, 0)
  finally:
    os.close(fd)


def holder(workdir: str) -> Optional[dict]:
  """The note of the live process holding `workdir`'s lock, or None."""
  path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
  if not os.path.exists(path):
    return None
  fd = os.open(path, os.O_RDWR)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      return _read_note(fd)
    fcntl.flock(fd, fcntl.LOCK_UN)
    return None
  finally:
    os.close(fd)


def write_atomic(path: str, data: bytes | str) -> str:
  """Writes `data` to `path` through a temporary file in the same directory and a
  rename, so readers see the old file or the whole new one, never a part. The
  directory must exist (checked first, with a message naming it). Returns `path`."""
  directory = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(directory):
    raise FileNotFoundError(errno.ENOENT, f"cannot write {path}: directory {directory} "
                            "does not exist")
  if isinstance(data, str):
    data = data.encode("utf-8")
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.",
                             suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise
  return path
