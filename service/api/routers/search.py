"""``POST /v1/search`` (JSON: text or base64 image) and ``POST /v1/search/image`` (multipart upload)."""

from __future__ import annotations

import base64
import binascii
import math
from typing import Annotated

from fastapi import APIRouter, File, Form, Response, UploadFile
from pydantic import WithJsonSchema
from starlette.datastructures import UploadFile as StarletteUploadFile

from alignfuse.errors import InvalidInputError, PayloadTooLargeError, UnsupportedMediaError

from ...images import IMAGE_CONTENT_TYPES
from ...types import FUSIONS, SearchRequest, SearchResponse
from ..deps import EngineDep, JsonBody, MultipartBody, ReadAuth, SettingsDep
from ..schemas import DOC_MAX_C, DOC_MAX_K, ERROR_RESPONSES, Fusion, Modality, SearchBody, SearchOut

router = APIRouter(prefix="/v1/search", tags=["search"], dependencies=[ReadAuth], responses=ERROR_RESPONSES)


def _decode_b64(data: str, max_bytes: int) -> bytes:
    if data.startswith("data:"):
        _, _, data = data.partition(",")
    data = "".join(data.split())  # MIME-style line breaks are fine
    if len(data) > math.ceil(max_bytes / 3) * 4 + 4:
        raise PayloadTooLargeError(
            f"image is over the limit of {max_bytes} bytes", detail={"max_bytes": max_bytes}
        )
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInputError("image is not valid base64", detail={"field": "image"}) from None


GENERIC_TYPES = frozenset({"application/octet-stream", "binary/octet-stream"})


async def read_upload(file: StarletteUploadFile, max_bytes: int) -> bytes:
    """Read an uploaded file (415 for a declared non-image content type, 413 over ``max_bytes``). A part
    with no Content-Type, or ``application/octet-stream``, is read and left to the image decoder, which
    names what is wrong with bytes that are not an image."""
    ctype = (file.content_type or "").split(";")[0].strip().lower()
    name = file.filename or "upload"
    # a part without a Content-Type (or a generic one) is judged by its bytes: the decoder says what is wrong
    if ctype and ctype not in GENERIC_TYPES and ctype not in IMAGE_CONTENT_TYPES:
        raise UnsupportedMediaError(
            f"{name}: content type {ctype!r} is not an accepted image type",
            detail={"accepted": sorted(IMAGE_CONTENT_TYPES)},
        )
    data = await file.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise PayloadTooLargeError(
            f"{file.filename or 'upload'} is over the limit of {max_bytes} bytes",
            detail={"max_bytes": max_bytes},
        )
    return data


def _json(resp: SearchResponse) -> Response:
    """Serialise once through the schema (FastAPI would validate the returned model a second time)."""
    return Response(SearchOut.model_validate(resp).model_dump_json(), media_type="application/json")


@router.post(
    "",
    response_model=SearchOut,
    dependencies=[JsonBody],
    summary="Search with a text or a base64 image (JSON)",
)
async def search(body: SearchBody, engine: EngineDep, settings: SettingsDep) -> Response:
    image = None if body.image is None else _decode_b64(body.image, settings.limits.max_upload_bytes)
    req = SearchRequest(**{**body.model_dump(), "image": image})
    return _json(await engine.search(req))


@router.post(
    "/image",
    response_model=SearchOut,
    dependencies=[MultipartBody],
    summary="Search with an uploaded image (multipart)",
)
async def search_image(
    engine: EngineDep,
    settings: SettingsDep,
    file: Annotated[UploadFile, File(description="The query image.")],
    collection: Annotated[str, Form(min_length=1, max_length=128)],
    k: Annotated[int, Form(ge=1, json_schema_extra={"maximum": DOC_MAX_K})] = 10,
    # a form field has no null: leave a field out for its default (the schema says so)
    candidates: Annotated[
        int | None, Form(ge=1), WithJsonSchema({"type": "integer", "minimum": 1, "maximum": DOC_MAX_C})
    ] = None,
    rerank: Annotated[bool | None, Form(), WithJsonSchema({"type": "boolean"})] = None,
    fusion: Annotated[
        Fusion | None, Form(), WithJsonSchema({"type": "string", "enum": list(FUSIONS)})
    ] = None,
    min_match: Annotated[
        float | None,
        Form(ge=0.0, le=1.0, allow_inf_nan=False),
        WithJsonSchema({"type": "number", "minimum": 0.0, "maximum": 1.0}),
    ] = None,
    target: Annotated[
        Modality | None, Form(), WithJsonSchema({"type": "string", "enum": ["image", "text"]})
    ] = None,
    include_itc: Annotated[bool, Form()] = False,
) -> Response:
    data = await read_upload(file, settings.limits.max_upload_bytes)
    req = SearchRequest(
        collection=collection,
        image=data,
        target=target,
        k=k,
        candidates=candidates,
        rerank=rerank,
        fusion=fusion,
        min_match=min_match,
        include_itc=include_itc,
    )
    return _json(await engine.search(req))
