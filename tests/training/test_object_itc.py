"""The object ITC (``alignfuse train --object-itc W``): short captions naming one drawn object ("a red circle"),
their truth over every image, the loss (every true image a positive, in the batch and in the queue), that a new
stage forgets the previous data's queue ids, and that it teaches the dual encoder to retrieve by object."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from alignfuse.data.scenes import COLOURS as SCENE_COLOURS
from alignfuse.data.scenes import SHAPES, object_caption, sample_scenes
from alignfuse.errors import InvalidInputError
from alignfuse.training import Trainer, TrainOptions
from alignfuse.training.contrastive import soft_cross_entropy
from alignfuse.training.data import PairData, attach_scene_functions
from alignfuse.training.objectives_albef import AlbefBatch, AlbefTrainingOptions
from tests.training.toy import COLOURS, make_arch, toy_data


def test_object_captions_name_an_object_of_the_scene() -> None:
    scenes = sample_scenes(seed=5, count=60, split="train")
    rng = np.random.default_rng(0)
    kinds = {"pair": 0, "shape": 0, "colour": 0}
    for s in scenes:
        for _ in range(5):
            text, colour, shape = object_caption(list(s.objects), rng)
            assert colour is not None or shape is not None
            assert any(
                (colour is None or o.colour == colour) and (shape is None or o.shape == shape)
                for o in s.objects
            )
            words = text.split()
            assert (colour is None or colour in words) and (shape is None or shape in words)
            kinds["pair" if colour and shape else "shape" if shape else "colour"] += 1
    assert kinds["pair"] > kinds["shape"] > 0 and kinds["colour"] > 0
    with pytest.raises(ValueError):
        object_caption([], rng)


def test_claim_truth_covers_every_image_holding_the_object() -> None:
    scenes = sample_scenes(seed=6, count=200, split="train")
    objs = [[o.__dict__ for o in s.objects] for s in scenes]
    data = PairData(
        torch.zeros(len(objs), 3, 4, 4, dtype=torch.uint8),
        [f"c{i}" for i in range(len(objs))],
        list(range(len(objs))),
    )
    attach_scene_functions(data, objs)
    assert data.object_claim is not None
    rng = np.random.default_rng(1)
    for image in range(0, 200, 7):
        text, truth = data.object_claim(image, rng)
        assert truth.shape == (200,) and truth.dtype == torch.bool and bool(truth[image])
        words = set(text.split())
        colour = next((c for c in SCENE_COLOURS if c in words), None)
        shape = next((s for s in SHAPES if s in words), None)
        want = [
            any(
                (colour is None or o.colour == colour) and (shape is None or o.shape == shape)
                for o in s.objects
            )
            for s in scenes
        ]
        assert truth.tolist() == want, text


def test_soft_cross_entropy_spreads_over_the_positives_and_skips_empty_rows() -> None:
    positives = torch.tensor([[True, True, False], [False, False, False]])
    right = torch.tensor([[4.0, 4.0, -4.0], [0.0, 9.0, 0.0]])
    wrong = torch.tensor([[-4.0, -4.0, 4.0], [0.0, 0.0, 0.0]])
    assert (
        float(soft_cross_entropy(right, positives))
        < math.log(2) + 0.01
        < float(soft_cross_entropy(wrong, positives))
    )
    # the positive-free row does not count
    assert float(soft_cross_entropy(right, positives)) == pytest.approx(
        float(soft_cross_entropy(right[:1], positives[:1]))
    )
    assert float(soft_cross_entropy(right, torch.zeros(2, 3, dtype=torch.bool))) == 0.0
    with pytest.raises(InvalidInputError):
        AlbefTrainingOptions(object_itc_weight=-1.0)


def _claims(names: list[str]) -> tuple[list[str], torch.Tensor]:
    """Toy claims: 'a X block' for each image's colour, truth over all images of a toy set."""
    return [f"a {c} block" for c in names], torch.stack(
        [torch.tensor([x == c for x in names]) for c in names], 1
    )


def test_loss_enters_the_total_reads_the_queue_ids_and_trains_both_towers(vocab: Path) -> None:
    torch.manual_seed(0)
    arch = make_arch(vocab, TrainOptions(batch_size=4), mlm=False, object_itc_weight=0.5)
    model = arch.model
    data = toy_data(8, 0)
    colours = [c.split()[1] for c in data.captions]
    texts, truth = _claims(colours)
    ids, mask = arch._tokens(data.captions[:4])
    oids, omask = arch._tokens(texts[:4])
    batch = AlbefBatch(data.pixels([0, 1, 2, 3]), ids, mask, torch.arange(4))
    batch.obj_ids, batch.obj_mask, batch.obj_truth = oids, omask, truth[:, :4]
    losses = model(batch, alpha=0.0)
    assert math.isfinite(losses.obj_itc) and losses.obj_itc > 0
    total = float(losses.itc) + float(losses.itm) + float(losses.mlm) + 0.5 * losses.obj_itc
    assert float(losses.total) == pytest.approx(total, rel=1e-5)
    model.zero_grad()
    model._object_itc(model.image_embed(model.image_tokens(batch.pixels)), batch).backward()  # type: ignore[union-attr]
    assert float(model.text_proj.weight.grad.abs().sum()) > 0
    assert float(model.vision_proj.weight.grad.abs().sum()) > 0
    # queued features of images a caption is true of are positives: the loss changes when the queue's ids do
    with torch.no_grad():
        feats = model.image_embed(model.image_tokens(data.pixels(list(range(8)))))
        model.image_queue[:, :8] = feats.T
        model.idx_queue.fill_(-100)
        unknown = float(model._object_itc(feats[:4], batch))  # type: ignore[arg-type]
        model.idx_queue[0, :8] = torch.arange(8)
        known = float(model._object_itc(feats[:4], batch))  # type: ignore[arg-type]
    assert known != pytest.approx(unknown)
    batch.obj_truth = None
    assert math.isnan(model(batch, alpha=0.0).obj_itc)


def test_a_new_stage_forgets_the_previous_queue_ids(vocab: Path, tmp_path: Path) -> None:
    data = toy_data(16, 1)
    opts = TrainOptions(epochs=1, batch_size=8, lr=1e-3, warmup_steps=1)
    first = Trainer(make_arch(vocab, opts, mlm=False), data, opts, tmp_path / "one")
    first.train(max_steps=2)
    assert bool((first.arch.model.idx_queue >= 0).any())
    second = Trainer(make_arch(vocab, opts, mlm=False, object_itc_weight=1.0), data, opts, tmp_path / "two")
    second.init_model_from(tmp_path / "one")
    assert bool((second.arch.model.idx_queue == -100).all())
    assert torch.equal(second.arch.model.image_queue, first.arch.model.image_queue)


def test_it_teaches_the_dual_encoder_to_find_images_by_object(vocab: Path, tmp_path: Path) -> None:
    """Trained with the object ITC alone (scene ITC, ITM off), the query 'a X block' ranks held-out images of a
    colour-X block first: mean precision@5 far above chance (1/6)."""
    torch.set_num_threads(1)
    data, val = toy_data(320, 3), toy_data(90, 4)
    colours = [c.split()[1] for c in data.captions]
    tables = {c: torch.tensor([x == c for x in colours]) for c in COLOURS}

    def object_claim(image: int, rng: np.random.Generator) -> tuple[str, torch.Tensor]:
        c = colours[image]
        return f"a {c} block", tables[c]

    data.object_claim = object_claim
    opts = TrainOptions(epochs=20, batch_size=16, lr=3e-3, warmup_steps=5, seed=0, perturb_negatives=False)
    arch = make_arch(vocab, opts, mlm=False, object_itc_weight=1.0, itc_weight=0.0, itm_weight=0.0)
    Trainer(arch, data, opts, tmp_path / "run").train()
    model = arch.model
    val_colours = [c.split()[1] for c in val.captions]
    with torch.no_grad():
        img = model.image_embed(model.image_tokens(val.pixels(range(len(val_colours)))))
        names = [c for c in COLOURS if val_colours.count(c) >= 5]
        ids, mask = arch._tokens([f"a {c} block" for c in names])
        txt = model.text_embed(model.text_states(ids, mask))
    top = (txt @ img.T).topk(5, dim=1).indices
    precision = sum(val_colours[int(j)] == c for c, row in zip(names, top, strict=True) for j in row) / (
        5 * len(names)
    )
    assert precision > 0.8, precision


def test_clip_adds_the_object_itc_to_its_contrastive_step(tmp_path: Path) -> None:
    """``alignfuse train --arch clip --object-itc W``: the loss enters the step's total (in-batch, no queue) and
    reaches both towers; a negative weight is refused."""
    import json

    from alignfuse.training.adapters import ClipArch, build_clip

    torch.manual_seed(0)
    cfg = tmp_path / "clip.json"
    cfg.write_text(
        json.dumps(
            {
                "embed_dim": 16,
                "vision_cfg": {
                    "image_size": 32,
                    "layers": 1,
                    "width": 32,
                    "head_width": 16,
                    "patch_size": 16,
                },
                "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
            }
        )
    )
    data = toy_data(16, 0)
    colours = [c.split()[1] for c in data.captions]
    tables = {c: torch.tensor([x == c for x in colours]) for c in COLOURS}
    data.object_claim = lambda i, rng: (f"a {colours[i]} block", tables[colours[i]])
    opts = TrainOptions(arch="clip", batch_size=8)
    arch, _ = build_clip(str(cfg), opts, torch.device("cpu"), object_itc=0.5)
    assert isinstance(arch, ClipArch)
    out = arch.step_loss(data, list(range(8)), step=0, epoch_frac=0.0)
    assert math.isfinite(out["obj_itc"]) and out["obj_itc"] > 0
    assert out["loss"] == pytest.approx(out["itc"] + 0.5 * out["obj_itc"], rel=1e-5)
    out["_total"].backward()
    grads = {n: p.grad for n, p in arch.model.named_parameters()}
    assert float(grads["token_embedding.weight"].abs().sum()) > 0
    assert float(grads["visual.conv1.weight"].abs().sum()) > 0
    data.object_claim = None  # data without object claims trains without it
    assert "obj_itc" not in arch.step_loss(data, list(range(8)), step=1, epoch_frac=0.0)
    with pytest.raises(InvalidInputError):
        build_clip(str(cfg), opts, torch.device("cpu"), object_itc=-1.0)
