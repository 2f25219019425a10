"""The deployment files: Dockerfiles lint clean, compose validates, and every ALIGNFUSE_ variable they set is a
real setting (a typo there would be silently ignored by the service)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from alignfuse.service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"


def _require_tool(name: str) -> str:
    path = shutil.which(name) or (
        str(Path(sys.executable).parent / name) if (Path(sys.executable).parent / name).exists() else None
    )
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is required in CI (make test installs it)")
        pytest.skip(f"{name} not installed (make sysdeps installs it)")
    return path


def _setting_exists(var: str) -> bool:
    parts = var.removeprefix("ALIGNFUSE_").lower().split("__")
    model: type = Settings
    for i, part in enumerate(parts):
        fields = getattr(model, "model_fields", {})
        if part not in fields:
            return False
        ann = fields[part].annotation
        if i < len(parts) - 1:
            if not hasattr(ann, "model_fields"):
                return False
            model = ann  # type: ignore[assignment]
    return True


def _alignfuse_vars() -> dict[str, str]:
    found: dict[str, str] = {}
    for path in [DOCKER / "Dockerfile", DOCKER / "compose.yaml", DOCKER / "alignfuse.env"]:
        text = "\n".join(line for line in path.read_text().splitlines() if "${" not in line)
        for m in re.finditer(r"\b(ALIGNFUSE_[A-Z0-9_]+)", text):
            found[m.group(1)] = path.name
    return found


# read by compose for substitution (build arguments, image names), not by the service
COMPOSE_ONLY = {"ALIGNFUSE_BASE_IMAGE", "ALIGNFUSE_TORCH_INDEX_URL", "ALIGNFUSE_IMAGE", "ALIGNFUSE_IMAGE_GPU"}


def test_every_alignfuse_variable_is_a_setting() -> None:
    found = _alignfuse_vars()
    assert "ALIGNFUSE_MODELS__RERANKER" in found and "ALIGNFUSE_COLLECTIONS" in found
    unknown = {v: f for v, f in found.items() if not _setting_exists(v) and v not in COMPOSE_ONLY}
    assert not unknown, f"variables that no setting reads: {unknown}"
    assert not any(_setting_exists(v) for v in COMPOSE_ONLY)


def test_env_file_values_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    for line in (DOCKER / "alignfuse.env").read_text().splitlines():
        if line.startswith("ALIGNFUSE_"):
            key, _, value = line.partition("=")
            monkeypatch.setenv(key, value)
    s = Settings()
    assert s.models.reranker == "alignfuse:scenes-albef"


def test_compose_structure() -> None:
    doc = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = doc["services"]
    assert {"indexer", "api", "api-gpu", "tools"} <= set(services)
    for name in ("api", "api-gpu"):
        assert "healthcheck" in services[name], name
        assert services[name]["build"]["dockerfile"] == "docker/Dockerfile"  # one Dockerfile, build args
        assert all(p.startswith("127.0.0.1:") for p in services[name]["ports"]), "publish on loopback only"
    assert services["api"]["depends_on"]["indexer"]["condition"] == "service_completed_successfully"
    assert services["api"]["build"]["args"]["EXTRA"] == "cpu"
    assert services["api-gpu"]["build"]["args"]["EXTRA"] == "gpu"
    devices = services["api-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert "gpus" not in services["api-gpu"]  # v2-only key that compose v1 rejects
    assert services["tools"]["profiles"] == ["tools"]


def test_compose_validates() -> None:
    exe = _require_tool("docker-compose")
    for profile in ([], ["--profile", "gpu"], ["--profile", "tools"]):
        proc = subprocess.run(
            [exe, "-f", str(DOCKER / "compose.yaml"), *profile, "config", "-q"],
            capture_output=True,
            text=True,
            cwd=DOCKER,
        )
        assert proc.returncode == 0, proc.stderr


def test_hadolint() -> None:
    exe = _require_tool("hadolint")
    proc = subprocess.run([exe, str(DOCKER / "Dockerfile")], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_installs_one_faiss_per_extra() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    assert "ARG EXTRA=cpu" in text
    assert "['optional-dependencies']['${EXTRA}']" in text  # the extra's faiss, never both
    assert "USER 10001" in text and "HEALTHCHECK" in text and "/readyz" in text
