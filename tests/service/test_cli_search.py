"""`alignfuse search` runs both stages in process when the collection names a reranker (or --reranker is
given): the reranked order equals the engine's, and --no-rerank gives the dual-encoder order."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from alignfuse.data.scenes import generate_scenes
from alignfuse.index import BuildOptions, build_collection, open_source
from alignfuse.models.registry import create_cross_encoder, create_dual_encoder
from alignfuse.service.engine import SearchEngine
from alignfuse.service.settings import ModelSettings, Settings
from alignfuse.service.types import SearchRequest


def _run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    from alignfuse.service.cli import _common as cli_common
    from alignfuse.service.cli import main

    monkeypatch.setattr(cli_common.console, "width", 400)
    monkeypatch.setattr(sys, "argv", ["alignfuse", *args])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0
    out, err = capsys.readouterr()
    return code, out + err


@pytest.fixture(scope="module")
def collection(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli-search")
    scenes = generate_scenes(root / "scenes", seed=3, count=12, split="test", size=64)
    dual = create_dual_encoder("alignfuse:random-tiny")
    cross = create_cross_encoder("albef:tiny")
    build_collection(
        root / "cols" / "scn",
        open_source(karpathy=scenes, image_root=scenes.parent),
        dual,
        options=BuildOptions(rerank_cache=True, progress=False, batch_size=8),
        cross_encoder=cross,
    )
    return root / "cols" / "scn"


def test_cli_two_stage_matches_engine(
    collection: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    query = "a small red circle left of a blue square"
    code, out = _run(
        monkeypatch, capsys, "search", str(collection), "--text", query, "-k", "3", "--candidates", "8"
    )
    assert code == 0, out
    assert "pairs reranked" in out and "itm p" in out
    engine = SearchEngine(
        Settings(
            collections=collection.parent,
            models=ModelSettings(dual_encoder="alignfuse:random-tiny", reranker="albef:tiny", warmup=False),
        )
    )
    engine.load()
    try:
        resp = engine.search_sync(SearchRequest(collection="scn", text=query, k=3, candidates=8, rerank=True))
    finally:
        engine.close()
    assert resp.reranked and resp.pairs_scored == 8
    rows = [line for line in out.splitlines() if line.strip().startswith("│")]
    cli_ids = [int(r.split("│")[3]) for r in rows if r.split("│")[1].strip().isdigit()]
    assert cli_ids == [h.id for h in resp.hits]

    code, out = _run(
        monkeypatch, capsys, "search", str(collection), "--text", query, "-k", "3", "--no-rerank"
    )
    assert code == 0 and "pairs reranked" not in out and "top 3 image items" in out


def test_cli_rerank_without_known_reranker_is_an_argument_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    scenes = generate_scenes(tmp_path / "s", seed=1, count=4, split="test", size=64)
    build_collection(
        tmp_path / "c",
        open_source(karpathy=scenes, image_root=scenes.parent),
        create_dual_encoder("alignfuse:random-tiny"),
        options=BuildOptions(progress=False),
    )
    code, out = _run(monkeypatch, capsys, "search", str(tmp_path / "c"), "--text", "a star", "--rerank")
    assert code == 2 and "--reranker" in out
