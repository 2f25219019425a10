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
    for path in [
        DOCKER / "Dockerfile",
        DOCKER / "Dockerfile.cuda",
        DOCKER / "compose.yaml",
        DOCKER / ".env.example",
    ]:
        for m in re.finditer(r"\b(ALIGNFUSE_[A-Z0-9_]+)", path.read_text()):
            found[m.group(1)] = path.name
    return found


def test_every_alignfuse_variable_is_a_setting() -> None:
    found = _alignfuse_vars()
    assert found, "deployment files set no ALIGNFUSE_ variable"
    unknown = {v: f for v, f in found.items() if not _setting_exists(v)}
    assert not unknown, f"variables that no setting reads: {unknown}"


def test_env_example_values_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    for line in (DOCKER / ".env.example").read_text().splitlines():
        if line.startswith("ALIGNFUSE_"):
            key, _, value = line.partition("=")
            monkeypatch.setenv(key, value)
    s = Settings()
    assert s.models.reranker is not None


def test_compose_structure() -> None:
    doc = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = doc["services"]
    assert {"api", "api-gpu"} <= set(services)
    for name in ("api", "api-gpu"):
        assert "healthcheck" in services[name], name
        assert services[name]["build"]["dockerfile"].startswith("docker/Dockerfile")
        assert (ROOT / services[name]["build"]["dockerfile"]).is_file()
    devices = services["api-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert "gpus" not in services["api-gpu"]  # v2-only key that compose v1 rejects


def test_compose_validates(tmp_path: Path) -> None:
    exe = _require_tool("docker-compose")
    env = tmp_path / ".env"
    shutil.copy(DOCKER / ".env.example", env)
    for profile in ([], ["--profile", "gpu"]):
        proc = subprocess.run(
            [exe, "-f", str(DOCKER / "compose.yaml"), "--env-file", str(env), *profile, "config", "-q"],
            capture_output=True,
            text=True,
            cwd=DOCKER,
        )
        # compose v1 looks for docker/.env next to the file; the env_file key needs it to exist
        if "Couldn't find env file" in proc.stderr:
            shutil.copy(DOCKER / ".env.example", DOCKER / ".env")
            try:
                proc = subprocess.run(
                    [exe, "-f", str(DOCKER / "compose.yaml"), *profile, "config", "-q"],
                    capture_output=True,
                    text=True,
                    cwd=DOCKER,
                )
            finally:
                (DOCKER / ".env").unlink()
        assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cuda"])
def test_hadolint(dockerfile: str) -> None:
    exe = _require_tool("hadolint")
    proc = subprocess.run([exe, str(DOCKER / dockerfile)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfiles_install_the_right_faiss() -> None:
    cpu = (DOCKER / "Dockerfile").read_text()
    gpu = (DOCKER / "Dockerfile.cuda").read_text()
    assert '".[cpu]"' in cpu and "[gpu]" not in cpu
    assert '".[gpu]"' in gpu and "[cpu]" not in gpu
