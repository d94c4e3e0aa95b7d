"""Private files: written whole (temp file + rename), mode 0600 from the first byte on.

Everything the mtls package writes goes through `write_private`, so that no key is ever
readable by the group or others, not even for the moment between create and chmod, and no
reader (python's ssl, Envoy, another agent) ever sees a half-written file.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
from pathlib import Path

log = logging.getLogger(__name__)

FILE_MODE = 0o600
DIR_MODE = 0o700


class InsecureFileError(PermissionError):
    """A key file (or its directory) that others may read or write."""


def ensure_private_dir(directory: Path) -> Path:
    """Create `directory` (and parents) with mode 0700 if missing.

    An existing directory that the group or others can *write* is refused (they could replace
    the files in it); one they can only read or enter is tightened to 0700 and logged, since
    nothing in it is meant for them and tightening cannot break a reader that is us.
    """
    directory.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    st = directory.lstat()
    if not stat.S_ISDIR(st.st_mode):
        raise InsecureFileError(f"{directory} is not a directory")
    if st.st_uid != os.geteuid():
        raise InsecureFileError(f"{directory} belongs to uid {st.st_uid}, not to {os.geteuid()}")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:
        raise InsecureFileError(
            f"{directory} is writable by group or others (mode {mode:04o}); "
            f"run: chmod 700 {directory}"
        )
    if mode != DIR_MODE:
        os.chmod(directory, DIR_MODE)
        log.warning("tightened %s from mode %04o to %04o", directory, mode, DIR_MODE)
    return directory


def write_private(path: Path, data: bytes) -> None:
    """Atomically replace `path` with `data`, mode 0600, durable when this returns."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)  # the umask can only remove bits; say exactly what we mean
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def read_private(path: Path) -> bytes:
    """Read a key file, refusing one that group or others can read or write.

    Refused rather than fixed: a key that was readable may already have been copied, so the
    operator has to decide whether to rotate it; silently chmod-ing would hide that.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        mode = stat.S_IMODE(st.st_mode)
        if not stat.S_ISREG(st.st_mode):
            raise InsecureFileError(f"{path} is not a regular file")
        if mode & 0o077:
            raise InsecureFileError(
                f"refusing to use {path}: mode {mode:04o} lets group or others access it. "
                f"The key may have been exposed: replace it (or, if you are sure it was not "
                f"read, chmod 600 {path})"
            )
        if st.st_uid != os.geteuid():
            raise InsecureFileError(f"refusing to use {path}: owned by uid {st.st_uid}, not us")
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
