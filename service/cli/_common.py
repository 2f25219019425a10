"""Helpers shared by CLI modules: the error → exit-code table."""

from __future__ import annotations

from alignfuse.errors import (
    AlignfuseError,
    ConflictError,
    InvalidInputError,
    ModelUnavailableError,
    NotFoundError,
)

# exit codes: 2 = bad argument (as click), 3 = not found, 4 = conflict, 5 = model unavailable, 1 = other
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
