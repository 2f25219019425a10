"""Fixtures of the training tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.training.toy import WORDS


@pytest.fixture()
def vocab(tmp_path: Path) -> Path:
    p = tmp_path / "vocab.txt"
    p.write_text("\n".join(WORDS) + "\n")
    return p
