"""Helpers shared by CLI modules: the error → exit-code table, argument checks that name the argument, shared
options."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from alignfuse.errors import (
    AlignfuseError,
    ConflictError,
    InvalidInputError,
    ModelUnavailableError,
    NotFoundError,
)

# exit codes: 2 = bad argument (as click), 3 = not found, 4 = conflict, 5 = model unavailable, 1 = other;
# 6 = a build/add finished but some items failed (listed in its summary; --allow-failures exits 0 instead)
EXIT_ITEMS_FAILED = 6
_EXIT_CODES: tuple[tuple[type[AlignfuseError], int], ...] = (
    (InvalidInputError, 2),
    (NotFoundError, 3),
    (ConflictError, 4),
    (ModelUnavailableError, 5),
)


def exit_code_for(exc: AlignfuseError) -> int:
    for cls, code in _EXIT_CODES:
        if isinstance(exc, cls):
            return code
    return 1


#: the one console the collection commands print tables to (tests widen it)
console = Console()

MODALITIES = ("image", "text")
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or auto.")]
RuntimeOpt = Annotated[
    str,
    typer.Option(
        "--runtime",
        help="torch, onnx (ONNX Runtime, CPU) or auto (ONNX Runtime on a CPU for large models, else torch).",
    ),
]
PRECISION_HELP = (
    "fp32; fp16 or bf16 (GPU; bf16 also for ALBEF on a CPU with AMX / AVX512-BF16); int8 (CPU, quantized "
    "weights); auto (bf16 on such a CPU for ALBEF models of 20 M+ parameters, else fp32)."
)


def check_runtime(runtime: str) -> str:
    """``--runtime`` checked against :data:`alignfuse.models.base.RUNTIMES`."""
    from alignfuse.models.base import RUNTIMES

    if runtime not in RUNTIMES:
        raise InvalidInputError(f"--runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    return runtime


def check_device(device: str) -> str:
    """``--device`` through the one device parser (:func:`alignfuse.models.registry.resolve_device`)."""
    from alignfuse.models.registry import resolve_device

    try:
        return str(resolve_device(device))
    except InvalidInputError as exc:
        raise InvalidInputError(f"--device: {exc.message}") from None


def check_positive(name: str, value: int, minimum: int = 1) -> None:
    if value < minimum:
        raise InvalidInputError(f"{name}: must be >= {minimum}, got {value}")


def check_collection(path: Path) -> None:
    from alignfuse.index import is_collection

    if not is_collection(path):
        if not path.exists():
            raise NotFoundError(f"COLLECTION: no collection at {path}")
        raise NotFoundError(f"COLLECTION: {path} is not a collection (no manifest.json)")
