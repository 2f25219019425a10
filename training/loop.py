"""A small training loop for the project's own models (ALBEF and open_clip CLIP), independent of ``index``.

The data is an in-memory :class:`PairData`: images as one uint8 tensor, captions with the index of their
image, and optional callables the data source supplies (``perturb`` makes a false caption for an image, for
ITM hard negatives; ``matches`` says whether a caption is also true of another image; ``groups`` ties images
that share a bag of attributes). ``service/cli/train.py`` builds it from any Karpathy-style source.

Loop: AdamW, linear warm-up then cosine decay, gradient accumulation, periodic checkpoints that resume to the
same state (model incl. momentum encoders and queues, optimizer, scheduler, step, RNG states), an optional
wall-clock budget, and an evaluation after every epoch (ITC R@1 both ways, ITM accuracy on random and hard
negatives, accuracy inside hard-negative groups, top-k ITM rerank R@1).
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from alignfuse.errors import CheckpointError, InvalidInputError
from alignfuse.models.base import CLIP_MEAN, CLIP_STD

log = logging.getLogger(__name__)


Arch = Literal["albef", "clip"]


# ---------------------------------------------------------------------------------------------- data


@dataclass
class PairData:
    """Image-caption pairs held in memory.

    ``images``: uint8 [N, 3, R, R] (already at the model resolution); ``captions[k]`` describes image
    ``image_of[k]``; ``groups[i]`` (optional) the hard-negative group of image i; ``perturb(caption, image,
    rng)`` returns a caption that is false for the image (or None); ``matches(caption, image)`` whether a
    caption is true of an image (used to avoid false negatives and to score group accuracy).
    """

    images: torch.Tensor
    captions: list[str]
    image_of: list[int]
    groups: list[int] | None = None
    perturb: Callable[[str, int, np.random.Generator], str | None] | None = None
    matches: Callable[[str, int], bool] | None = None
    #: ``attribute(image, true, rng)``: a caption naming one attribute alone that is ``true`` or false of the
    #: image (extra ITM pairs that ground colours and shapes separately), or None
    attribute: Callable[[int, bool, np.random.Generator], str | None] | None = None
    captions_of: list[list[int]] = field(default_factory=list)
    #: share of "easy" perturbations (a word replaced by one absent from the image); set by the trainer
    perturb_easy: float = 0.0

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise InvalidInputError("PairData.images must be uint8 [N, 3, R, R]")
        if len(self.captions) != len(self.image_of):
            raise InvalidInputError("captions and image_of differ in length")
        if not self.captions_of:
            self.captions_of = [[] for _ in range(self.num_images)]
            for k, i in enumerate(self.image_of):
                self.captions_of[i].append(k)
        if any(not c for c in self.captions_of):
            raise InvalidInputError("every image needs at least one caption")

    @property
    def num_images(self) -> int:
        return int(self.images.shape[0])

    def pixels(self, index: Sequence[int] | torch.Tensor) -> torch.Tensor:
        x = self.images[torch.as_tensor(index, dtype=torch.long)].float().div_(255.0)
        mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        return (x - mean) / std

    def siblings(self, i: int) -> list[int]:
        if self.groups is None:
            return []
        g = self.groups[i]
        return [j for j in self._members().get(g, []) if j != i]

    def _members(self) -> dict[int, list[int]]:
        cached = getattr(self, "_members_cache", None)
        if cached is None:
            cached = {}
            for i, g in enumerate(self.groups or []):
                cached.setdefault(g, []).append(i)
            self._members_cache = cached
        return cached


# ---------------------------------------------------------------------------------------------- options


@dataclass(frozen=True)
class TrainOptions:
    arch: Arch = "albef"
    epochs: int = 1
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr: float = 1e-5
    warmup_steps: int = 100
    weight_decay: float = 0.02
    max_minutes: float | None = None
    save_every: int = 0  # optimizer steps; 0 = only at epoch ends
    seed: int = 0
    device: str = "cpu"
    precision: Literal["fp32", "bf16"] = "fp32"
    #: ITM extra negatives from caption perturbation (when the data has ``perturb``)
    perturb_negatives: bool = True
    perturb_count: int = 1  # perturbed captions per image and step
    #: ITM pairs per image and step with a caption naming one attribute alone, half true, half false
    #: (when the data has ``attribute``)
    attribute_captions: int = 0
    #: curriculum: share of easy perturbations (absent colour/shape) from start to end of training
    perturb_easy_start: float = 0.0
    perturb_easy_end: float = 0.0
    #: after this many epochs, this fraction of each batch are group siblings of other batch images
    group_mix: float = 0.0
    group_mix_after: float = 1.0
    #: momentum-distillation alpha ramps from 0 over this many steps (default: one epoch)
    alpha_ramp_steps: int | None = None
    eval_rerank_k: int = 8
    eval_max_images: int = 500
    grad_clip: float = 5.0
    #: with ``max_minutes``: anneal the learning rate over the time budget (progress = max(step, time) share)
    time_schedule: bool = False
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 2:
            raise InvalidInputError("batch size must be >= 2")
        if self.epochs < 1 or self.grad_accum < 1:
            raise InvalidInputError("epochs and grad_accum must be >= 1")
        if self.perturb_count < 0 or self.attribute_captions < 0:
            raise InvalidInputError("perturb_count and attribute_captions must be >= 0")
        if not 0.0 <= self.group_mix < 1.0:
            raise InvalidInputError("group_mix must lie in [0, 1)")
        if self.precision not in ("fp32", "bf16"):
            raise InvalidInputError("precision must be fp32 or bf16")


# ---------------------------------------------------------------------------------------------- batches


def epoch_batches(data: PairData, opts: TrainOptions, epoch: int) -> list[list[int]]:
    """The image indices of every batch of ``epoch`` (deterministic from seed and epoch)."""
    rng = np.random.default_rng([opts.seed, epoch, 17])
    order = [int(i) for i in rng.permutation(data.num_images)]
    mix = opts.group_mix if (data.groups is not None and epoch >= opts.group_mix_after) else 0.0
    b = opts.batch_size
    n_fresh = max(1, round(b * (1.0 - mix)))
    batches = []
    pos = 0
    while pos < len(order):
        batch = order[pos : pos + n_fresh]
        pos += n_fresh
        k = 0
        while len(batch) < b and mix > 0 and k < len(batch):
            sib = data.siblings(batch[k])
            if sib:
                batch.append(sib[int(rng.integers(0, len(sib)))])
            k += 1
        if len(batch) >= 2:
            batches.append(batch)
    return batches


def _step_rng(seed: int, step: int) -> np.random.Generator:
    return np.random.default_rng([seed, step, 29])


# ---------------------------------------------------------------------------------------------- adapters


class _Arch:
    """What the loop needs from a model family."""

    model: Any  # an nn.Module with the family's methods

    def step_loss(self, data: PairData, images: list[int], step: int, epoch_frac: float) -> dict[str, Any]:
        raise NotImplementedError

    def embed(
        self, data: PairData, image_idx: Sequence[int], caption_idx: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def itm(self, data: PairData, pairs: Sequence[tuple[int, str]]) -> torch.Tensor | None:
        """Match logit (class 1 minus class 0) per (image, caption text) pair; None if no ITM head."""
        return None

    def save_weights(self, out_dir: Path, name: str) -> list[Path]:
        raise NotImplementedError


class AlbefArch(_Arch):
    def __init__(self, model: nn.Module, tokenizer: Any, opts: TrainOptions, device: torch.device) -> None:
        from alignfuse.models.albef.model import AlbefModel

        assert isinstance(model, AlbefModel)
        self.model = model
        self.tok = tokenizer
        self.opts = opts
        self.device = device

    def _tokens(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.tok(list(texts))
        t = max(1, int(mask.sum(dim=1).max()))
        return ids[:, :t].contiguous(), mask[:, :t].contiguous()

    def step_loss(self, data: PairData, images: list[int], step: int, epoch_frac: float) -> dict[str, Any]:
        from alignfuse.training.objectives_albef import AlbefBatch

        rng = _step_rng(self.opts.seed, step)
        caps = [data.captions_of[i][int(rng.integers(0, len(data.captions_of[i])))] for i in images]
        texts = [data.captions[k] for k in caps]
        ids, mask = self._tokens(texts)
        batch = AlbefBatch(data.pixels(images), ids, mask, torch.tensor(images, dtype=torch.long))
        if self.opts.perturb_negatives and data.perturb is not None:
            negs = [
                data.perturb(t, i, rng)
                for _ in range(self.opts.perturb_count)
                for t, i in zip(texts, images, strict=True)
            ]
            valid = torch.tensor([n is not None for n in negs])
            fill = texts * self.opts.perturb_count
            nids, nmask = self._tokens([n if n is not None else t for n, t in zip(negs, fill, strict=True)])
            batch.neg_ids, batch.neg_mask, batch.neg_valid = nids, nmask, valid
        if self.opts.attribute_captions and data.attribute is not None:
            aux, owner, label = [], [], []
            for r in range(self.opts.attribute_captions):
                for c, i in enumerate(images):
                    true = (r + c) % 2 == 0
                    text = data.attribute(i, true, rng)
                    if text is not None:
                        aux.append(text)
                        owner.append(c)
                        label.append(int(true))
            if aux:
                batch.aux_ids, batch.aux_mask = self._tokens(aux)
                batch.aux_owner = torch.tensor(owner, dtype=torch.long)
                batch.aux_label = torch.tensor(label, dtype=torch.long)
        if data.matches is not None:
            m = torch.zeros(len(images), len(images), dtype=torch.bool)
            for a, t in enumerate(texts):
                for c, img in enumerate(images):
                    if a != c and img != images[a]:
                        m[a, c] = data.matches(t, img)
            batch.match = m
        ramp = self.opts.alpha_ramp_steps
        alpha = self.model.options.alpha * (min(1.0, step / ramp) if ramp else min(1.0, epoch_frac))
        gen = torch.Generator(device="cpu").manual_seed(int(rng.integers(0, 2**62)))
        losses = self.model(
            batch.to(self.device), alpha=alpha, generator=gen if self.device.type == "cpu" else None
        )
        out = losses.as_dict()
        out["_total"] = losses.total
        return out

    @torch.no_grad()
    def embed(
        self, data: PairData, image_idx: Sequence[int], caption_idx: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.model
        img, txt = [], []
        for s in range(0, len(image_idx), 128):
            tok = m.image_tokens(data.pixels(list(image_idx[s : s + 128])).to(self.device))
            img.append(m.image_embed(tok).float().cpu())
        for s in range(0, len(caption_idx), 256):
            ids, mask = self._tokens([data.captions[k] for k in caption_idx[s : s + 256]])
            st = m.text_states(ids.to(self.device), mask.to(self.device))
            txt.append(m.text_embed(st).float().cpu())
        return torch.cat(img), torch.cat(txt)

    @torch.no_grad()
    def itm(self, data: PairData, pairs: Sequence[tuple[int, str]]) -> torch.Tensor | None:
        m = self.model
        uniq = sorted({i for i, _ in pairs})
        where = {img: r for r, img in enumerate(uniq)}
        tokens = (
            torch.cat(
                [
                    m.image_tokens(data.pixels(uniq[s : s + 128]).to(self.device))
                    for s in range(0, len(uniq), 128)
                ]
            )
            if uniq
            else None
        )
        out = []
        for s in range(0, len(pairs), 256):
            chunk = pairs[s : s + 256]
            ids, mask = self._tokens([t for _, t in chunk])
            ids, mask = ids.to(self.device), mask.to(self.device)
            assert tokens is not None
            tok = tokens[torch.tensor([where[i] for i, _ in chunk], device=tokens.device)]
            logits = m.itm_logits(m.text_states(ids, mask), mask, tok).float()
            out.append((logits[:, 1] - logits[:, 0]).cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def save_weights(self, out_dir: Path, name: str) -> list[Path]:
        from safetensors.torch import save_file

        from alignfuse.training.objectives_albef import inference_state_dict

        sd = {
            k: v.detach().float().contiguous().cpu()
            for k, v in inference_state_dict(self.model.state_dict()).items()
        }
        path = out_dir / f"{name}.safetensors"
        save_file(sd, str(path), metadata={"format": "pt", "layout": "albef-retrieval"})
        cfg_path = out_dir / f"{name}.json"
        cfg = self.model.config
        cfg_dict = cfg.to_dict()
        if cfg.vocab and not str(cfg.vocab).startswith("builtin:"):
            cfg_dict["vocab"] = "vocab.txt"
            vocab_dst = out_dir / "vocab.txt"
            src = Path(cfg.vocab)
            if src.resolve() != vocab_dst.resolve():
                vocab_dst.write_text(src.read_text(encoding="utf-8"), encoding="utf-8")
        cfg_path.write_text(json.dumps(cfg_dict, indent=2, sort_keys=True) + "\n")
        return [path, cfg_path]


class ClipArch(_Arch):
    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        model_cfg: dict[str, Any],
        opts: TrainOptions,
        device: torch.device,
    ) -> None:
        self.model = model
        self.tok = tokenizer
        self.model_cfg = model_cfg
        self.opts = opts
        self.device = device

    def step_loss(self, data: PairData, images: list[int], step: int, epoch_frac: float) -> dict[str, Any]:
        rng = _step_rng(self.opts.seed, step)
        caps = [data.captions_of[i][int(rng.integers(0, len(data.captions_of[i])))] for i in images]
        tokens = self.tok([data.captions[k] for k in caps]).to(self.device)
        m = self.model
        img = F.normalize(m.encode_image(data.pixels(images).to(self.device)).float(), dim=-1)
        txt = F.normalize(m.encode_text(tokens).float(), dim=-1)
        scale = m.logit_scale.exp().clamp(max=100.0)
        logits = scale * img @ txt.T
        idx = torch.tensor(images, device=self.device)
        pos = torch.eq(idx[:, None], idx[None, :]).float()
        targets = pos / pos.sum(1, keepdim=True)
        loss_i = -(F.log_softmax(logits, dim=1) * targets).sum(1).mean()
        loss_t = -(F.log_softmax(logits.T, dim=1) * targets).sum(1).mean()
        loss = (loss_i + loss_t) / 2
        return {"loss": float(loss.detach()), "itc": float(loss.detach()), "_total": loss}

    @torch.no_grad()
    def embed(
        self, data: PairData, image_idx: Sequence[int], caption_idx: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.model
        img, txt = [], []
        for s in range(0, len(image_idx), 128):
            img.append(
                F.normalize(
                    m.encode_image(data.pixels(list(image_idx[s : s + 128])).to(self.device)).float(), dim=-1
                ).cpu()
            )
        for s in range(0, len(caption_idx), 256):
            tokens = self.tok([data.captions[k] for k in caption_idx[s : s + 256]]).to(self.device)
            txt.append(F.normalize(m.encode_text(tokens).float(), dim=-1).cpu())
        return torch.cat(img), torch.cat(txt)

    def save_weights(self, out_dir: Path, name: str) -> list[Path]:
        from safetensors.torch import save_file

        sd = {k: v.detach().float().contiguous().cpu() for k, v in self.model.state_dict().items()}
        path = out_dir / f"{name}.safetensors"
        save_file(sd, str(path), metadata={"format": "pt", "layout": "open_clip"})
        cfg_path = out_dir / f"{name}.json"
        cfg_path.write_text(json.dumps(self.model_cfg, indent=2) + "\n")
        return [path, cfg_path]


# ---------------------------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class EvalResult:
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
    group_acc_itc: float | None = None  # inside each group: the ITC-best image makes the caption true
    group_acc_itm: float | None = None  # same with the ITM score
    group_chance: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


@torch.no_grad()
def evaluate(
    arch: _Arch,
    data: PairData,
    max_images: int = 500,
    rerank_k: int = 8,
    seed: int = 0,
    dual: _Arch | None = None,
) -> EvalResult:
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
        res = EvalResult(images=n_img, captions=len(caps), itc_tr_r1=tr_r1, itc_ir_r1=ir_r1)
        rng = np.random.default_rng([seed, 99])
        probe = arch.itm(data, [(0, data.captions[caps[0]])])
        if probe is None:
            return replace(res, **_group_metrics(data, sims, caps, None, arch))
        k = min(rerank_k, n_img)
        # rerank: ITM over the top-k of each direction
        top_t = sims.topk(k, dim=1).indices  # per image, k captions
        pairs = [(i, data.captions[caps[int(j)]]) for i in range(n_img) for j in top_t[i]]
        sc = arch.itm(data, pairs)
        assert sc is not None
        best = top_t.gather(1, sc.view(n_img, k).argmax(dim=1, keepdim=True)).squeeze(1)
        rr_tr = float((cap_img[best] == torch.arange(n_img)).float().mean()) * 100
        top_i = sims.topk(k, dim=0).indices.T  # per caption, k images
        pairs = [(int(i), data.captions[caps[c]]) for c in range(len(caps)) for i in top_i[c]]
        sc = arch.itm(data, pairs)
        assert sc is not None
        best_i = top_i.gather(1, sc.view(len(caps), k).argmax(dim=1, keepdim=True)).squeeze(1)
        rr_ir = float((best_i == cap_img).float().mean()) * 100
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
        extra.update(_group_metrics(data, sims, caps, cap_img, arch, n_img=n_img))
        return replace(
            res,
            rerank_tr_r1=rr_tr,
            rerank_ir_r1=rr_ir,
            itm_acc_random=acc_random,
            itm_pos_rate=pos_rate,
            **extra,
        )
    finally:
        arch.model.train(was_training)


def _false(data: PairData, caption: str, image: int) -> bool:
    return data.matches is None or not data.matches(caption, image)


def _group_metrics(
    data: PairData,
    sims: torch.Tensor,
    caps: list[int],
    cap_img: torch.Tensor | None,
    arch: _Arch,
    n_img: int | None = None,
) -> dict[str, Any]:
    """Inside each group: does the best-scoring group member make the caption true?"""
    if data.groups is None:
        return {}
    n_img = n_img or sims.shape[0]
    hits_itc: list[bool] = []
    hits_itm: list[bool] = []
    chance: list[float] = []
    pairs: list[tuple[int, str]] = []
    spans: list[tuple[int, int, list[bool]]] = []
    col = {k: c for c, k in enumerate(caps)}
    for i in range(n_img):
        members = [j for j in [i, *data.siblings(i)] if j < n_img]
        if len(members) < 2:
            continue
        for k in data.captions_of[i][:2]:
            truth = [data.matches(data.captions[k], j) if data.matches else j == i for j in members]
            truth[0] = True
            if all(truth):
                continue
            c = col[k]
            scores = sims[members, c]
            hits_itc.append(truth[int(scores.argmax())])
            chance.append(sum(truth) / len(truth))
            spans.append((len(pairs), len(members), truth))
            pairs += [(j, data.captions[k]) for j in members]
    out: dict[str, Any] = {}
    if not hits_itc:
        return out
    out["group_acc_itc"] = float(np.mean(hits_itc))
    out["group_chance"] = float(np.mean(chance))
    sc = arch.itm(data, pairs) if cap_img is not None else None
    if sc is not None:
        for start, n, truth in spans:
            hits_itm.append(truth[int(sc[start : start + n].argmax())])
        out["group_acc_itm"] = float(np.mean(hits_itm))
    return out


# ---------------------------------------------------------------------------------------------- loop


@dataclass
class TrainState:
    epoch: int = 0
    step: int = 0  # optimizer steps done
    batch_in_epoch: int = 0  # micro-batches of the current epoch already consumed
    elapsed_s: float = 0.0  # training wall time over all sessions (time-based schedule)
    history: list[dict[str, Any]] = field(default_factory=list)


def cosine_lambda(total_steps: int, warmup: int, base_lr: float, min_lr: float) -> Callable[[int], float]:
    floor = min_lr / base_lr if base_lr > 0 else 0.0

    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))

    return f


def _param_groups(model: nn.Module, wd: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if (
            p.ndim < 2
            or "LayerNorm" in name
            or name.endswith(("bias", "temp", "logit_scale"))
            or "pos_embed" in name
            or "cls_token" in name
        ):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


class Trainer:
    """Runs :class:`TrainOptions` over :class:`PairData` with a model adapter; see the module docstring."""

    def __init__(
        self,
        arch: _Arch,
        data: PairData,
        opts: TrainOptions,
        out_dir: str | Path,
        val: PairData | None = None,
        progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.arch = arch
        self.data = data
        self.opts = opts
        self.val = val
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.progress = progress
        self.batches_per_epoch = len(epoch_batches(data, opts, 0))
        steps_per_epoch = math.ceil(self.batches_per_epoch / opts.grad_accum)
        self.total_steps = steps_per_epoch * opts.epochs
        self.optimizer = torch.optim.AdamW(
            _param_groups(arch.model, opts.weight_decay), lr=opts.lr, betas=(0.9, 0.98)
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, cosine_lambda(self.total_steps, opts.warmup_steps, opts.lr, opts.min_lr)
        )
        self.state = TrainState()
        self._session_start = time.monotonic()
        self.log_path = self.out / "train_log.jsonl"

    # ----------------------------------------------------------- checkpoints
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.pth"

    def save_checkpoint(self, path: Path | None = None) -> Path:
        path = path or self.checkpoint_path()
        model = self.arch.model
        blob = {
            "model": model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.scheduler.state_dict(),
            "config": _jsonable_config(model),
            "epoch": self.state.epoch,
            "step": self.state.step,
            "batch_in_epoch": self.state.batch_in_epoch,
            "elapsed_s": self.state.elapsed_s + (time.monotonic() - self._session_start),
            "history": json.dumps(self.state.history),
            "options": json.dumps(asdict(self.opts)),
            "rng": {
                "torch": torch.get_rng_state(),
                "numpy": json.dumps(np.random.get_state(legacy=False), default=_np_default),
                "python": json.dumps(random.getstate()),
            },
        }
        tmp = path.with_suffix(".tmp")
        torch.save(blob, tmp)
        tmp.replace(path)
        log.info("saved checkpoint %s (epoch %d, step %d)", path, self.state.epoch, self.state.step)
        return path

    def init_model_from(self, path: str | Path) -> None:
        """Start from a checkpoint's model weights (incl. momentum encoders and queues) with fresh optimizer,
        schedule and step count (a second training stage)."""
        p = Path(path)
        if p.is_dir():
            p = p / "checkpoint.pth"
        if not p.is_file():
            raise CheckpointError(f"no checkpoint at {p}")
        blob = torch.load(p, map_location="cpu", weights_only=True)
        missing, unexpected = self.arch.model.load_state_dict(blob.get("model", blob), strict=False)
        if missing or unexpected:
            raise CheckpointError(
                f"{p} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        log.info("initialised the model from %s (step %s)", p, blob.get("step"))

    def load_checkpoint(self, path: str | Path) -> None:
        p = Path(path)
        if p.is_dir():
            p = p / "checkpoint.pth"
        if not p.is_file():
            raise CheckpointError(f"no checkpoint to resume from at {p}")
        blob = torch.load(p, map_location="cpu", weights_only=True)
        missing, unexpected = self.arch.model.load_state_dict(blob["model"], strict=False)
        if missing or unexpected:
            raise CheckpointError(
                f"checkpoint {p} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        self.optimizer.load_state_dict(blob["optimizer"])
        self.scheduler.load_state_dict(blob["lr_scheduler"])
        self.state = TrainState(
            epoch=int(blob["epoch"]),
            step=int(blob["step"]),
            batch_in_epoch=int(blob["batch_in_epoch"]),
            elapsed_s=float(blob.get("elapsed_s", 0.0)),
            history=json.loads(blob["history"]),
        )
        self._session_start = time.monotonic()
        torch.set_rng_state(blob["rng"]["torch"])
        st = json.loads(blob["rng"]["numpy"])
        np.random.set_state(st)
        py = json.loads(blob["rng"]["python"])
        random.setstate((py[0], tuple(py[1]), py[2]))
        log.info("resumed from %s at epoch %d, step %d", p, self.state.epoch, self.state.step)

    # ----------------------------------------------------------- loop
    def _autocast(self) -> Any:
        dev = next(self.arch.model.parameters()).device
        if dev.type == "cuda" and self.opts.precision == "bf16":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

    def train(self, max_steps: int | None = None) -> TrainState:
        """Train until the epochs are done, ``max_steps`` optimizer steps were taken (in this call), or the
        time budget runs out. Returns the final state; checkpoints and logs are under ``out_dir``."""
        opts = self.opts
        model = self.arch.model
        model.train()
        start = time.monotonic()
        self._session_start = start
        steps_here = 0
        t_last, n_last = time.monotonic(), 0
        stop = False
        while self.state.epoch < opts.epochs and not stop:
            batches = epoch_batches(self.data, opts, self.state.epoch)
            accum = 0
            self.optimizer.zero_grad(set_to_none=True)
            while self.state.batch_in_epoch < len(batches):
                b = self.state.batch_in_epoch
                frac = (b + 1) / len(batches) if self.state.epoch == 0 else 1.0
                torch.manual_seed(opts.seed * 1_000_003 + self.state.step * 97 + accum)
                self.data.perturb_easy = self._easy_share(start)
                with self._autocast():
                    out = self.arch.step_loss(self.data, batches[b], self.state.step, frac)
                loss = out.pop("_total") / opts.grad_accum
                loss.backward()
                accum += 1
                self.state.batch_in_epoch += 1
                n_last += len(batches[b])
                if accum < opts.grad_accum and self.state.batch_in_epoch < len(batches):
                    continue
                if opts.grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), opts.grad_clip)
                self.optimizer.step()
                self.scheduler.step()
                if opts.time_schedule and opts.max_minutes:
                    self._time_lr(self.state.elapsed_s + time.monotonic() - start)
                self.optimizer.zero_grad(set_to_none=True)
                accum = 0
                self.state.step += 1
                steps_here += 1
                now = time.monotonic()
                rec = {
                    "epoch": self.state.epoch,
                    "step": self.state.step,
                    "lr": self.optimizer.param_groups[0]["lr"],
                    **{k: v for k, v in out.items() if not k.startswith("_")},
                }
                if now - t_last > 0:
                    rec["samples_per_s"] = n_last / (now - t_last)
                t_last, n_last = now, 0
                self._log(rec)
                if self.progress:
                    self.progress({**rec, "batch": self.state.batch_in_epoch, "batches": len(batches)})
                if opts.save_every and self.state.step % opts.save_every == 0:
                    self.save_checkpoint()
                if max_steps is not None and steps_here >= max_steps:
                    stop = True
                    break
                if (
                    opts.max_minutes is not None
                    and (self.state.elapsed_s + now - start) / 60 >= opts.max_minutes
                ):
                    log.info("time budget of %.1f min reached at step %d", opts.max_minutes, self.state.step)
                    stop = True
                    break
            if self.state.batch_in_epoch >= len(batches):
                self.state.epoch += 1
                self.state.batch_in_epoch = 0
                self.end_of_epoch()
        if stop and self.state.batch_in_epoch:
            self.save_checkpoint()
        return self.state

    def _progress(self, start: float) -> float:
        p = self.state.step / max(1, self.total_steps)
        if self.opts.time_schedule and self.opts.max_minutes:
            p = max(p, (self.state.elapsed_s + time.monotonic() - start) / (self.opts.max_minutes * 60))
        return min(1.0, p)

    def _easy_share(self, start: float) -> float:
        a, b = self.opts.perturb_easy_start, self.opts.perturb_easy_end
        if a == b:
            return a
        return a + (b - a) * self._progress(start)

    def _time_lr(self, elapsed: float) -> None:
        opts = self.opts
        assert opts.max_minutes
        budget = opts.max_minutes * 60
        frac = min(1.0, max(elapsed / budget, self.state.step / max(1, self.total_steps)))
        floor = opts.min_lr / opts.lr
        if self.state.step < opts.warmup_steps:
            f = (self.state.step + 1) / opts.warmup_steps
        else:
            f = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * frac))
        for g in self.optimizer.param_groups:
            g["lr"] = opts.lr * f

    def end_of_epoch(self) -> None:
        rec: dict[str, Any] = {"epoch_done": self.state.epoch, "step": self.state.step}
        if self.val is not None:
            t0 = time.monotonic()
            res = evaluate(
                self.arch, self.val, self.opts.eval_max_images, self.opts.eval_rerank_k, self.opts.seed
            )
            rec["val"] = res.as_dict()
            rec["eval_s"] = round(time.monotonic() - t0, 1)
        self.state.history.append(rec)
        self._log(rec)
        if self.progress:
            self.progress(rec)
        self.save_checkpoint()

    def _log(self, rec: dict[str, Any]) -> None:
        with self.log_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(rec, default=float) + "\n")


def _np_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o))


def _jsonable_config(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "to_dict"):
        return json.dumps(cfg.to_dict())
    return "{}"
