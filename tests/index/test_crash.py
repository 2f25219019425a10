"""A build killed with SIGKILL in a real subprocess resumes and ends identical to an uninterrupted build;
the collection stays readable (open + search) at every point sampled while it runs."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from alignfuse.index import BuildOptions, Collection, ImageFolderSource, build_collection
from alignfuse.index.collection import CollectionWriter
from alignfuse.models.base import DualEncoder

from .conftest import REPO, make_image_folder

N_IMAGES = 160
BATCH = 4


def _cli(*args: str) -> list[str]:
    exe = REPO / ".venv" / "bin" / "alignfuse"
    if exe.exists():
        return [str(exe), *args]
    return [sys.executable, "-c", "from alignfuse.service.cli import main; main()", *args]


def _build_cmd(coll: Path, images: Path) -> list[str]:
    return _cli(
        "build",
        str(coll),
        "--images",
        str(images),
        "--model",
        "alignfuse:random-tiny",
        "--batch-size",
        str(BATCH),
        "--commit-every",
        str(BATCH),
        "--workers",
        "0",
        "--no-progress",
    )


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return env


@pytest.mark.timeout(600)
def test_sigkilled_build_resumes_and_matches_an_uninterrupted_build(
    tmp_path: Path, tiny_encoder: DualEncoder
) -> None:
    images = tmp_path / "images"
    make_image_folder(images, N_IMAGES)
    (images / "broken.jpg").write_bytes(b"\xff\xd8 not really")

    # reference: the same build, uninterrupted (in-process, same batch and commit interval)
    ref_report = build_collection(
        tmp_path / "ref",
        ImageFolderSource(images),
        tiny_encoder,
        options=BuildOptions(batch_size=BATCH, commit_every=BATCH, progress=False),
    )
    assert ref_report.added == N_IMAGES

    coll = tmp_path / "killed"
    proc = subprocess.Popen(
        _build_cmd(coll, images), cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    q = tiny_encoder.encode_texts(["a red square", "a blue circle"])
    samples = 0
    killed_at = -1
    deadline = time.monotonic() + 300
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if (coll / "manifest.json").exists():
                with Collection.open(coll) as c:  # readable at every sampled point
                    n = c.count("image")
                    assert n == c.manifest.count("image")
                    res = c.search(q, 5, "image")
                    assert (res.ids >= 0).sum() == 2 * min(5, n)
                    samples += 1
                    if c.version >= 10:  # about a quarter of the way
                        proc.send_signal(signal.SIGKILL)
                        killed_at = c.version
                        break
            time.sleep(0.005)
    finally:
        if proc.poll() is None and killed_at < 0:
            proc.kill()
        proc.communicate(timeout=60)
    if killed_at < 0:
        pytest.fail(f"the build ended before it could be killed (rc {proc.returncode}, {samples} samples)")
    assert proc.returncode == -signal.SIGKILL

    # after the kill: readable at its last committed version, lock released, uncommitted rows invisible
    with Collection.open(coll) as c:
        committed = c.count("image")
        assert c.version >= killed_at and 0 < committed < N_IMAGES
        assert len(c.vectors("image")[0]) == committed
        c.search(q, 5, "image")
    with CollectionWriter(coll) as w:  # takes the lock: the dead process no longer holds it
        assert w.base_version >= killed_at

    # re-running the same command resumes: it encodes only what was not committed
    out = subprocess.run(
        _build_cmd(coll, images), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    text = " ".join(out.stdout.split())
    m = re.search(r"added (\d+) .*?skipped (\d+) already indexed, (\d+) failed", text)
    assert m, text
    added, skipped, failed = map(int, m.groups())
    assert (added, skipped, failed) == (N_IMAGES - committed, committed, 1)

    ref, got = Collection.open(tmp_path / "ref"), Collection.open(coll)
    assert got.count("image") == ref.count("image") == N_IMAGES
    ref_ids, ref_vecs = ref.vectors("image")
    got_ids, got_vecs = got.vectors("image")
    np.testing.assert_array_equal(got_ids, ref_ids)
    np.testing.assert_allclose(got_vecs, ref_vecs, atol=1e-5)
    assert [(i.id, Path(i.uri).name, i.sha256) for i in got.list(limit=1000)] == [
        (i.id, Path(i.uri).name, i.sha256) for i in ref.list(limit=1000)
    ]
    np.testing.assert_array_equal(got.search(q, 10, "image").ids, ref.search(q, 10, "image").ids)
    # nothing uncommitted is left behind
    seg_dirs = {p.name for p in (coll / "segments").iterdir()}
    assert seg_dirs <= {s.id for s in got.manifest.segments} | {
        s.id for s in Collection.open(coll, version=got.version - 1).manifest.segments
    }
