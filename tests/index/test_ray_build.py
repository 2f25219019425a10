"""``alignfuse build --engine ray`` on a real Ray cluster started inside the test (stopped at the end): the same
items, embeddings and search results as the local build; a driver SIGKILLed mid-build resumes with nothing
duplicated and nothing committed twice."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from alignfuse.index import BuildOptions, Collection, KarpathySource, build_collection

ray = pytest.importorskip("ray")

MODEL = "alignfuse:scenes-clip"
SCENES = 200  # 200 images + 1,000 captions


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from alignfuse.data.scenes import generate_scenes

    return generate_scenes(tmp_path_factory.mktemp("scenes"), seed=3, count=SCENES, split="test")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A local Ray cluster of 2 CPUs in this process; yields its address for CLI drivers (--ray-address)."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    temp = Path("/tmp") / f"af-ray-{os.getpid()}"  # short: Ray's socket paths must stay under 107 bytes
    ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=str(temp), log_to_driver=False)
    try:
        yield str(ray.get_runtime_context().gcs_address)
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


def _snapshot(path: Path) -> dict[tuple[str, str], tuple[str, str | None, np.ndarray]]:
    """(kind, uri) → (sha256, text, vector) of every live item."""
    out: dict[tuple[str, str], tuple[str, str | None, np.ndarray]] = {}
    with Collection.open(path) as c:
        for mod in ("image", "text"):
            ids, vecs = c.vectors(mod)
            for it, v in zip(c.get_many(ids), vecs, strict=True):
                assert (it.kind, it.uri) not in out, f"duplicated item {it.uri}"
                out[(it.kind, it.uri)] = (it.sha256, it.text, np.array(v))
    return out


def _top_uris(path: Path, queries: np.ndarray, modality: str) -> list[list[str]]:
    with Collection.open(path) as c:
        res = c.search(queries, 10, modality)  # type: ignore[arg-type]
        return [[c.get(int(i)).uri for i in row if i >= 0] for row in res.ids]


def _driver(coll: Path, scenes: Path, address: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "alignfuse.service.cli",
        "build",
        str(coll),
        "--karpathy",
        str(scenes),
        "--model",
        MODEL,
        "--engine",
        "ray",
        "--ray-address",
        address,
        "--commit-every",
        "120",
        "--batch-size",
        "16",
        "--no-progress",
    ]


def _version(coll: Path) -> int:
    try:
        return int(json.loads((coll / "manifest.json").read_text())["version"])
    except (OSError, ValueError, KeyError):
        return -1


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ray_build_matches_local_and_resumes_after_driver_kill(
    tmp_path: Path, scenes: Path, cluster: str
) -> None:
    from alignfuse.models.registry import create_dual_encoder

    enc = create_dual_encoder(MODEL)
    local = tmp_path / "local"
    build_collection(local, KarpathySource(scenes), enc, options=BuildOptions(num_workers=0, progress=False))
    want = _snapshot(local)
    assert len(want) == SCENES * 6

    coll = tmp_path / "ray"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        _driver(coll, scenes, cluster), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 300
        while _version(coll) < 1 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)  # the driver dies mid-build; the cluster lives on
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    committed = _version(coll)
    with Collection.open(coll) as c:
        before = c.count("image") + c.count("text")
    assert committed >= 1 and 0 < before < len(want), "the kill did not land mid-build"

    done = subprocess.run(
        _driver(coll, scenes, cluster), env=env, capture_output=True, text=True, timeout=400
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    m = re.search(
        r"added ([\d,]+) \(.*?\), skipped ([\d,]+) already indexed, 0 failed", " ".join(done.stdout.split())
    )
    assert m is not None, done.stdout
    added, skipped = (int(g.replace(",", "")) for g in m.groups())
    assert added == len(want) - before and skipped == before  # only what was missing; nothing twice

    got = _snapshot(coll)
    assert got.keys() == want.keys()
    for k, (sha, text, vec) in want.items():
        assert got[k][:2] == (sha, text)
        np.testing.assert_allclose(got[k][2], vec, atol=1e-5)
    with Collection.open(coll) as c:
        captions = [c.get(int(i)) for i in c.vectors("text")[0][:50]]
        assert all(c.get(t.metadata["image_item_id"]).uri == t.metadata["image_uri"] for t in captions)
    queries = enc.encode_texts(
        ["a red circle left of a blue square", "two green triangles", "a purple cross"]
    )
    assert _top_uris(coll, queries, "image") == _top_uris(local, queries, "image")
    image_q = np.stack([want[k][2] for k in list(want)[:3]])
    assert _top_uris(coll, image_q, "text") == _top_uris(local, image_q, "text")
    assert not list((tmp_path / "ray.shards").glob("metadata/*.parquet"))  # committed shards are removed

    # WebDataset tar shards (img2dataset's format): 10 images already indexed from the Karpathy JSON (keyed by
    # their bytes: skipped) and 10 new ones, each with a caption
    from alignfuse.data.scenes import generate_scenes

    new = generate_scenes(tmp_path / "more", seed=99, count=10, split="test").parent / "images"
    old = scenes.parent / "images"
    tar_path = tmp_path / "wds" / "shard-000000.tar"
    tar_path.parent.mkdir()
    with tarfile.open(tar_path, "w") as tf:
        for n, png in enumerate([*sorted(old.glob("*.png"))[:10], *sorted(new.glob("*.png"))]):
            tf.add(png, arcname=f"{n:06d}.png")
            cap = f"sample {n}".encode()
            info = tarfile.TarInfo(f"{n:06d}.txt")
            info.size = len(cap)
            tf.addfile(info, io.BytesIO(cap))
    cmd = [*_driver(coll, scenes, cluster), "--webdataset", str(tar_path.parent)]
    cmd[cmd.index("build")] = "add"
    del cmd[cmd.index("--karpathy") : cmd.index("--karpathy") + 2]
    del cmd[cmd.index("--model") : cmd.index("--model") + 2]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "added 30 (10 images, 20 texts), skipped 10 already indexed, 0 failed" in " ".join(
        done.stdout.split()
    )
    with Collection.open(coll) as c:
        assert c.count("image") == SCENES + 10
        hit = c.search(enc.encode_texts(["sample 15"]), 1, "text")
        assert c.get(int(hit.ids[0, 0])).uri.endswith("shard-000000.tar#000015.png#caption0")


def test_engine_flags_fail_with_a_one_line_hint(
    tmp_path: Path, scenes: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import importlib.util

    from alignfuse.service.cli import main

    def run(*args: str) -> tuple[int, str]:
        monkeypatch.setattr(
            sys,
            "argv",
            ["alignfuse", "build", str(tmp_path / "c"), "--karpathy", str(scenes), "--model", MODEL, *args],
        )
        with pytest.raises(SystemExit) as exc:
            main()
        return int(exc.value.code or 0), capsys.readouterr().err.strip()

    code, err = run("--engine", "spark")
    assert code == 2 and "--engine" in err
    code, err = run("--ray-address", "127.0.0.1:6379")
    assert code == 2 and "--engine ray" in err
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a)
    )
    code, err = run("--engine", "ray")
    assert code == 2 and err == "error: --engine ray needs Ray: pip install 'alignfuse[ray]'"
    assert not (tmp_path / "c").exists()
