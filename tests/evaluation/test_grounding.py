"""The pointing game: cases from the scenes' object positions, scoring against known heatmaps, the CLI option."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from alignfuse.data.scenes import generate_scenes
from alignfuse.errors import InvalidInputError
from alignfuse.evaluation import PointingCase, pointing_cases, pointing_game
from alignfuse.evaluation.grounding import object_box, peak_point
from alignfuse.models.base import Grounding, merge_word_pieces


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_scenes(tmp_path_factory.mktemp("scenes"), seed=5, count=12, split="test", size=48)


class Oracle:
    """A fake grounding model whose every word looks at one point: ``where(case_text) -> (x, y)``."""

    def __init__(self, cases: list[PointingCase], *, aim: str, grid: int = 16) -> None:
        self.by_text = {c.text: c for c in cases}
        self.aim = aim
        self.grid = grid
        self.calls = 0

    def grounding(self, text: str, pixels: torch.Tensor, *, layer: int | None = None) -> Grounding:
        self.calls += 1
        words, owner = merge_word_pieces(text.lower().split())
        case = self.by_text[text]
        if self.aim == "object":
            x, y = (case.box[0] + case.box[2]) / 2, (case.box[1] + case.box[3]) / 2
        else:  # the top-left corner
            x, y = 0.0, 0.0
        heat = np.zeros((len(words), self.grid, self.grid), np.float32)
        heat[:, min(self.grid - 1, int(y * self.grid)), min(self.grid - 1, int(x * self.grid))] = 1.0
        return Grounding(words, heat, tuple(words), owner, layer or 0, 0.0, 0.5)


def test_cases_from_scene_objects(scenes: Path) -> None:
    cases = pointing_cases(scenes)
    entries = json.loads(scenes.read_text())
    assert cases and all(c.image.is_file() for c in cases)
    for c in cases[:20]:
        entry = next(e for e in entries if (scenes.parent / e["image"]) == c.image)
        assert c.text in entry["caption"]
        colour, shape = c.phrase
        (obj,) = [o for o in entry["objects"] if o["colour"] == colour and shape.startswith(o["shape"])]
        assert c.box == object_box(obj)
        assert f"{colour} {shape}" in c.text.lower()
        assert 0 < c.area < 1


def test_scoring_against_known_heatmaps(scenes: Path) -> None:
    # one case per caption so the oracle knows which object a text is about
    cases = list({c.text: c for c in pointing_cases(scenes)}.values())

    def transform(im: object) -> torch.Tensor:
        return torch.zeros(3, 8, 8)

    hit = pointing_game(Oracle(cases, aim="object"), transform, cases)
    assert hit.accuracy == 1.0 and hit.cases == len(cases) and hit.empty == 0
    assert hit.chance == pytest.approx(float(np.mean([c.area for c in cases])))
    miss = pointing_game(Oracle(cases, aim="corner"), transform, cases)
    corner_inside = sum(c.box[0] <= 1 / 32 and c.box[1] <= 1 / 32 for c in cases)
    assert miss.hits == corner_inside < len(cases)
    assert peak_point(np.array([[0.0, 0.0], [0.0, 2.0]])) == (0.75, 0.75)
    with pytest.raises(InvalidInputError):
        pointing_game(Oracle(cases, aim="object"), transform, [])


def test_eval_pointing_option(
    scenes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from alignfuse.service.cli import main

    monkeypatch.setattr(
        sys,
        "argv",
        [
            "alignfuse",
            "eval",
            str(tmp_path / "unused"),
            "--karpathy",
            str(scenes),
            "--pointing",
            "--reranker",
            "albef:tiny",
            "--pointing-layer",
            "0",
            "--limit",
            "4",
            "--json",
            "--device",
            "cpu",
        ],
    )
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code in (0, None)
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    (res,) = out["pointing"]
    assert out["reranker"] == "albef:tiny" and res["layer"] == 0
    assert res["cases"] > 0 and 0.0 <= res["accuracy"] <= 1.0 and 0.0 < res["chance"] < 1.0
