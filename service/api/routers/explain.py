"""``POST /v1/explain``: grounding heatmaps (where the reranker looks for each word of a caption)."""

from __future__ import annotations

from fastapi import APIRouter, Response

from ...engine.explain import ExplainRequest
from ..deps import EngineDep, JsonBody, ReadAuth
from ..schemas import ERROR_RESPONSES
from ..schemas_explain import ExplainBody, ExplainOut

router = APIRouter(prefix="/v1/explain", tags=["search"], dependencies=[ReadAuth], responses=ERROR_RESPONSES)


@router.post(
    "",
    response_model=ExplainOut,
    dependencies=[JsonBody],
    summary="Grounding heatmaps of a caption on an image item (per word, over image patches)",
    description="For the reranker's ITM 'match' logit of (text, image item): per word, gradient × "
    "cross-attention at one fusion layer, heads averaged, positive part (ALBEF's Grad-CAM), on the image's "
    "patch grid. Rerankers without word-to-patch cross-attention (ViLT) answer 422.",
)
async def explain(body: ExplainBody, engine: EngineDep) -> Response:
    out = await engine.explain(ExplainRequest(**body.model_dump()))
    return Response(
        ExplainOut.model_validate(out.model_dump()).model_dump_json(), media_type="application/json"
    )
