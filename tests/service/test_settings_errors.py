"""Settings from the environment, and the one error table / error body."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from alignfuse import errors as E
from alignfuse.service.errors import error_body, status_for
from alignfuse.service.settings import Settings


def test_env_prefix_and_nested_delimiter(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("ALIGNFUSE_COLLECTIONS", str(tmp_path))
    monkeypatch.setenv("ALIGNFUSE_MODELS__RERANKER", "albef:tiny")
    monkeypatch.setenv("ALIGNFUSE_BATCHING__MAX_BATCH", "1")
    monkeypatch.setenv("ALIGNFUSE_LIMITS__MAX_K", "7")
    monkeypatch.setenv("ALIGNFUSE_API_KEY", "s3cret")
    monkeypatch.setenv("ALIGNFUSE_REQUIRE_KEY_FOR_READS", "true")
    s = Settings()
    assert s.collections == tmp_path
    assert s.models.reranker == "albef:tiny"
    assert s.models.dual_encoder is None
    assert s.batching.max_batch == 1
    assert s.limits.max_k == 7
    assert s.api_key is not None and s.api_key.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(s)
    assert s.require_key_for_reads is True


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in list(__import__("os").environ):
        if k.startswith("ALIGNFUSE_"):
            monkeypatch.delenv(k)
    s = Settings()
    assert (s.server.host, s.server.port) == ("127.0.0.1", 8000)
    assert s.limits.default_candidates == 128
    assert s.api_key is None


def test_invalid_settings_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALIGNFUSE_BATCHING__MAX_BATCH", "0")
    with pytest.raises(ValidationError):
        Settings()
    monkeypatch.delenv("ALIGNFUSE_BATCHING__MAX_BATCH")
    with pytest.raises(ValidationError):
        Settings(limits={"max_k": 0})
    with pytest.raises(ValidationError):
        Settings(models={"precision": "fp8"})


@pytest.mark.parametrize(
    ("exc", "status"),
    [
        (E.InvalidInputError("x"), 422),
        (E.ImageTooLargeError("x"), 422),
        (E.NotFoundError("x"), 404),
        (E.ConflictError("x"), 409),
        (E.EncoderMismatchError("x"), 409),
        (E.ModelUnavailableError("x"), 503),
        (E.CheckpointError("x"), 503),
        (E.UnsupportedMediaError("x"), 415),
        (E.PayloadTooLargeError("x"), 413),
        (E.OverloadedError("x"), 429),
        (E.RequestTimeoutError("x"), 504),
        (E.NotReadyError("x"), 503),
        (E.UnauthorizedError("x"), 401),
        (E.CorruptDataError("x"), 500),
        (E.AlignfuseError("x"), 500),
    ],
)
def test_status_table(exc: E.AlignfuseError, status: int) -> None:
    assert status_for(exc) == status


def test_every_taxonomy_class_is_mapped_explicitly() -> None:
    classes = [c for c in vars(E).values() if isinstance(c, type) and issubclass(c, E.AlignfuseError)]
    unmapped = [c.__name__ for c in classes if c is not E.AlignfuseError and status_for(c("x")) == 500]
    assert unmapped == ["CorruptDataError"]  # server-side data damage is the only 5xx domain error


def test_error_body_shape() -> None:
    assert error_body("not_found", "no", {"id": 3}) == {
        "error": {"code": "not_found", "message": "no", "detail": {"id": 3}}
    }
