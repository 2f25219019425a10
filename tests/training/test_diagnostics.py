"""The training diagnostics report the protocol's group accuracy (``alignfuse.evaluation.group_accuracy``) on
the dual-encoder scores and on the rerank scores, under the eval JSON's names."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from alignfuse.training import ModelAdapter, PairData, diagnose


class _Fixed(ModelAdapter):
    """Fixed embeddings and an ITM head that knows the truth (match logit +5 if the caption is true of the
    image, else -5)."""

    def __init__(self, img: torch.Tensor, txt: torch.Tensor, truth: dict[str, set[int]]) -> None:
        self.model = torch.nn.Linear(1, 1)
        self.img, self.txt, self.truth = img, txt, truth

    def embed(
        self, data: PairData, image_idx: Sequence[int], caption_idx: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.img[list(image_idx)], self.txt[list(caption_idx)]

    def itm_logits(self, data: PairData, pairs: Sequence[tuple[int, str]]) -> torch.Tensor | None:
        return torch.tensor([[0.0, 5.0 if i in self.truth[t] else -5.0] for i, t in pairs])

    def save_weights(self, out_dir: Path, name: str) -> list[Path]:
        return []


def _data(shared_caption: bool) -> tuple[PairData, dict[str, set[int]]]:
    """Two groups of two images, one caption each; caption ``c1`` is also true of image 0 when shared."""
    truth = {"c0": {0}, "c1": {0, 1} if shared_caption else {1}, "c2": {2}, "c3": {3}}
    data = PairData(
        torch.zeros(4, 3, 8, 8, dtype=torch.uint8),
        ["c0", "c1", "c2", "c3"],
        [0, 1, 2, 3],
        groups=[0, 0, 1, 1],
    )
    data.matches = lambda caption, image: image in truth[caption]
    return data, truth


# image i embeds as e_i; caption 1 lands nearer image 0 (its group sibling) than image 1; no ties elsewhere
IMG = torch.eye(4)
TXT = torch.tensor([[1.0, 0.2, 0, 0], [0.9, 0.1, 0, 0], [0, 0, 1.0, 0.1], [0, 0, 0.1, 1.0]])


def test_group_accuracy_is_the_protocols_for_dual_and_rerank_scores() -> None:
    data, truth = _data(shared_caption=False)
    res = diagnose(_Fixed(IMG, TXT, truth), data, rerank_k=4).as_dict()
    # dual, text -> image: c1 picks image 0 (false of it); the other 3 captions pick their own image
    assert res["dual_group_acc_t2i"] == 0.75 and res["dual_group_acc_t2i_chance"] == 0.5
    # dual, image -> text: image 0 prefers c0 (1.0 > 0.9), image 1 prefers c0 (0.2 > 0.1): wrong
    assert res["dual_group_acc_i2t"] == 0.75 and res["dual_group_acc_i2t_chance"] == 0.5
    # the rerank (k = every item) scores with the truthful ITM head: every pick is right
    assert res["rerank_group_acc_t2i"] == 1.0 and res["rerank_group_acc_i2t"] == 1.0


def test_group_accuracy_judges_picks_by_caption_truth() -> None:
    """When c1 is true of both images of its group, choosing between them decides nothing (skipped), and
    image 0, of which both group captions are true, is skipped in i2t."""
    data, truth = _data(shared_caption=True)
    res = diagnose(_Fixed(IMG, TXT, truth), data, rerank_k=4).as_dict()
    assert res["dual_group_acc_t2i"] == 1.0 and res["dual_group_acc_t2i_chance"] == 0.5
    # images 1, 2, 3 decide; image 1 prefers c0 (false of it)
    assert res["dual_group_acc_i2t"] == pytest.approx(2 / 3, abs=1e-4)


def test_rerank_scores_only_the_top_k_candidates() -> None:
    """With k = 1 the rerank matrix holds one ITM score per row and -100 elsewhere (the protocol's rerank
    mode): image 1's only text candidate is c0, which the ITM head rejects, yet it still outranks the
    non-candidate c1."""
    data, truth = _data(shared_caption=False)
    res = diagnose(_Fixed(IMG, TXT, truth), data, rerank_k=1).as_dict()
    assert res["rerank_group_acc_i2t"] == 0.75
    assert res["rerank_group_acc_t2i"] == 0.75  # c1's only image candidate is image 0 (false of it)


def test_no_groups_no_group_numbers() -> None:
    data, truth = _data(shared_caption=False)
    data.groups = None
    res = diagnose(_Fixed(IMG, TXT, truth), data, rerank_k=4).as_dict()
    assert res["dual_group_acc_t2i"] is None and res["rerank_group_acc_i2t_chance"] is None
    assert res["itc_tr_r1"] == 75.0  # image 1's best caption is c0
