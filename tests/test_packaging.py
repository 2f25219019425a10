"""One installed import name: everything the project installs lives under ``alignfuse``.

The source folders stay at the top of the repository (``models/``, ``index/``, ``service/``, ...); the package
``alignfuse/`` reaches them through links, and a wheel holds real copies. Nothing may import a folder by its bare
name: in site-packages that would be some other project's ``models``.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = ("models", "index", "service", "data", "evaluation", "training")


def test_the_distribution_installs_one_top_level_name() -> None:
    top = importlib.metadata.distribution("alignfuse").read_text("top_level.txt")
    assert top is not None
    assert top.split() == ["alignfuse"]


@pytest.mark.parametrize("name", SUBPACKAGES)
def test_each_folder_is_a_subpackage_of_alignfuse(name: str) -> None:
    link = ROOT / "alignfuse" / name
    assert link.resolve() == (ROOT / name).resolve()
    module = importlib.import_module(f"alignfuse.{name}")
    assert Path(module.__file__ or "").resolve().parent == (ROOT / name).resolve()


def _bare_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [
            f"{path.relative_to(ROOT)}:{node.lineno}: {n}" for n in names if n.split(".")[0] in SUBPACKAGES
        ]
    return found


def test_no_code_imports_a_folder_by_its_bare_name() -> None:
    folders = [*SUBPACKAGES, "tests", "bench", "scripts", "docs"]
    files = [p for f in folders for p in (ROOT / f).rglob("*.py") if ".venv" not in p.parts]
    assert len(files) > 50
    offenders = [hit for p in files for hit in _bare_imports(p)]
    assert offenders == []
