"""``make train-gpu`` (scripts/train-gpu.sh) end to end at toy size on the CPU: the shipped recipe (runs L + M + N:
hybrid stem, max-pooled ITC, bag of words; stages 2 and 3 from the previous stage's weights on fresh scenes, stage
3 with the object ITC) trains, exports the
shipped architecture, and ends with the comparison against the shipped weights on the validation splits. The GPU
run differs only in --device/--precision."""

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
def test_train_gpu_script_runs_the_shipped_recipe_at_toy_size(tmp_path: Path) -> None:
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
    cfg = json.loads((out / "run" / "scenes-albef.json").read_text())
    shipped = json.loads((ROOT / "models" / "weights" / "scenes-albef.json").read_text())
    assert {k: v for k, v in cfg.items() if k != "vocab"} == {
        k: v for k, v in shipped.items() if k != "vocab"
    }
    sd = load_file(str(out / "run" / "scenes-albef.safetensors"))
    assert any(k.startswith("visual_encoder.patch_embed.proj.net.") for k in sd)
    assert not any(k.startswith("bow_head.") for k in sd)
    logs = {}
    for stage in ("stage1", "stage2", "run"):
        logs[stage] = [json.loads(x) for x in (out / stage / "train_log.jsonl").read_text().splitlines()]
        assert any(r.get("bow", 0) > 0 for r in logs[stage]), stage  # the bag-of-words objective ran
    # the object ITC runs in stage 3 only
    assert any(r.get("obj_itc", 0) > 0 for r in logs["run"])
    assert not any(r.get("obj_itc", 0) > 0 for r in logs["stage1"] + logs["stage2"])
    # stages 2 and 3 start from the stage before
    assert (proc.stderr + proc.stdout).count("initialised the model from") == 2
    first, second, third = (
        json.loads((out / "data" / d / "scenes.json").read_text()) for d in ("train", "train2", "train3")
    )
    assert len(second) > len(first) and first[0]["caption"] != second[0]["caption"]  # fresh, more scenes
    assert second[0]["caption"] != third[0]["caption"]
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
    assert again.returncode == 0 and again.stdout.count("done before, kept") == 3
