"""ALBEF's training objectives: official key layouts, typed losses, labelled extra ITM pairs, MLM masking."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from alignfuse.models.albef.config import ALBEF_CONFIGS
from alignfuse.training import TrainOptions
from alignfuse.training.objectives_albef import (
    AlbefBatch,
    AlbefForTraining,
    AlbefTrainingOptions,
    inference_state_dict,
)
from tests.training.toy import COLOURS, WORDS, make_arch, toy_data

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


def test_forward_returns_typed_losses(vocab: Path) -> None:
    torch.manual_seed(0)
    arch = make_arch(vocab, TrainOptions(batch_size=4))
    data = toy_data(6, 0)
    ids, mask = arch.tok(data.captions[:4])
    nids, nmask = arch.tok(
        [data.perturb(c, i, np.random.default_rng(0)) for i, c in enumerate(data.captions[:4])]
    )  # type: ignore[misc]
    batch = AlbefBatch(
        data.pixels([0, 1, 2, 3]), ids, mask, torch.arange(4), nids, nmask, torch.tensor([1, 1, 0, 1]).bool()
    )
    losses = arch.model(batch, alpha=0.4)
    assert losses.total.requires_grad
    # MLM is on (its loss is exactly 0 when off), and the total is the weighted sum of the three
    assert float(losses.mlm.detach()) > 0
    assert float(losses.total.detach()) == pytest.approx(
        float(losses.itc.detach() + losses.itm.detach() + losses.mlm.detach()), rel=1e-5
    )
    # ITM accuracy is over all pairs: 4 positives, 2 x 4 in-batch negatives, the 3 valid perturbed captions
    assert losses.itm_acc == pytest.approx(
        (4 * losses.itm_pos_acc + 8 * losses.itm_neg_acc + 3 * losses.itm_pert_acc) / 15
    )
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
    arch = make_arch(vocab, TrainOptions(batch_size=4, attribute_captions=2), mlm=False)
    data = toy_data(6, 0)
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


def test_mlm_masking_follows_bert_and_concept_groups(vocab: Path) -> None:
    arch = make_arch(vocab, TrainOptions(batch_size=4))
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
