"""Durable file operations: fsync'ed writes, atomic replace, append-only .npy writers, the writer lock."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
from pathlib import Path
from typing import IO

import numpy as np

from alignfuse.errors import ConflictError

_NPY_HEADER_BYTES = 128  # fixed, so the shape can be rewritten in place when the file is complete


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync it (not atomic: ``path`` must be new/private)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write(path: Path, data: bytes) -> None:
    """Write beside (``path.tmp``), fsync, ``os.replace`` onto ``path``, fsync the directory."""
    tmp = path.with_name(path.name + ".tmp")
    write_durable(tmp, data)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def save_npy_durable(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())


def rmtree_quiet(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    d = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    body = repr(d).encode("latin1")
    total = _NPY_HEADER_BYTES
    pad = total - 10 - len(body) - 1
    if pad < 0:
        raise ValueError("npy header too long")
    header = body + b" " * pad + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header


class NpyAppender:
    """Writes a C-order ``.npy`` of rows ``[n, *tail]`` block by block (bounded memory); :meth:`close`
    fixes the row count in the header and fsyncs. The result is an ordinary ``.npy`` (``np.load`` works,
    including ``mmap_mode="r"``)."""

    def __init__(self, path: Path, dtype: np.dtype | type, tail: tuple[int, ...]) -> None:
        self.path = path
        self.dtype = np.dtype(dtype)
        self.tail = tuple(int(t) for t in tail)
        self.rows = 0
        self._f: IO[bytes] | None = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._f.write(_npy_header(self.dtype, (0, *self.tail)))

    def append(self, block: np.ndarray) -> None:
        assert self._f is not None, "appender closed"
        arr = np.ascontiguousarray(block, dtype=self.dtype)
        if tuple(arr.shape[1:]) != self.tail:
            raise ValueError(f"block shape {arr.shape} does not match tail {self.tail}")
        self._f.write(arr.tobytes())
        self.rows += int(arr.shape[0])

    def close(self) -> None:
        if self._f is None:
            return
        self._f.seek(0)
        self._f.write(_npy_header(self.dtype, (self.rows, *self.tail)))
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        self._f = None

    def abort(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class WriterLock:
    """An exclusive ``fcntl.flock`` on ``<collection>/writer.lock`` holding the owner's pid.
    A second writer (another process, or another open in this one) gets ConflictError naming the pid."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> WriterLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = ""
            with contextlib.suppress(OSError, ValueError):
                holder = os.pread(fd, 64, 0).decode().strip()
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                what_to_do = (
                    f"wait for it to finish, or stop it (kill {holder}) and re-run: a killed writer's "
                    "commits are kept and a build resumes"
                    if holder.isdigit()
                    else "wait for it to finish and try again"
                )
                raise ConflictError(
                    f"collection {self.path.parent} is being written by another writer"
                    + (f" (pid {holder})" if holder else "")
                    + f": {what_to_do}",
                    detail={"pid": int(holder) if holder.isdigit() else None},
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    @property
    def fd(self) -> int | None:
        """The locked descriptor (forked children must close it: see :func:`close_inherited_lock`)."""
        return self._fd


def close_inherited_lock(fd: int | None) -> None:
    """In a forked child (e.g. a DataLoader worker): close the parent's lock descriptor, so the flock dies
    with the parent even while the child lives on for a moment."""
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)
