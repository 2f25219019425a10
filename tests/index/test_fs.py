"""Durable-file helpers: the append-only .npy writer and the writer lock."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from alignfuse.errors import ConflictError
from alignfuse.index._fs import NpyAppender, WriterLock, atomic_write


def test_npy_appender_writes_a_loadable_memmappable_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    blocks = [rng.standard_normal((n, 7)).astype(np.float32) for n in (3, 0, 10, 1)]
    a = NpyAppender(tmp_path / "x.npy", np.float32, (7,))
    for b in blocks:
        a.append(b)
    a.close()
    expected = np.concatenate(blocks)
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), expected)
    mm = np.load(tmp_path / "x.npy", mmap_mode="r")
    assert mm.shape == (14, 7)
    np.testing.assert_array_equal(mm[5:9], expected[5:9])


def test_npy_appender_shape_checked_and_abort_removes(tmp_path: Path) -> None:
    a = NpyAppender(tmp_path / "t.npy", np.float16, (2, 3))
    with pytest.raises(ValueError):
        a.append(np.zeros((1, 3, 2)))
    a.abort()
    assert not (tmp_path / "t.npy").exists()


def test_atomic_write_replaces(tmp_path: Path) -> None:
    p = tmp_path / "m.json"
    atomic_write(p, b"one")
    atomic_write(p, b"two")
    assert p.read_bytes() == b"two"
    assert not (tmp_path / "m.json.tmp").exists()


def test_writer_lock_refuses_a_second_writer_in_process(tmp_path: Path) -> None:
    first = WriterLock(tmp_path / "writer.lock").acquire()
    with pytest.raises(ConflictError, match=f"pid {os.getpid()}"):
        WriterLock(tmp_path / "writer.lock").acquire()
    first.release()
    second = WriterLock(tmp_path / "writer.lock").acquire()
    assert second.held
    second.release()


def test_writer_lock_names_the_holder_pid_across_processes(tmp_path: Path) -> None:
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from alignfuse.index._fs import WriterLock\n"
        "WriterLock(Path(sys.argv[1])).acquire()\n"
        "print('locked', flush=True)\n"
        "sys.stdin.readline()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path / "writer.lock")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        with pytest.raises(ConflictError, match=f"pid {proc.pid}") as info:
            WriterLock(tmp_path / "writer.lock").acquire()
        assert info.value.detail == {"pid": proc.pid}
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=30)
    # the lock dies with its process
    WriterLock(tmp_path / "writer.lock").acquire().release()


def test_a_forked_child_that_closes_the_inherited_lock_does_not_keep_it(tmp_path: Path) -> None:
    from alignfuse.index._fs import close_inherited_lock

    lock = WriterLock(tmp_path / "writer.lock").acquire()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: like a DataLoader worker
        close_inherited_lock(lock.fd)
        os.write(w, b"x")
        import time

        time.sleep(5)
        os._exit(0)
    try:
        assert os.read(r, 1) == b"x"
        assert lock.fd is not None
        os.close(lock.fd)  # the parent "dies" without unlocking
        lock._fd = None
        WriterLock(tmp_path / "writer.lock").acquire().release()  # free although the child still runs
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        os.close(r)
        os.close(w)
