"""ALBEF training objectives and the training loop: official key layouts, learning on a small synthetic
problem, and resume-to-the-same-state."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from alignfuse.models.albef.config import ALBEF_CONFIGS, AlbefConfig
from alignfuse.training.loop import AlbefArch, PairData, Trainer, TrainOptions, evaluate
from alignfuse.training.objectives_albef import (
    AlbefBatch,
    AlbefForTraining,
    AlbefTrainingOptions,
    inference_state_dict,
)

SHARED = Path("/work/shared/albef")
if not SHARED.is_dir():  # the key lists also live beside the repo in some checkouts
    SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "albef"


def _keys(name: str) -> dict[str, list[int]]:
    path = SHARED / name
    if not path.is_file():
        pytest.skip(f"{path} not available")
    return json.loads(path.read_text())


def _shapes(model: torch.nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def test_retrieval_layout_matches_official_keys() -> None:
    official = _keys("albef_retrieval_keys.json")
    with torch.device("meta"):
        model = AlbefForTraining(ALBEF_CONFIGS["base"], AlbefTrainingOptions(queue_size=65536))
    ours = _shapes(model)
    pos_ids = {k for k in official if k.endswith("position_ids")}
    assert {k: v for k, v in official.items() if k not in pos_ids} == {
        k: v for k, v in ours.items() if k not in pos_ids
    }
    # state_dict order follows ALBEF's too (temp, queues, then modules)
    assert [k for k in ours if k not in pos_ids] == [k for k in official if k not in pos_ids]


def test_mlm_layout_matches_pretraining_keys() -> None:
    official = _keys("albef_pretrain_keys.json")
    cfg = ALBEF_CONFIGS["base-256"]
    with torch.device("meta"):
        model = AlbefForTraining(cfg, AlbefTrainingOptions(queue_size=65536, mlm=True))
    ours = _shapes(model)
    drop = {"idx_queue"}
    off = {k: v for k, v in official.items() if not k.endswith("position_ids") and k not in drop}
    mine = {k: v for k, v in ours.items() if not k.endswith("position_ids") and k not in drop}
    assert off == mine
    # stripped to the inference layout, it is the released retrieval layout
    released = _keys("albef_retrieval_released_keys.json")
    inf = {k: list(v.shape) for k, v in inference_state_dict(model.state_dict()).items()}
    rel = {k: v for k, v in released.items() if not k.endswith("position_ids")}
    assert set(inf) == set(rel)


# ---------------------------------------------------------------------------------------------- small problem

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (35, 70, 230),
    "yellow": (245, 225, 30),
    "purple": (140, 40, 190),
    "cyan": (30, 215, 225),
}
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "on", "the", "left", "right", "block", *COLOURS]


def _tiny_config(vocab: Path) -> AlbefConfig:
    return ALBEF_CONFIGS["tiny"].replace(
        vocab_size=len(WORDS),
        hidden_size=32,
        num_hidden_layers=2,
        fusion_layer=1,
        num_attention_heads=2,
        intermediate_size=64,
        encoder_width=32,
        vision_width=32,
        vision_depth=1,
        vision_heads=2,
        image_res=32,
        patch_size=16,
        embed_dim=16,
        max_position_embeddings=16,
        max_text_len=8,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        vocab=str(vocab),
    )


def _toy_data(n: int, seed: int) -> PairData:
    """A coloured block on a noisy background, captioned 'a X block on the left|right'. A perturbed caption
    names another colour or the other side."""
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    imgs, caps, truth = [], [], []
    for _ in range(n):
        c = names[int(rng.integers(0, len(names)))]
        side = "left" if rng.random() < 0.5 else "right"
        img = rng.integers(90, 160, size=(32, 32, 3)).astype(np.uint8)
        x0 = 2 if side == "left" else 18
        img[8:24, x0 : x0 + 12] = COLOURS[c]
        imgs.append(torch.from_numpy(img).permute(2, 0, 1))
        caps.append(f"a {c} block on the {side}")
        truth.append((c, side))

    def matches(caption: str, image: int) -> bool:
        w = caption.split()
        return (w[1], w[5]) == truth[image]

    def perturb(caption: str, image: int, r: np.random.Generator) -> str:
        w = caption.split()
        if r.random() < 0.3:
            w[5] = "right" if w[5] == "left" else "left"
        else:
            w[1] = [c for c in names if c != w[1]][int(r.integers(0, len(names) - 1))]
        return " ".join(w)

    return PairData(torch.stack(imgs), caps, list(range(n)), perturb=perturb, matches=matches)


@pytest.fixture()
def vocab(tmp_path: Path) -> Path:
    p = tmp_path / "vocab.txt"
    p.write_text("\n".join(WORDS) + "\n")
    return p


def _arch(vocab: Path, opts: TrainOptions, mlm: bool = True) -> AlbefArch:
    from alignfuse.models.text import AlbefTokenizer

    torch.manual_seed(opts.seed)
    cfg = _tiny_config(vocab)
    tok = AlbefTokenizer(str(vocab), max_len=cfg.max_text_len)
    topts = AlbefTrainingOptions(
        queue_size=64,
        momentum=0.9,
        itm_balance=True,
        mlm=mlm,
        special_ids=(tok.cls_id, tok.sep_id, tok.mask_id, tok.pad_id),
    )
    return AlbefArch(AlbefForTraining(cfg, topts), tok, opts, torch.device("cpu"))


def test_forward_returns_typed_losses(vocab: Path) -> None:
    torch.manual_seed(0)
    arch = _arch(vocab, TrainOptions(batch_size=4))
    data = _toy_data(6, 0)
    ids, mask = arch.tok(data.captions[:4])
    nids, nmask = arch.tok(
        [data.perturb(c, i, np.random.default_rng(0)) for i, c in enumerate(data.captions[:4])]
    )  # type: ignore[misc]
    batch = AlbefBatch(
        data.pixels([0, 1, 2, 3]), ids, mask, torch.arange(4), nids, nmask, torch.tensor([1, 1, 0, 1]).bool()
    )
    losses = arch.model(batch, alpha=0.4)
    assert losses.total.requires_grad
    assert (
        float(losses.itc.detach()) > 0 and float(losses.itm.detach()) > 0 and float(losses.mlm.detach()) > 0
    )
    assert 0.0 <= losses.itm_acc <= 1.0 and not np.isnan(losses.itm_pert_acc)
    ptr = int(arch.model.queue_ptr)
    assert ptr == 4 and torch.equal(arch.model.idx_queue[0, :4], torch.arange(4))
    losses.total.backward()
    assert arch.model.itm_head.weight.grad is not None
    assert all(p.grad is None for p in arch.model.visual_encoder_m.parameters())


def test_attribute_pairs_enter_the_itm_loss_with_their_labels(vocab: Path) -> None:
    """Labelled extra ITM pairs (captions naming one attribute) are fused with their own image and weighed
    with their label: flipping the labels changes the loss, and the trainer builds them from
    ``PairData.attribute`` half true, half false."""
    torch.manual_seed(0)
    arch = _arch(vocab, TrainOptions(batch_size=4, attribute_captions=2), mlm=False)
    data = _toy_data(6, 0)
    ids, mask = arch.tok(data.captions[:4])
    aids, amask = arch.tok(["a red block", "a blue block", "a green block"])
    owner = torch.tensor([0, 1, 3])

    def loss(labels: list[int]) -> tuple[float, float]:
        torch.manual_seed(1)
        batch = AlbefBatch(data.pixels([0, 1, 2, 3]), ids, mask, torch.arange(4))
        batch.aux_ids, batch.aux_mask, batch.aux_owner = aids, amask, owner
        batch.aux_label = torch.tensor(labels)
        out = arch.model(batch, alpha=0.0, generator=torch.Generator().manual_seed(0))
        return float(out.itm.detach()), out.itm_aux_acc

    (l1, acc1), (l2, acc2) = loss([1, 0, 1]), loss([0, 1, 0])
    assert l1 != pytest.approx(l2) and acc1 + acc2 == pytest.approx(1.0)

    asked: list[tuple[int, bool]] = []

    def attribute(image: int, true: bool, rng: np.random.Generator) -> str | None:
        asked.append((image, true))
        return None if image == 2 else ("a red block" if true else "a cyan block")

    data.attribute = attribute
    out = arch.step_loss(data, [0, 1, 2, 3], step=0, epoch_frac=0.0)
    assert len(asked) == 8 and sum(t for _, t in asked) == 4  # 2 per image, half of them true
    assert not np.isnan(out["itm_aux_acc"])


def test_losses_fall_and_itm_learns_binding(vocab: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    data, val = _toy_data(64, 1), _toy_data(48, 2)
    opts = TrainOptions(epochs=60, batch_size=16, lr=3e-3, warmup_steps=10, seed=0, eval_rerank_k=4)
    arch = _arch(vocab, opts, mlm=False)
    before = evaluate(arch, val, rerank_k=4)
    trainer = Trainer(arch, data, opts, tmp_path / "run")
    trainer.train()
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "itm" in r]
    first = np.mean([r["itm"] + r["itc"] for r in steps[:6]])
    last = np.mean([r["itm"] + r["itc"] for r in steps[-6:]])
    assert last < first - 0.3, (first, last)
    after = evaluate(arch, val, rerank_k=4)
    assert before.itm_acc_perturbed is not None and before.itm_pos_rate is not None
    # ITM rejects colour-swapped / wrong-colour captions of the *same* image better than chance, while it
    # still accepts the true captions (not a collapsed "always no match" head)
    assert after.itm_acc_perturbed is not None and after.itm_pos_rate is not None
    assert (after.itm_acc_perturbed + after.itm_pos_rate) / 2 > 0.65, after
    assert after.itm_acc_random is not None and after.itm_acc_random > 0.6, after


def test_resume_is_bitwise_identical(vocab: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    data = _toy_data(48, 3)
    opts = TrainOptions(epochs=2, batch_size=8, lr=1e-3, warmup_steps=2, seed=4, save_every=5)

    full = Trainer(_arch(vocab, opts), data, opts, tmp_path / "full")
    full.train(max_steps=9)
    # interrupted at step 5 (the checkpoint), resumed in a fresh trainer
    part = Trainer(_arch(vocab, opts), data, opts, tmp_path / "part")
    part.train(max_steps=5)
    resumed = Trainer(_arch(vocab, opts), data, opts, tmp_path / "part")
    torch.manual_seed(12345)  # the checkpoint restores RNG state; the prior state must not matter
    resumed.load_checkpoint(tmp_path / "part")
    assert resumed.state.step == 5
    resumed.train(max_steps=4)
    assert resumed.state.step == full.state.step == 9
    a, b = full.arch.model.state_dict(), resumed.arch.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    oa, ob = full.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(oa[i]["exp_avg"], ob[i]["exp_avg"]) for i in oa)
    assert full.scheduler.get_last_lr() == resumed.scheduler.get_last_lr()


def test_exported_weights_load_in_the_inference_model(vocab: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from alignfuse.models.albef.model import AlbefModel

    arch = _arch(vocab, TrainOptions(batch_size=4))
    paths = arch.save_weights(tmp_path, "toy")
    sd = load_file(str(paths[0]))
    cfg = AlbefConfig.from_json(paths[1])
    model = AlbefModel(cfg)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and not [m for m in missing if not m.endswith("position_ids")]
    assert (tmp_path / "vocab.txt").read_text() == vocab.read_text()


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
    assert {"itc_tr_r1", "rerank_ir_r1", "itm_acc_random", "itm_acc_perturbed", "group_acc_itm"} <= set(val)
    assert (tmp_path / "a" / "scenes-albef.safetensors").is_file() and (
        tmp_path / "a" / "vocab.txt"
    ).is_file()
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
        ["train", *common, "--arch", "clip", "--model-config", str(clip_cfg), "--out", str(tmp_path / "c")],
    )
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "c" / "clip.json").read_text()) == json.loads(clip_cfg.read_text())
    res = runner.invoke(
        app, ["train", "--data", str(tmp_path / "missing.json"), "--out", str(tmp_path / "x")]
    )
    assert res.exit_code != 0


def test_mlm_masking_follows_bert_and_concept_groups(vocab: Path) -> None:
    arch = _arch(vocab, TrainOptions(batch_size=4))
    model = arch.model
    ids, mask = arch.tok(["a red block on the left", "a blue block on the right"] * 200)
    gen = torch.Generator().manual_seed(0)
    masked, labels = model.mask_tokens(ids, mask, gen)
    chosen = labels != -100
    real = mask.bool() & (ids != arch.tok.cls_id)
    assert not chosen[:, 0].any() and not (chosen & ~real).any()  # never [CLS] or padding
    assert 0.11 < chosen.sum() / real.sum() < 0.19  # ~15%
    frac_mask = float((masked[chosen] == arch.tok.mask_id).float().mean())
    assert 0.7 < frac_mask < 0.9  # 80% [MASK], the rest random or kept
    assert torch.equal(labels[chosen], ids[chosen])
    # concept masking: every colour word of a caption is chosen together
    colour_ids = tuple(WORDS.index(c) for c in COLOURS)
    model.options = AlbefTrainingOptions(
        queue_size=64,
        mlm=True,
        concept_mask_prob=1.0,
        concept_groups=(colour_ids,),
        special_ids=model.options.special_ids,
    )
    masked, labels = model.mask_tokens(ids, mask, gen)
    is_colour = torch.isin(ids, torch.tensor(colour_ids))
    assert torch.equal(labels != -100, is_colour)
