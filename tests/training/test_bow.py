"""The bag-of-words objective: labels from tokenized captions, targets per image, the loss, the training-only
head (dropped from exported weights, tolerated across stages), and that it teaches the image side what the
captions name."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from alignfuse.errors import InvalidInputError
from alignfuse.models.albef.checkpoint import load_albef_checkpoint
from alignfuse.models.albef.model import AlbefModel, pool_image
from alignfuse.training import Trainer, TrainOptions
from alignfuse.training.bow import BowTable, bow_labels, bow_loss, bow_size
from alignfuse.training.objectives_albef import AlbefBatch, inference_state_dict
from tests.training.toy import COLOURS, make_arch, toy_data


def test_labels_are_words_and_hashed_pairs_without_specials() -> None:
    special = {0, 2, 3}
    labels = bow_labels([2, 7, 8, 9, 3, 0, 0], special, vocab_size=20, buckets=16)
    words = {7, 8, 9}
    assert words <= labels
    pairs = labels - words
    assert len(pairs) <= 2 and all(20 <= p < bow_size(20, 16) for p in pairs)
    # order matters for pairs ("red circle" is not "circle red"), not for words
    swapped = bow_labels([2, 8, 7, 9, 3], special, vocab_size=20, buckets=1 << 20)
    straight = bow_labels([2, 7, 8, 9, 3], special, vocab_size=20, buckets=1 << 20)
    assert swapped & set(range(20)) == straight & set(range(20))
    assert swapped != straight
    assert bow_labels([2, 7, 8, 3], special, vocab_size=20, buckets=0) == {7, 8}
    with pytest.raises(InvalidInputError):
        bow_labels([1], special, vocab_size=0, buckets=4)


def test_table_gives_multi_hot_rows_and_rejects_labels_outside_the_space() -> None:
    table = BowTable([{1, 3}, {0}, set()], size=5)
    t = table.targets([2, 0, 0, 1])
    assert t.tolist() == [[0, 0, 0, 0, 0], [0, 1, 0, 1, 0], [0, 1, 0, 1, 0], [1, 0, 0, 0, 0]]
    with pytest.raises(InvalidInputError):
        BowTable([{5}], size=5)


def test_loss_prefers_the_named_labels_and_ignores_rows_without_any() -> None:
    targets = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    right = torch.tensor([[5.0, 5.0, -5.0, -5.0], [9.0, -9.0, 0.0, 0.0]])
    wrong = torch.tensor([[-5.0, -5.0, 5.0, 5.0], [0.0, 0.0, 0.0, 0.0]])
    assert float(bow_loss(right, targets)) < 0.71 < float(bow_loss(wrong, targets))
    # the label-free row does not count: changing it changes nothing
    assert float(bow_loss(right, targets)) == pytest.approx(float(bow_loss(right[:1], targets[:1])))
    empty = bow_loss(right.requires_grad_(), torch.zeros(2, 4))
    assert float(empty.detach()) == 0.0
    empty.backward()


def test_head_enters_the_total_and_never_the_exported_weights(vocab: Path) -> None:
    torch.manual_seed(0)
    arch = make_arch(vocab, TrainOptions(batch_size=4), mlm=False, bow_weight=0.5, bow_buckets=32)
    model = arch.model
    data = toy_data(4, 0)
    table = arch.bow_table(data)
    ids, mask = arch._tokens(data.captions)
    batch = AlbefBatch(data.pixels([0, 1, 2, 3]), ids, mask, torch.arange(4), bow=table.targets([0, 1, 2, 3]))
    losses = model(batch, alpha=0.0)
    assert math.isfinite(losses.bow) and losses.bow > 0
    total = float(losses.itc) + float(losses.itm) + float(losses.mlm) + 0.5 * losses.bow
    assert float(losses.total) == pytest.approx(total, rel=1e-5)
    losses.total.backward()
    assert model.bow_head.weight.grad is not None and float(model.bow_head.weight.grad.abs().sum()) > 0
    assert any(k.startswith("bow_head.") for k in model.state_dict())
    assert not any(k.startswith("bow_head.") for k in inference_state_dict(model.state_dict()))
    # a batch without targets trains without the objective
    batch.bow = None
    assert math.isnan(model(batch, alpha=0.0).bow)


def test_a_stage_may_add_or_drop_the_head(vocab: Path, tmp_path: Path) -> None:
    data = toy_data(16, 1)
    opts = TrainOptions(epochs=1, batch_size=8, lr=1e-3, warmup_steps=1)
    plain = Trainer(make_arch(vocab, opts, mlm=False), data, opts, tmp_path / "plain")
    plain.train(max_steps=1)
    with_head = Trainer(make_arch(vocab, opts, mlm=False, bow_weight=1.0), data, opts, tmp_path / "bow")
    with_head.init_model_from(tmp_path / "plain")
    with_head.train(max_steps=1)
    again = Trainer(make_arch(vocab, opts, mlm=False), data, opts, tmp_path / "again")
    again.init_model_from(tmp_path / "bow")  # the head is dropped, everything else must fit
    # the training checkpoint serves as it is: the head is a documented extra of the loader
    model = AlbefModel(with_head.arch.model.config)
    report = load_albef_checkpoint(model, tmp_path / "bow" / "checkpoint.pth")
    assert {"bow_head.weight", "bow_head.bias"} <= set(report.ignored)
    assert torch.equal(model.itm_head.weight, with_head.arch.model.itm_head.weight)


def test_it_teaches_the_image_side_what_the_captions_name(vocab: Path, tmp_path: Path) -> None:
    """Trained with the bag of words alone (ITC, ITM off), the head's strongest colour word for a held-out
    image is its block's colour, and its stronger side word is the block's side: far above chance (1/6, 1/2)."""
    torch.set_num_threads(1)
    data, val = toy_data(320, 3), toy_data(60, 4)
    opts = TrainOptions(epochs=30, batch_size=16, lr=3e-3, warmup_steps=5, seed=0, perturb_negatives=False)
    arch = make_arch(vocab, opts, mlm=False, bow_weight=1.0, itc_weight=0.0, itm_weight=0.0)
    model = arch.model

    def accuracy() -> tuple[float, float]:
        vocab_ids = arch.tok.tokenizer.vocab
        colour_ids = [vocab_ids[c] for c in COLOURS]
        side_ids = [vocab_ids["left"], vocab_ids["right"]]
        with torch.no_grad():
            logits = model.bow_head(
                pool_image(model.image_tokens(val.pixels(range(len(val.captions)))), "cls")
            )
        names = list(COLOURS)
        truth = [c.split() for c in val.captions]
        colour = [names[int(i)] == w[1] for i, w in zip(logits[:, colour_ids].argmax(1), truth, strict=True)]
        side = [
            ("left", "right")[int(i)] == w[5]
            for i, w in zip(logits[:, side_ids].argmax(1), truth, strict=True)
        ]
        return sum(colour) / len(colour), sum(side) / len(side)

    Trainer(arch, data, opts, tmp_path / "run").train()
    colour_acc, side_acc = accuracy()
    assert colour_acc > 0.8 and side_acc > 0.8, (colour_acc, side_acc)


def test_clip_learns_what_the_captions_name(tmp_path: Path) -> None:
    """The same objective on an open_clip CLIP (``alignfuse train --arch clip --bow``): a training-only head
    on the image embedding, whose strongest colour word for held-out images is their block's colour."""
    import json

    from alignfuse.training.adapters import ClipArch, build_clip

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = tmp_path / "clip.json"
    cfg.write_text(
        json.dumps(
            {
                "embed_dim": 32,
                "vision_cfg": {"image_size": 32, "layers": 2, "width": 48, "head_width": 16, "patch_size": 8},
                "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
            }
        )
    )
    data, val = toy_data(320, 3), toy_data(60, 4)
    opts = TrainOptions(arch="clip", epochs=25, batch_size=16, lr=3e-3, warmup_steps=5, seed=0)
    arch, _ = build_clip(str(cfg), opts, torch.device("cpu"), bow_weight=1.0, bow_buckets=64)
    assert isinstance(arch, ClipArch) and arch.bow_table(data).size == 49408 + 64
    words = {c: int(arch.tok([c])[0, 1]) for c in COLOURS}  # one BPE token per colour word
    Trainer(arch, data, opts, tmp_path / "run").train()
    with torch.no_grad():
        logits = arch.model.bow_head(arch.model.encode_image(val.pixels(range(len(val.captions)))))
    names = list(COLOURS)
    pred = logits[:, [words[c] for c in names]].argmax(1)
    acc = sum(names[int(i)] == cap.split()[1] for i, cap in zip(pred, val.captions, strict=True)) / len(pred)
    assert acc > 0.8, acc
    saved = arch.save_weights(tmp_path, "clip")[0]
    from safetensors.torch import load_file

    assert not any(k.startswith("bow_head.") for k in load_file(str(saved)))
