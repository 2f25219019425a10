"""Training-time diagnostics (:func:`diagnose`): quick retrieval and ITM numbers on (the first images of) a
validation :class:`~alignfuse.training.data.PairData`, logged after every epoch. Not the evaluation protocol
(``alignfuse.evaluation``, ``alignfuse eval``), except for group accuracy, which *is* the protocol's.

- ``itc_tr_r1`` / ``itc_ir_r1``: R@1 of the dual-encoder (ITC) similarities, text and image retrieval.
- ``rerank_tr_r1`` / ``rerank_ir_r1``: R@1 after the ITM head reranks each query's top ``rerank_k``.
- ``itm_acc_random``: mean of "positives predicted match" (``itm_pos_rate``) and "random negatives predicted
  no match"; ``itm_acc_perturbed``: perturbed captions predicted no match; ``itm_acc_group``: a caption of an
  image against a group sibling it is false of, predicted no match.
- Group accuracy: :func:`alignfuse.evaluation.group_accuracy` on the same score matrices ``alignfuse eval``
  builds: the ITC similarities (eval's ``dual`` mode) and the rerank's (eval's ``rerank`` mode with fusion
  ``itm``: the ITM "match" logit on each query's top-k candidates, -100 elsewhere), judged by caption truth
  when the data knows it (``PairData.matches``). Logged as ``dual_<key>`` and ``rerank_<key>`` where ``<key>`` is the eval
  JSON's name (``group_acc_t2i``, ``group_acc_t2i_chance``, ``group_acc_i2t``, ``group_acc_i2t_chance``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
import torch

from alignfuse.evaluation import GROUP_KEYS, NON_CANDIDATE, GroupAccuracy, group_accuracy
from alignfuse.training.adapters import ModelAdapter
from alignfuse.training.data import PairData


def group_keys(group: GroupAccuracy | None) -> dict[str, float | None]:
    """The eval JSON's group-accuracy keys (``GROUP_KEYS``) and values (all None without groups)."""
    values = (None,) * 4 if group is None else (group.t2i, group.t2i_chance, group.i2t, group.i2t_chance)
    return dict(zip(GROUP_KEYS, values, strict=True))


@dataclass(frozen=True)
class Diagnostics:
    """What :func:`diagnose` measured (see the module docstring); ``as_dict`` is the logged record."""

    images: int
    captions: int
    itc_tr_r1: float
    itc_ir_r1: float
    rerank_tr_r1: float | None = None
    rerank_ir_r1: float | None = None
    itm_acc_random: float | None = None  # positives "match" and random negatives "no match", averaged
    itm_acc_perturbed: float | None = None  # perturbed captions predicted "no match"
    itm_acc_group: float | None = None  # same-group images (caption false for them) predicted "no match"
    itm_pos_rate: float | None = None  # positives predicted "match"
    dual_group: GroupAccuracy | None = None  # the protocol's group accuracy on the ITC similarities
    rerank_group: GroupAccuracy | None = None  # ... on the top-k ITM rerank scores

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name not in ("dual_group", "rerank_group")
        }
        for mode, group in (("dual", self.dual_group), ("rerank", self.rerank_group)):
            out.update({f"{mode}_{k}": v for k, v in group_keys(group).items()})
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}


@torch.no_grad()
def diagnose(
    arch: ModelAdapter,
    data: PairData,
    max_images: int = 500,
    rerank_k: int = 8,
    seed: int = 0,
    dual: ModelAdapter | None = None,
) -> Diagnostics:
    """Retrieval and ITM diagnostics on (the first ``max_images`` images of) ``data``.

    The ITC numbers and the rerank candidates come from ``dual`` when given (e.g. a CLIP as stage 1 and
    ``arch``'s ITM head as stage 2), else from ``arch``'s own ITC embeddings."""
    was_training = arch.model.training
    arch.model.eval()
    if dual is not None:
        dual.model.eval()
    try:
        n_img = min(max_images, data.num_images)
        imgs = list(range(n_img))
        caps = [k for i in imgs for k in data.captions_of[i]]
        cap_img = torch.tensor([data.image_of[k] for k in caps])
        img_e, txt_e = (dual or arch).embed(data, imgs, caps)
        sims = img_e @ txt_e.T  # [images, captions]
        # TR: best of an image's captions at rank 1; IR: a caption's image at rank 1
        tr_top = sims.argmax(dim=1)
        tr_r1 = float((cap_img[tr_top] == torch.arange(n_img)).float().mean()) * 100
        ir_top = sims.argmax(dim=0)
        ir_r1 = float((ir_top == cap_img).float().mean()) * 100
        groups = _GroupScorer(data, n_img, caps, cap_img) if data.groups is not None else None
        res = Diagnostics(
            images=n_img,
            captions=len(caps),
            itc_tr_r1=tr_r1,
            itc_ir_r1=ir_r1,
            dual_group=groups(sims, None) if groups else None,
        )
        rng = np.random.default_rng([seed, 99])
        probe = arch.itm(data, [(0, data.captions[caps[0]])])
        if probe is None:
            return res
        k = min(rerank_k, n_img)
        # rerank: ITM over the top-k of each direction
        top_t = sims.topk(k, dim=1).indices  # per image, k captions
        # (R@1 ranks by the match margin, logit 1 - logit 0; group accuracy by the protocol's score, logit 1)
        pairs = [(i, data.captions[caps[int(j)]]) for i in range(n_img) for j in top_t[i]]
        lg_tr = arch.itm_logits(data, pairs)
        assert lg_tr is not None
        sc_tr = lg_tr[:, 1] - lg_tr[:, 0]
        best = top_t.gather(1, sc_tr.view(n_img, k).argmax(dim=1, keepdim=True)).squeeze(1)
        rr_tr = float((cap_img[best] == torch.arange(n_img)).float().mean()) * 100
        top_i = sims.topk(k, dim=0).indices.T  # per caption, k images
        pairs = [(int(i), data.captions[caps[c]]) for c in range(len(caps)) for i in top_i[c]]
        lg_ir = arch.itm_logits(data, pairs)
        assert lg_ir is not None
        sc_ir = lg_ir[:, 1] - lg_ir[:, 0]
        best_i = top_i.gather(1, sc_ir.view(len(caps), k).argmax(dim=1, keepdim=True)).squeeze(1)
        rr_ir = float((best_i == cap_img).float().mean()) * 100
        rerank_group = None
        if groups is not None:
            s_i2t = torch.full(sims.shape, NON_CANDIDATE).scatter_(1, top_t, lg_tr[:, 1].view(n_img, k))
            s_t2i = torch.full(sims.T.shape, NON_CANDIDATE).scatter_(1, top_i, lg_ir[:, 1].view(len(caps), k))
            rerank_group = groups(s_i2t, s_t2i)
        # ITM accuracy: positives vs random negatives (one caption per image)
        one = [data.captions_of[i][0] for i in imgs]
        pos = arch.itm(data, [(i, data.captions[one[i]]) for i in imgs])
        other = [(i + 1 + int(rng.integers(0, n_img - 1))) % n_img for i in imgs]
        neg = arch.itm(
            data,
            [
                (i, data.captions[one[o]])
                for i, o in zip(imgs, other, strict=True)
                if _false(data, data.captions[one[o]], i)
            ],
        )
        assert pos is not None and neg is not None
        pos_rate = float((pos > 0).float().mean())
        acc_random = (pos_rate + float((neg <= 0).float().mean())) / 2
        extra: dict[str, Any] = {}
        if data.perturb is not None:
            pert = [(i, data.perturb(data.captions[one[i]], i, rng)) for i in imgs]
            pp = [(i, t) for i, t in pert if t is not None]
            if pp:
                s = arch.itm(data, pp)
                assert s is not None
                extra["itm_acc_perturbed"] = float((s <= 0).float().mean())
        if data.groups is not None:
            gp = []
            for i in imgs:
                sib = [j for j in data.siblings(i) if j < n_img and _false(data, data.captions[one[i]], j)]
                if sib:
                    gp.append((sib[int(rng.integers(0, len(sib)))], data.captions[one[i]]))
            if gp:
                s = arch.itm(data, gp)
                assert s is not None
                extra["itm_acc_group"] = float((s <= 0).float().mean())
        return replace(
            res,
            rerank_tr_r1=rr_tr,
            rerank_ir_r1=rr_ir,
            itm_acc_random=acc_random,
            itm_pos_rate=pos_rate,
            rerank_group=rerank_group,
            **extra,
        )
    finally:
        arch.model.train(was_training)


def _false(data: PairData, caption: str, image: int) -> bool:
    return data.matches is None or not data.matches(caption, image)


class _GroupScorer:
    """:func:`alignfuse.evaluation.group_accuracy` over the diagnosed images: captions flattened image by image
    (as the protocol's texts), caption truth from ``data.matches`` when the data has it."""

    def __init__(self, data: PairData, n_img: int, caps: list[int], cap_img: torch.Tensor) -> None:
        assert data.groups is not None
        self.groups = data.groups[:n_img]
        self.txt2img = cap_img.numpy()
        self.img2txt: list[list[int]] = [[] for _ in range(n_img)]
        for t, i in enumerate(self.txt2img):
            self.img2txt[int(i)].append(t)
        self.truth = _truth(data, caps, self.txt2img) if data.matches is not None else None

    def __call__(self, s_i2t: torch.Tensor, s_t2i: torch.Tensor | None) -> GroupAccuracy | None:
        return group_accuracy(
            s_i2t.float().numpy(),
            self.img2txt,
            self.txt2img,
            self.groups,
            None if s_t2i is None else s_t2i.float().numpy(),
            truth=self.truth,
        )


def _truth(data: PairData, caps: list[int], txt2img: np.ndarray) -> Callable[[int, int], bool]:
    """``truth(t, i)``: text ``t`` (a diagnosed caption) is true of image ``i``, as the protocol's."""
    matches = data.matches
    assert matches is not None
    cache: dict[tuple[int, int], bool] = {}

    def truth(t: int, i: int) -> bool:
        hit = cache.get((t, i))
        if hit is None:
            hit = cache[(t, i)] = int(txt2img[t]) == i or matches(data.captions[caps[t]], i)
        return hit

    return truth
