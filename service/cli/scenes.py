"""CLI commands: ``alignfuse scenes`` writes the built-in synthetic scenes world to disk."""

from __future__ import annotations

from pathlib import Path

import typer

from alignfuse.data.scenes import SPLITS, generate_scenes
from alignfuse.errors import InvalidInputError


def scenes(
    out: Path = typer.Argument(..., help="Output folder (images/ and scenes.json are written inside)."),
    seed: int = typer.Option(0, "--seed", help="Generator seed; (seed, split) fixes every byte."),
    count: int = typer.Option(1000, "--count", help="Number of images."),
    split: str = typer.Option("train", "--split", help="train | val | test | compositional"),
    size: int = typer.Option(96, "--size", help="Image side in pixels."),
) -> None:
    """Generate synthetic scenes (coloured shapes, relations, counts) with 5 captions per image."""
    if split not in SPLITS:
        raise InvalidInputError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    path = generate_scenes(out, seed=seed, count=count, split=split, size=size)
    typer.echo(str(path))


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    app.command("scenes")(scenes)
