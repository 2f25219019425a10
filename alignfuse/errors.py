"""The one error taxonomy of alignfuse.

Every layer raises these; ``alignfuse.service.errors`` maps them to HTTP status codes in one table and the CLI maps
them to exit codes and one-line messages. ``models`` is the lowest layer, so the taxonomy lives here.
"""

from __future__ import annotations


class AlignfuseError(Exception):
    """Base of all domain errors. ``code`` is a stable machine-readable identifier."""

    code = "error"

    def __init__(self, message: str, *, detail: object | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail


class InvalidInputError(AlignfuseError):
    """The caller passed a bad argument (bad spec, empty text, k out of range, ...)."""

    code = "invalid_input"


class NotFoundError(AlignfuseError):
    """A collection, item, file or model that does not exist."""

    code = "not_found"


class ConflictError(AlignfuseError):
    """The request conflicts with the current state (collection exists, writer lock held, ...)."""

    code = "conflict"


class EncoderMismatchError(ConflictError):
    """A collection was opened with a dual encoder other than the one that built it."""

    code = "encoder_mismatch"


class ModelUnavailableError(AlignfuseError):
    """Weights could not be obtained (offline, missing file, bad checksum, incompatible checkpoint)."""

    code = "model_unavailable"


class CheckpointError(ModelUnavailableError):
    """A checkpoint does not fit the model (missing or unexpected weights, wrong shapes)."""

    code = "bad_checkpoint"


class UnsupportedMediaError(AlignfuseError):
    """Content that is not a decodable image, or of a content type that is not accepted."""

    code = "unsupported_media"


class PayloadTooLargeError(AlignfuseError):
    """An upload over the configured byte limit."""

    code = "payload_too_large"


class ImageTooLargeError(InvalidInputError):
    """An image over the configured pixel limit (decompression bomb)."""

    code = "image_too_large"


class OverloadedError(AlignfuseError):
    """A bounded queue is full; retry after ``retry_after`` seconds."""

    code = "overloaded"

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RequestTimeoutError(AlignfuseError):
    """A request ran past its deadline."""

    code = "timeout"


class NotReadyError(AlignfuseError):
    """Models are still loading."""

    code = "not_ready"


class UnauthorizedError(AlignfuseError):
    """Missing or wrong API key."""

    code = "unauthorized"


class CorruptDataError(AlignfuseError):
    """On-disk data that cannot be read (a damaged collection file)."""

    code = "corrupt_data"
