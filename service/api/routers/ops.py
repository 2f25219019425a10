"""Operations: ``/healthz`` (process alive), ``/readyz`` (models loaded), ``/metrics`` (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..deps import EngineDep, MetricsDep, ReadAuth
from ..schemas import ERROR_RESPONSES, ModelsOut, StatusOut

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=StatusOut, summary="Liveness")
def healthz() -> StatusOut:
    return StatusOut(status="ok")


@router.get("/readyz", response_model=StatusOut, responses={503: ERROR_RESPONSES[503]}, summary="Readiness")
def readyz(engine: EngineDep) -> StatusOut:
    engine.require_ready()  # NotReadyError (503) while loading
    return StatusOut(status="ready", models=ModelsOut.model_validate(engine.models_info()))


@router.get(
    "/metrics",
    dependencies=[ReadAuth],
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}},
    summary="Prometheus metrics",
)
def metrics(m: MetricsDep) -> Response:
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)
