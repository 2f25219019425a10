"""``make train-gpu`` (scripts/train-gpu.sh) end to end at toy size on the CPU: every stage of the shipped recipe
runs in order, each from the previous one's checkpoint, the conv-stem warm start included, and it ends with the
comparison against the shipped weights on the validation splits. The GPU run differs only in --device/--precision."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_train_gpu_script_runs_every_stage_at_toy_size(tmp_path: Path) -> None:
    out = tmp_path / "gpu"
    env = dict(
        os.environ,
        TOY="1",
        DEVICE="cpu",
        PRECISION="fp32",
        THREADS="1",
        OUT=str(out),
        PYTHON=sys.executable,
        OMP_NUM_THREADS="1",
    )
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "train-gpu.sh")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stage in ("stage1", "stage2", "stage3", "stage4"):
        assert (out / stage / "scenes-albef.safetensors").is_file(), stage
    cfg = json.loads((out / "stage4" / "scenes-albef.json").read_text())
    assert cfg["patch_stem"] == "conv"
    assert json.loads((out / "stage3" / "scenes-albef.json").read_text())["patch_stem"] == "linear"
    sd = load_file(str(out / "stage4" / "scenes-albef.safetensors"))
    assert any(k.startswith("visual_encoder.patch_embed.proj.net.") for k in sd)
    # the comparison printed one mean-R@1 line for the shipped and one for the new weights
    assert proc.stdout.count("mean_rerank_r1") == 2, proc.stdout[-2000:]
    # a second run keeps every finished stage (resumable)
    again = subprocess.run(
        ["bash", str(ROOT / "scripts" / "train-gpu.sh")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert again.returncode == 0 and again.stdout.count("done before, kept") == 4
