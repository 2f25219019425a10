"""Collections and their items: list, info, add (images multipart / texts JSON), delete, thumbnail."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from alignfuse.errors import InvalidInputError, UnsupportedMediaError

from ...settings import LimitSettings
from ...types import ImageUpload, TextUpload
from ..deps import EngineDep, ReadAuth, SettingsDep, WriteAuth
from ..schemas import (
    ERROR_RESPONSES,
    AddOut,
    CollectionOut,
    CollectionsOut,
    DeleteOut,
    ItemOut,
    ItemsOut,
    Modality,
    ModelsOut,
    SuggestionsOut,
    TextsBody,
)
from .search import read_upload

# 2**53: the largest bound a JSON number (a double) states exactly (2**63 - 1 is published rounded up)
ItemId = Annotated[int, Path(ge=0, le=2**53, description="Item id")]

router = APIRouter(prefix="/v1/collections", tags=["collections"], responses=ERROR_RESPONSES)


@router.get("", response_model=CollectionsOut, dependencies=[ReadAuth], summary="List collections")
def list_collections(engine: EngineDep) -> CollectionsOut:
    cols = engine.list_collections()
    return CollectionsOut(
        collections=[CollectionOut.model_validate(c) for c in cols],
        models=ModelsOut.model_validate(engine.models_info()),
    )


@router.get("/{name}", response_model=CollectionOut, dependencies=[ReadAuth], summary="One collection")
def get_collection(name: str, engine: EngineDep) -> CollectionOut:
    return CollectionOut.model_validate(engine.collection_info(name))


@router.get(
    "/{name}/suggestions",
    response_model=SuggestionsOut,
    dependencies=[ReadAuth],
    summary="Queries suggested for a collection, with their measured truth and rerank effect",
)
def suggestions(name: str, engine: EngineDep) -> SuggestionsOut:
    return SuggestionsOut.model_validate(engine.suggestions(name))


@router.get("/{name}/items", response_model=ItemsOut, dependencies=[ReadAuth], summary="List items")
def list_items(
    name: str,
    engine: EngineDep,
    kind: Modality | None = None,
    offset: Annotated[int, Query(ge=0, le=2**62)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> ItemsOut:
    items = engine.list_items(name, kind=kind, offset=offset, limit=limit)
    return ItemsOut(items=[ItemOut.model_validate(i) for i in items], offset=offset, limit=limit)


@router.get("/{name}/items/{item_id}", response_model=ItemOut, dependencies=[ReadAuth], summary="One item")
def get_item(name: str, item_id: ItemId, engine: EngineDep) -> ItemOut:
    return ItemOut.model_validate(engine.get_item(name, item_id))


@router.get(
    "/{name}/items/{item_id}/thumbnail",
    dependencies=[ReadAuth],
    response_class=Response,
    responses={
        200: {"content": {"image/jpeg": {}}, "description": "A JPEG thumbnail of the item's stored image"}
    },
    summary="Thumbnail of an image item (its own stored file only)",
)
def thumbnail(
    name: str, item_id: ItemId, engine: EngineDep, size: Annotated[int | None, Query(ge=16, le=1024)] = None
) -> Response:
    data = engine.thumbnail(name, item_id, size)
    return Response(content=data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=300"})


_MAX_FILES = LimitSettings.model_fields["max_files_per_upload"].default
_ADD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            # TextsBody (and TextIn) are added to the components by ``alignfuse.service.api.app``
            "application/json": {"schema": {"$ref": "#/components/schemas/TextsBody"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["files"],
                    "properties": {
                        "files": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "minItems": 1,
                            "maxItems": _MAX_FILES,
                        },
                        "captions": {"type": "array", "items": {"type": "string"}},
                        "metadata": {
                            "anyOf": [
                                {"type": "object"},
                                {"type": "array", "items": {"type": "object"}},
                            ],
                            "description": "JSON: one object for every image, or a list aligned with files",
                        },
                    },
                },
                "encoding": {"metadata": {"contentType": "application/json"}},
            },
        },
    }
}


def _parse_metadata(raw: str | None, n: int) -> list[dict[str, Any]]:
    if raw is None or not raw.strip():
        return [{} for _ in range(n)]
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        raise InvalidInputError("metadata is not valid JSON", detail={"field": "metadata"}) from None
    if isinstance(value, dict):
        return [dict(value) for _ in range(n)]
    if isinstance(value, list) and len(value) == n and all(isinstance(v, dict) for v in value):
        return [dict(v) for v in value]
    raise InvalidInputError(
        "metadata must be a JSON object or a list of objects aligned with files", detail={"field": "metadata"}
    )


async def _add_images(request: Request, name: str, engine: EngineDep, settings: SettingsDep) -> AddOut:
    lim = settings.limits
    try:
        form = await request.form(
            max_files=lim.max_files_per_upload, max_fields=lim.max_files_per_upload * 2 + 8
        )
    except StarletteHTTPException as exc:  # starlette's multipart limits
        raise InvalidInputError(
            f"bad multipart body: {exc.detail}", detail={"max_files": lim.max_files_per_upload}
        ) from None
    try:
        files = [f for f in form.getlist("files") if isinstance(f, UploadFile)]
        if not files:
            raise InvalidInputError(
                "multipart upload has no 'files' part", detail={"field": "files", "min_items": 1}
            )
        captions = [c for c in form.getlist("captions") if isinstance(c, str)]
        if captions and len(captions) != len(files):
            raise InvalidInputError(
                f"{len(captions)} captions for {len(files)} files", detail={"field": "captions"}
            )
        meta_raw = form.get("metadata")
        metas = _parse_metadata(meta_raw if isinstance(meta_raw, str) else None, len(files))
        uploads = []
        for i, f in enumerate(files):
            data = await read_upload(f, lim.max_upload_bytes)
            caption = captions[i].strip() if captions and captions[i].strip() else None
            uploads.append(ImageUpload(data=data, filename=f.filename, caption=caption, metadata=metas[i]))
    finally:
        await form.close()
    return AddOut.model_validate(await engine.add_images(name, uploads))


async def _add_texts(request: Request, name: str, engine: EngineDep) -> AddOut:
    raw = await request.body()
    try:
        body = TextsBody.model_validate_json(raw)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False), body=None) from None
    texts = [TextUpload(**t.model_dump()) for t in body.texts]
    return AddOut.model_validate(await engine.add_texts(name, texts))


@router.post(
    "/{name}/items",
    response_model=AddOut,
    status_code=201,
    dependencies=[WriteAuth],
    openapi_extra=_ADD_BODY,
    summary="Add images (multipart 'files') or texts (JSON) — encoded and committed atomically",
)
async def add_items(name: str, request: Request, engine: EngineDep, settings: SettingsDep) -> AddOut:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        return await _add_images(request, name, engine, settings)
    if ctype == "application/json":
        return await _add_texts(request, name, engine)
    raise UnsupportedMediaError(
        f"content type {ctype or 'none'!r}: send images as multipart/form-data or texts as application/json",
        detail={"accepted": ["multipart/form-data", "application/json"]},
    )


@router.delete(
    "/{name}/items/{item_id}", response_model=DeleteOut, dependencies=[WriteAuth], summary="Delete an item"
)
async def delete_item(name: str, item_id: ItemId, engine: EngineDep) -> DeleteOut:
    return DeleteOut.model_validate(await engine.delete_item(name, item_id))
