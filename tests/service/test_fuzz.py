"""Schema fuzzing: schemathesis against a real server (uvicorn on 127.0.0.1), from the committed OpenAPI
document, every check, with and without an API key, bounded examples (issue 12, suite test 1).

What must hold: no 5xx, no contract failure (status codes and bodies the document declares, invalid input
rejected, valid input accepted, the methods a path allows). One exception is allowed, and only this one: a
schema-valid request that the server answers 422 *with a message naming a semantic error JSON Schema cannot
express* (bytes that are not a decodable image; a rerank asked of a same-modality search). Everything
else that schemathesis flags fails the test.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from .live import live_server

DOC = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"
MAX_EXAMPLES = 12

# what a schema-valid request may still be refused for (what JSON Schema cannot say), by message
SEMANTIC = (
    "is not an image in an accepted format",  # bytes that are not a decodable image
    "is empty (0 bytes)",
    "has a corrupt header",
    "has unsupported format",
    "has an empty size",
    "uses the dual encoder only",  # rerank asked of a same-modality search
    "aligned with files",  # a metadata list whose length is not the number of files
    "captions for",  # captions whose number is not the number of files
)


POSITIVE_ACCEPTANCE = "ST202"  # schema-valid request rejected
NEGATIVE_REJECTION = "ST201"  # schema-violating request accepted


def _run_schemathesis(url: str, out: Path, headers: list[str]) -> tuple[int, str]:
    cmd = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "run",
        str(DOC),
        "--url",
        url,
        "--checks",
        "all",
        "--max-examples",
        str(MAX_EXAMPLES),
        "--seed",
        "12",
        "--workers",
        "1",
        "--request-timeout",
        "30",
        "--max-time",
        "150",
        "--continue-on-failure",
        "--no-color",
        *[a for h in headers for a in ("-H", h)],
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=out)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("with_key", [False, True], ids=["no-key", "key"])
def test_schemathesis_finds_nothing(root: Path, tmp_path: Path, with_key: bool) -> None:
    env = {"ALIGNFUSE_API_KEY": "fuzz-key"} if with_key else {}
    headers = ["Authorization: Bearer fuzz-key"] if with_key else []
    with live_server(root, env) as server:
        rc, out = _run_schemathesis(server.url, tmp_path, headers)
        assert server.alive(), server.output[-3000:]
        log = server.output
    assert "Test cases:" in out, out[-4000:]  # it ran
    assert "Traceback" not in log, log[-4000:]
    failures = _failures(out)
    assert rc == 0 or failures, out[-4000:]  # a non-zero exit always comes with failures we can read
    assert not [f for f in failures if f["status"].startswith("5")], out[-6000:]
    unexplained = [f for f in failures if not _semantic(f)]
    assert not unexplained, "\n\n".join(f["body"] for f in unexplained)[:8000]


def _failures(output: str) -> list[dict[str, str]]:
    """Every failure schemathesis reports (its text report: one block per test case)."""
    found: list[dict[str, str]] = []
    for block in re.split(r"\n\d+\. Test Case ID: ", output)[1:]:
        block = block.split("\n=====")[0]
        status = re.search(r"^\[(\d{3})\]", block, re.M)
        for code, title in re.findall(r"^- (ST\d+) (.+)$", block, re.M):
            found.append(
                {
                    "check": code,
                    "title": title.strip(),
                    "status": status.group(1) if status else "",
                    "body": block[:1500],
                    "curl": next((ln for ln in block.splitlines() if "curl " in ln), "")[:1500],
                }
            )
    return found


def _semantic(f: dict[str, str]) -> bool:
    if f["check"] == POSITIVE_ACCEPTANCE:
        return any(s in f["body"] for s in SEMANTIC)
    # a multipart form field is text on the wire: an "object" sent as a caption arrives as the string "{}"
    return (
        f["check"] == NEGATIVE_REJECTION
        and "multipart/form-data" in f["curl"]
        and "Incorrect type" in f["body"]
    )
