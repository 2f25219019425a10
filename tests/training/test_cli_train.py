"""``alignfuse train`` end to end on a few synthetic scenes, ALBEF and CLIP."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
from open_clip import factory
from safetensors.torch import load_file

from alignfuse.evaluation import GROUP_KEYS


def test_cli_trains_albef_and_clip_on_scenes(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from alignfuse.service.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["scenes", str(tmp_path / "s"), "--seed", "0", "--count", "12", "--size", "64"])
    assert res.exit_code == 0, res.output
    data = tmp_path / "s" / "scenes.json"
    vocab = Path(__file__).resolve().parents[2] / "models" / "weights" / "vocab.txt"
    common = ["--data", str(data), "--val", str(data), "--epochs", "1", "--batch-size", "6", "--threads", "1"]
    res = runner.invoke(
        app,
        ["train", *common, "--model-config", "tiny", "--vocab", str(vocab), "--out", str(tmp_path / "a")]
        + ["--name", "scenes-albef", "--queue-size", "12"],
    )
    assert res.exit_code == 0, res.output
    log = [json.loads(x) for x in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    val = next(r["val"] for r in log if "val" in r)
    assert {"itc_tr_r1", "rerank_ir_r1", "itm_acc_random", "itm_acc_perturbed"} <= set(val)
    # group accuracy under the eval JSON's names, for the dual-encoder and the rerank scores
    assert {f"{mode}_{key}" for mode in ("dual", "rerank") for key in GROUP_KEYS} <= set(val)
    assert val["rerank_group_acc_t2i"] is not None and val["rerank_group_acc_t2i_chance"] > 0.0
    assert (tmp_path / "a" / "scenes-albef.safetensors").is_file() and (
        tmp_path / "a" / "vocab.txt"
    ).is_file()
    # with the bag-of-words objective and no validation data (an epoch end without a val record)
    res = runner.invoke(
        app,
        ["train", "--data", str(data), "--epochs", "1", "--batch-size", "6", "--threads", "1"]
        + [
            "--model-config",
            "tiny",
            "--vocab",
            str(vocab),
            "--out",
            str(tmp_path / "b"),
            "--queue-size",
            "12",
        ]
        + ["--bow", "1.0", "--bow-buckets", "64"],
    )
    assert res.exit_code == 0, res.output
    log = [json.loads(x) for x in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    bows = [r["bow"] for r in log if "bow" in r]
    assert bows and all(b > 0 for b in bows)  # NaN (objective off) fails too
    assert not any(k.startswith("bow_head.") for k in load_file(str(tmp_path / "b" / "albef.safetensors")))
    clip_cfg = tmp_path / "clip.json"
    clip_cfg.write_text(
        json.dumps(
            {
                "embed_dim": 16,
                "vision_cfg": {
                    "image_size": 64,
                    "layers": 1,
                    "width": 32,
                    "head_width": 16,
                    "patch_size": 16,
                },
                "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 1, "layers": 1},
            }
        )
    )
    res = runner.invoke(
        app,
        ["train", *common, "--arch", "clip", "--model-config", str(clip_cfg), "--out", str(tmp_path / "c")]
        + ["--bow", "0.5", "--object-itc", "0.5"],
    )
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "c" / "clip.json").read_text()) == json.loads(clip_cfg.read_text())
    # the exported weights are a complete open_clip state_dict for that config
    factory._MODEL_CONFIGS["test-exported-clip"] = json.loads(clip_cfg.read_text())
    model = open_clip.create_model("test-exported-clip", pretrained=None)
    model.load_state_dict(load_file(str(tmp_path / "c" / "clip.safetensors")), strict=True)  # no bow_head
    log = [json.loads(x) for x in (tmp_path / "c" / "train_log.jsonl").read_text().splitlines()]
    assert [r["bow"] for r in log if "bow" in r] and all(r["bow"] > 0 for r in log if "bow" in r)
    # the scenes give object captions: the object ITC ran
    assert [r["obj_itc"] for r in log if "obj_itc" in r] and all(
        r["obj_itc"] > 0 for r in log if "obj_itc" in r
    )
    val = next(r["val"] for r in log if "val" in r)
    assert val["dual_group_acc_t2i"] is not None and val["rerank_group_acc_t2i"] is None  # CLIP: no ITM
    res = runner.invoke(
        app, ["train", "--data", str(tmp_path / "missing.json"), "--out", str(tmp_path / "x")]
    )
    assert res.exit_code != 0
    res = runner.invoke(app, ["train", *common, "--object-itc", "-1", "--out", str(tmp_path / "y")])
    assert res.exit_code != 0 and "--object-itc" in res.output + str(res.exception)
