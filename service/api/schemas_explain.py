"""Schemas of ``POST /v1/explain`` (grounding heatmaps of a caption on an image item)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from ..engine.explain import ExplainResult, WordHeatmap
from .schemas import DOC_MAX_CHARS, JsonInt

# control characters spelled out: JSON Schema's \s (ECMA) and Python's differ on \x1c-\x1f and \x85
_HAS_WORD = r"[^\s\x00-\x20\x7f-\x9f\ufeff,.'!?\"()*#:;~/-]"


class ExplainBody(BaseModel):
    """Explain the reranker's ITM score of ``text`` against the image item ``item_id``."""

    model_config = ConfigDict(extra="forbid", strict=True)  # strict: `layer: false` is not layer 0

    collection: str = Field(min_length=1, max_length=128, examples=["scenes"])
    # 2**53: the largest bound a JSON number (a double) states exactly; 2**63 - 1 would be published rounded up
    item_id: JsonInt = Field(ge=0, le=2**53, description="An image item of the collection.")
    # at least one character that ALBEF's caption cleaning keeps (it deletes , . ' ! ? " ( ) * # : ; ~ and turns
    # - and / into spaces): a caption of punctuation alone has no word to explain
    text: Annotated[
        str,
        Field(min_length=1, max_length=DOC_MAX_CHARS, pattern=_HAS_WORD),
        WithJsonSchema({"type": "string", "minLength": 1, "maxLength": DOC_MAX_CHARS, "pattern": _HAS_WORD}),
    ] = Field(
        description="The caption to explain: at least one character besides white space and punctuation.",
        examples=["a red circle left of a blue square"],
    )
    # pydantic publishes bounds inside an Optional of a validated int as "ge"/"le", which JSON Schema does not
    # know: state them explicitly
    layer: Annotated[
        Annotated[JsonInt, Field(ge=0, le=63)] | None,
        WithJsonSchema({"anyOf": [{"type": "integer", "minimum": 0, "maximum": 63}, {"type": "null"}]}),
    ] = Field(
        None,
        description="Fusion layer to explain (0 = the first with cross-attention); default: the "
        "reranker's (ALBEF's choice, never the last layer). A layer the reranker does not have: 404.",
    )


class WordHeatmapOut(WordHeatmap):
    model_config = ConfigDict(from_attributes=True)


class ExplainOut(ExplainResult):
    model_config = ConfigDict(from_attributes=True)

    words: list[WordHeatmapOut]  # type: ignore[assignment]
