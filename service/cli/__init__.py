"""The ``alignfuse`` command line. Each resource registers its commands from its own module."""

from __future__ import annotations

import logging
import sys

import typer

from alignfuse.errors import AlignfuseError

from . import collections, demo, importer, scenes, serve, train
from . import eval as eval_cmd
from ._common import exit_code_for

app = typer.Typer(
    name="alignfuse",
    help="Two-stage image-text retrieval: dual encoder + FAISS, then a cross-encoder rerank.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages."),
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its CPU-feature probing is noise to users


for _module in (collections, importer, serve, train, scenes, eval_cmd, demo):
    _module.register(app)


def main() -> None:
    """Entry point: domain errors become one line on stderr and a non-zero exit code."""
    try:
        app()
    except AlignfuseError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        sys.exit(exit_code_for(exc))
