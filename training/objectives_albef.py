"""ALBEF's training objectives: ITC with momentum encoders, queues and momentum distillation; ITM with in-batch
hard negatives sampled from the ITC similarities (plus optional caption-perturbation negatives); MLM on the
fused text (15%, 80/10/10, ALBEF's second forward pass on the masked caption).

(Over 450 lines on purpose: the three objectives — and the optional bag of words and object ITC — share the momentum model,
the queues and one forward pass (MLM's second pass reads the same image states, ITM's negatives come from ITC's
similarities), and read best side by side with ALBEF's own ``model_retrieval.py``.)

:class:`AlbefForTraining` is :class:`~alignfuse.models.albef.model.AlbefModel` plus ALBEF's momentum copies and queues,
with ALBEF's parameter names, so ``state_dict()`` *is* an official checkpoint layout:

- without MLM: the retrieval model (``albef_retrieval_keys.json``: ``visual_encoder_m``, ``vision_proj_m``,
  ``text_encoder_m``, ``text_proj_m``, ``image_queue``, ``text_queue``, ``idx_queue``, ``queue_ptr``);
- with MLM: the pre-training layout (``albef_pretrain_keys.json``): the text encoders become
  ``BertForMaskedLM``-shaped (``text_encoder.bert.*`` + ``text_encoder.cls.*``), plus ``idx_queue``.

:func:`inference_state_dict` strips either layout down to what the retrieval model needs (the released
``mscoco.pth`` layout), which is what ``load_albef_checkpoint`` reads.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from alignfuse.errors import InvalidInputError
from alignfuse.models.albef.bert import KV, AlbefBert, BertMLMHead
from alignfuse.models.albef.config import AlbefConfig
from alignfuse.models.albef.model import AlbefModel, build_visual_encoder, pool_image
from alignfuse.training.bow import bow_loss, bow_size
from alignfuse.training.contrastive import soft_cross_entropy

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


@dataclass(frozen=True)
class AlbefTrainingOptions:
    """Hyper-parameters of the objectives (ALBEF's defaults where it has them)."""

    queue_size: int = 4096
    momentum: float = 0.995
    alpha: float = 0.4  # momentum-distillation weight (ramped by the caller over the first epoch)
    distill: bool = True
    #: also distil MLM from the momentum model (costs a momentum text + fusion forward per step)
    mlm_distill: bool = True
    mlm: bool = False
    mlm_probability: float = 0.15
    #: probability that a caption's MLM masking instead hides *all* tokens of one concept group (e.g. every
    #: colour word, or the relation word), so the masked words cannot be recovered by elimination from text
    concept_mask_prob: float = 0.0
    #: token ids per concept group (colours, shapes, relations, ...); used with ``concept_mask_prob``
    concept_groups: tuple[tuple[int, ...], ...] = ()
    #: weight ITM classes so positives and negatives count equally (avoids the collapsed "no match" prior)
    itm_balance: bool = False
    #: token ids of [CLS], [SEP], [MASK], [PAD] (bert-base-uncased's by default)
    special_ids: tuple[int, int, int, int] = (101, 102, 103, 0)
    itm_weight: float = 1.0
    itc_weight: float = 1.0
    mlm_weight: float = 1.0
    #: bag-of-words objective (:mod:`alignfuse.training.bow`): weight (0 = off, no head) and hashed pair buckets
    bow_weight: float = 0.0
    bow_buckets: int = 2048
    #: object ITC: weight of a second contrastive loss between the images and short captions naming one of
    #: their objects ("a red circle"), whose truth over every image is known (0 = off)
    object_itc_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.queue_size < 1:
            raise InvalidInputError("queue_size must be >= 1")
        if not 0.0 <= self.momentum < 1.0:
            raise InvalidInputError("momentum must lie in [0, 1)")
        if not 0.0 <= self.mlm_probability <= 1.0 or not 0.0 <= self.concept_mask_prob <= 1.0:
            raise InvalidInputError("probabilities must lie in [0, 1]")
        if self.bow_weight < 0 or self.bow_buckets < 0 or self.object_itc_weight < 0:
            raise InvalidInputError("bow_weight, bow_buckets and object_itc_weight must be >= 0")


@dataclass
class AlbefBatch:
    """One training batch. ``idx`` identifies the *image* of each pair (same idx = same image, so its other
    captions are positives, never negatives). Optional:

    ``neg_ids``/``neg_mask``/``neg_valid``: perturbed (false) captions, ``P * B`` rows, row ``r`` belonging
    to image ``r % B``: extra ITM negatives where ``neg_valid``; ``aux_ids``/``aux_mask``/``aux_owner``/
    ``aux_label``: further labelled ITM pairs (caption row, index of its image in the batch, 1 = match), e.g.
    captions naming one attribute alone; ``match``: [B, B] bool, ``match[i, j]`` = caption i is also true of image j (never
    sampled as an ITM negative; the diagonal is implied).
    """

    pixels: torch.Tensor
    ids: torch.Tensor
    mask: torch.Tensor
    idx: torch.Tensor
    neg_ids: torch.Tensor | None = None
    neg_mask: torch.Tensor | None = None
    neg_valid: torch.Tensor | None = None
    match: torch.Tensor | None = None
    aux_ids: torch.Tensor | None = None
    aux_mask: torch.Tensor | None = None
    aux_owner: torch.Tensor | None = None
    aux_label: torch.Tensor | None = None
    #: bag-of-words targets [B, labels] (multi-hot over the words and word pairs of the image's captions)
    bow: torch.Tensor | None = None
    #: object ITC: per batch image a short caption naming one of its objects (``obj_ids``/``obj_mask``, B rows)
    #: and ``obj_truth`` [N, B] bool, caption j's truth over all N images of the data (rows indexed by ``idx``)
    obj_ids: torch.Tensor | None = None
    obj_mask: torch.Tensor | None = None
    obj_truth: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> AlbefBatch:
        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        return AlbefBatch(
            self.pixels.to(device, non_blocking=True),
            self.ids.to(device),
            self.mask.to(device),
            self.idx.to(device),
            mv(self.neg_ids),
            mv(self.neg_mask),
            mv(self.neg_valid),
            mv(self.match),
            mv(self.aux_ids),
            mv(self.aux_mask),
            mv(self.aux_owner),
            mv(self.aux_label),
            mv(self.bow),
            mv(self.obj_ids),
            mv(self.obj_mask),
            mv(self.obj_truth),
        )


@dataclass(frozen=True)
class AlbefLosses:
    """Losses of one step (``total`` carries the graph) and detached diagnostics."""

    total: torch.Tensor
    itc: torch.Tensor
    itm: torch.Tensor
    mlm: torch.Tensor
    itm_acc: float  # over all ITM pairs of the batch
    itm_pos_acc: float  # positives predicted "match"
    itm_neg_acc: float  # in-batch hard negatives predicted "no match"
    itm_pert_acc: float  # caption-perturbation negatives predicted "no match" (nan when none)
    itm_aux_acc: float = math.nan  # labelled extra pairs (attribute captions) predicted right
    bow: float = math.nan  # bag-of-words loss (nan when off)
    obj_itc: float = math.nan  # object ITC loss (nan when off)

    def as_dict(self) -> dict[str, float]:
        return {
            "loss": float(self.total.detach()),
            "itc": float(self.itc.detach()),
            "itm": float(self.itm.detach()),
            "mlm": float(self.mlm.detach()),
            "itm_acc": self.itm_acc,
            "itm_pos_acc": self.itm_pos_acc,
            "itm_neg_acc": self.itm_neg_acc,
            "itm_pert_acc": self.itm_pert_acc,
            "itm_aux_acc": self.itm_aux_acc,
            "bow": self.bow,
            "obj_itc": self.obj_itc,
        }


class BertForMaskedLM(nn.Module):
    """``bert`` (:class:`AlbefBert`) + ``cls`` (MLM head), ALBEF's pre-training text encoder layout.

    Forwards the :class:`AlbefBert` API (``forward_text``, ``cross_kv``, ``forward_fusion``) so
    :class:`AlbefModel`'s methods work unchanged with it as ``text_encoder``."""

    def __init__(self, config: AlbefConfig) -> None:
        super().__init__()
        self.config = config
        self.bert = AlbefBert(config)
        self.cls = BertMLMHead(config, self.bert.embeddings.word_embeddings)

    @property
    def embeddings(self) -> nn.Module:
        return self.bert.embeddings

    @property
    def fusion_layers(self) -> list[nn.Module]:
        return list(self.bert.fusion_layers)

    def forward_text(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.bert.forward_text(*args, **kwargs)

    def cross_kv(self, *args: Any, **kwargs: Any) -> tuple[KV, ...]:
        return self.bert.cross_kv(*args, **kwargs)

    def forward_fusion(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.bert.forward_fusion(*args, **kwargs)


def _momentum_pairs(model: AlbefForTraining) -> list[tuple[nn.Module, nn.Module]]:
    return [
        (model.visual_encoder, model.visual_encoder_m),
        (model.vision_proj, model.vision_proj_m),
        (model.text_encoder, model.text_encoder_m),
        (model.text_proj, model.text_proj_m),
    ]


class AlbefForTraining(AlbefModel):
    """ALBEF with momentum encoders, queues and the ITC / ITM / MLM objectives (see module docstring)."""

    image_queue: torch.Tensor
    text_queue: torch.Tensor
    idx_queue: torch.Tensor
    queue_ptr: torch.Tensor

    def __init__(self, config: AlbefConfig, options: AlbefTrainingOptions | None = None) -> None:
        super().__init__(config)
        self.options = options or AlbefTrainingOptions()
        opts = self.options
        if opts.mlm:
            # pre-training layout: text_encoder.bert.* + text_encoder.cls.*, initialised like the rest
            wrapped = BertForMaskedLM(config)
            wrapped.bert.load_state_dict(self.text_encoder.state_dict())
            self.text_encoder = wrapped  # type: ignore[assignment]
            self._init_linear_like(wrapped.cls)
        # buffers first so state_dict order follows ALBEF's (temp, queues, then modules)
        e = config.embed_dim
        q = opts.queue_size
        self.register_buffer("image_queue", F.normalize(torch.randn(e, q), dim=0))
        self.register_buffer("text_queue", F.normalize(torch.randn(e, q), dim=0))
        self.register_buffer("idx_queue", torch.full((1, q), -100, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        self.visual_encoder_m = build_visual_encoder(config)
        self.vision_proj_m = nn.Linear(config.vision_width, config.embed_dim)
        self.text_encoder_m: Any = BertForMaskedLM(config) if opts.mlm else AlbefBert(config)
        self.text_proj_m = nn.Linear(config.hidden_size, config.embed_dim)
        self.copy_params()
        if opts.bow_weight > 0:  # training-only head; inference_state_dict drops it
            self.bow_head = nn.Linear(config.vision_width, bow_size(config.vocab_size, opts.bow_buckets))
            nn.init.normal_(self.bow_head.weight, std=config.init_std)
            nn.init.zeros_(self.bow_head.bias)

    def _init_linear_like(self, head: BertMLMHead) -> None:
        """BERT init for the MLM head (its decoder weight is tied to the word embeddings)."""
        t = head.predictions.transform
        nn.init.normal_(t.dense.weight, std=self.config.init_std)
        nn.init.zeros_(t.dense.bias)
        nn.init.ones_(t.LayerNorm.weight)
        nn.init.zeros_(t.LayerNorm.bias)
        nn.init.zeros_(head.predictions.bias)

    # ------------------------------------------------------------------ momentum + queues
    @torch.no_grad()
    def copy_params(self) -> None:
        """Initialise the momentum copies from the online model; they are never trained by gradients."""
        for online, mom in _momentum_pairs(self):
            mom.load_state_dict(online.state_dict())
            for p in mom.parameters():
                p.requires_grad_(False)

    @torch.no_grad()
    def momentum_update(self) -> None:
        m = self.options.momentum
        for online, mom in _momentum_pairs(self):
            for p, pm in zip(online.parameters(), mom.parameters(), strict=True):
                pm.data.mul_(m).add_(p.data, alpha=1.0 - m)

    @torch.no_grad()
    def dequeue_and_enqueue(
        self, image_feat: torch.Tensor, text_feat: torch.Tensor, idx: torch.Tensor
    ) -> None:
        n = image_feat.shape[0]
        q = self.image_queue.shape[1]
        ptr = int(self.queue_ptr)
        if n >= q:
            image_feat, text_feat, idx = image_feat[-q:], text_feat[-q:], idx[-q:]
            n = q
        pos = (torch.arange(n, device=image_feat.device) + ptr) % q
        self.image_queue[:, pos] = image_feat.T.to(self.image_queue.dtype)
        self.text_queue[:, pos] = text_feat.T.to(self.text_queue.dtype)
        self.idx_queue[0, pos] = idx
        self.queue_ptr[0] = (ptr + n) % q

    # ------------------------------------------------------------------ MLM masking
    def mask_tokens(
        self, ids: torch.Tensor, mask: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """BERT masking: each real token except [CLS]/[SEP]/[PAD] chosen with ``mlm_probability``; chosen
        tokens become [MASK] (80%), a random token (10%) or stay (10%). With ``concept_mask_prob`` a caption
        instead has every token of one concept group it contains chosen (e.g. both colour words).
        Returns (masked ids, labels with -100 on unchosen tokens)."""
        opts = self.options
        cfg = self.config
        special = dict(zip(("cls", "sep", "mask", "pad"), opts.special_ids, strict=True))
        dev = ids.device
        labels = ids.clone()
        can = mask.bool() & (ids != special["cls"]) & (ids != special["sep"]) & (ids != special["pad"])
        prob = torch.full(ids.shape, opts.mlm_probability, device=dev)
        chosen = (torch.rand(ids.shape, generator=generator, device=dev) < prob) & can
        if opts.concept_mask_prob > 0 and opts.concept_groups:
            use = torch.rand(ids.shape[0], generator=generator, device=dev) < opts.concept_mask_prob
            if bool(use.any()):
                n_groups = len(opts.concept_groups)
                pick = torch.randint(0, n_groups, (ids.shape[0],), generator=generator, device=dev)
                for g, tokens in enumerate(opts.concept_groups):
                    member = torch.isin(ids, torch.tensor(tokens, device=dev)) & can
                    rows = use & (pick == g) & member.any(dim=1)
                    chosen = torch.where(rows[:, None], member, chosen)
        labels[~chosen] = IGNORE_INDEX
        masked = ids.clone()
        r = torch.rand(ids.shape, generator=generator, device=dev)
        to_mask = chosen & (r < 0.8)
        to_rand = chosen & (r >= 0.8) & (r < 0.9)
        masked[to_mask] = special["mask"]
        rand_tok = torch.randint(0, cfg.vocab_size, ids.shape, generator=generator, device=dev)
        masked[to_rand] = rand_tok[to_rand]
        return masked, labels

    # ------------------------------------------------------------------ forward
    def forward(  # type: ignore[override]
        self, batch: AlbefBatch, alpha: float | None = None, generator: torch.Generator | None = None
    ) -> AlbefLosses:
        """All objectives for one batch. ``alpha``: distillation weight for this step (default: options)."""
        opts = self.options
        alpha = opts.alpha if alpha is None else alpha
        if not opts.distill:
            alpha = 0.0
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        b = batch.ids.shape[0]
        if b < 2:
            raise InvalidInputError("ALBEF training needs a batch of at least 2 pairs")
        image_tokens = self.image_tokens(batch.pixels)
        image_feat = self.image_embed(image_tokens)
        text_states = self.text_states(batch.ids, batch.mask)
        text_feat = self.text_embed(text_states)

        # ---------------- ITC with momentum distillation and queues
        idx = batch.idx.view(-1, 1)
        idx_all = torch.cat([idx.T, self.idx_queue.clone().detach()], dim=1)
        pos_idx = torch.eq(idx, idx_all).float()
        sim_targets = pos_idx / pos_idx.sum(1, keepdim=True)
        with torch.no_grad():
            self.momentum_update()
            image_tokens_m = self.visual_encoder_m.forward_features(batch.pixels)
            image_feat_m = F.normalize(
                self.vision_proj_m(pool_image(image_tokens_m, self.config.image_pool)), dim=-1
            )
            image_feat_all = torch.cat([image_feat_m.T, self.image_queue.clone().detach()], dim=1)
            text_states_m = self.text_encoder_m.forward_text(batch.ids, batch.mask)
            text_feat_m = F.normalize(self.text_proj_m(text_states_m[:, 0, :]), dim=-1)
            text_feat_all = torch.cat([text_feat_m.T, self.text_queue.clone().detach()], dim=1)
            if alpha > 0:
                sim_i2t_m = image_feat_m @ text_feat_all / self.temp
                sim_t2i_m = text_feat_m @ image_feat_all / self.temp
                i2t_targets = alpha * F.softmax(sim_i2t_m, dim=1) + (1 - alpha) * sim_targets
                t2i_targets = alpha * F.softmax(sim_t2i_m, dim=1) + (1 - alpha) * sim_targets
            else:
                i2t_targets = t2i_targets = sim_targets
        sim_i2t = image_feat @ text_feat_all / self.temp
        sim_t2i = text_feat @ image_feat_all / self.temp
        loss_i2t = -torch.sum(F.log_softmax(sim_i2t, dim=1) * i2t_targets, dim=1).mean()
        loss_t2i = -torch.sum(F.log_softmax(sim_t2i, dim=1) * t2i_targets, dim=1).mean()
        loss_itc = (loss_i2t + loss_t2i) / 2
        loss_obj = self._object_itc(image_feat, batch) if opts.object_itc_weight > 0 else None
        self.dequeue_and_enqueue(image_feat_m, text_feat_m, batch.idx)

        # ---------------- ITM with hard negatives sampled from the in-batch ITC similarities
        kv = self.cross_kv(image_tokens)
        out_pos = self.fuse(text_states, batch.mask, None, kv)[:, 0, :]
        with torch.no_grad():
            same = torch.eq(idx, idx.T)
            if batch.match is not None:
                same = same | batch.match.bool() | batch.match.bool().T
            sim = image_feat @ text_feat.T / self.temp  # [image i, text j]
            w_i2t = F.softmax(sim.float(), dim=1) + 1e-5
            w_t2i = F.softmax(sim.T.float(), dim=1) + 1e-5
            w_i2t = w_i2t.masked_fill(same.T, 0)  # image i must not get a text that matches it
            w_t2i = w_t2i.masked_fill(same, 0)  # text j must not get an image it matches
            w_i2t = _rows_with_mass(w_i2t)
            w_t2i = _rows_with_mass(w_t2i)
            neg_img = torch.multinomial(w_t2i, 1, generator=generator).squeeze(1)  # per text: an image
            neg_txt = torch.multinomial(w_i2t, 1, generator=generator).squeeze(1)  # per image: a text
        # pairs (text j, neg image) and (neg text, image i)
        states_all = torch.cat([text_states, text_states[neg_txt]], dim=0)
        mask_all = torch.cat([batch.mask, batch.mask[neg_txt]], dim=0)
        kv_all = tuple((torch.cat([k[neg_img], k]), torch.cat([v[neg_img], v])) for k, v in kv)
        out_neg = self.fuse(states_all, mask_all, None, kv_all)[:, 0, :]
        parts = [out_pos, out_neg]
        n_pert = 0
        if batch.neg_ids is not None and batch.neg_mask is not None:
            rows = batch.neg_ids.shape[0]  # P * B: row r is a false caption of image r % B
            valid = (
                batch.neg_valid.bool()
                if batch.neg_valid is not None
                else torch.ones(rows, dtype=torch.bool, device=batch.ids.device)
            )
            if bool(valid.any()):
                sel = valid.nonzero().squeeze(1)
                owner = sel % b
                pert_states = self.text_states(batch.neg_ids[sel], batch.neg_mask[sel])
                kv_p = tuple((k[owner], v[owner]) for k, v in kv)
                parts.append(self.fuse(pert_states, batch.neg_mask[sel], None, kv_p)[:, 0, :])
                n_pert = int(sel.numel())
        label_parts = [torch.ones(b, dtype=torch.long), torch.zeros(2 * b + n_pert, dtype=torch.long)]
        n_aux = 0
        if batch.aux_ids is not None and batch.aux_mask is not None and batch.aux_ids.shape[0] > 0:
            if batch.aux_owner is None or batch.aux_label is None:
                raise InvalidInputError("aux_ids need aux_owner and aux_label")
            aux_states = self.text_states(batch.aux_ids, batch.aux_mask)
            kv_a = tuple((k[batch.aux_owner], v[batch.aux_owner]) for k, v in kv)
            parts.append(self.fuse(aux_states, batch.aux_mask, None, kv_a)[:, 0, :])
            label_parts.append(batch.aux_label.long().cpu())
            n_aux = int(batch.aux_ids.shape[0])
        logits = self.itm_head(torch.cat(parts, dim=0))
        labels = torch.cat(label_parts).to(logits.device)
        if opts.itm_balance:
            n_pos = int(labels.sum())
            n_neg = int(labels.numel()) - n_pos
            weight = torch.tensor([1.0, n_neg / n_pos], device=logits.device) * (
                (n_neg + n_pos) / (2 * n_neg)
            )
            loss_itm = F.cross_entropy(logits.float(), labels, weight=weight)
        else:
            loss_itm = F.cross_entropy(logits.float(), labels)
        with torch.no_grad():
            pred = logits.argmax(dim=1)
            correct = (pred == labels).float()
            itm_acc = float(correct.mean())
            pos_acc = float(correct[:b].mean())
            neg_acc = float(correct[b : 3 * b].mean())
            pert_acc = float(correct[3 * b : 3 * b + n_pert].mean()) if n_pert else math.nan
            aux_acc = float(correct[3 * b + n_pert :].mean()) if n_aux else math.nan

        # ---------------- MLM (second forward pass of the masked caption through text + fusion layers)
        loss_mlm = torch.zeros((), device=logits.device)
        if opts.mlm:
            masked, mlm_labels = self.mask_tokens(batch.ids, batch.mask, generator)
            if bool((mlm_labels != IGNORE_INDEX).any()):
                te = self.text_encoder
                assert isinstance(te, BertForMaskedLM)
                hidden = self.fuse(self.text_states(masked, batch.mask), batch.mask, None, kv)
                sel_pos = mlm_labels != IGNORE_INDEX
                pred_logits = te.cls(hidden[sel_pos]).float()
                target = mlm_labels[sel_pos]
                loss_mlm = F.cross_entropy(pred_logits, target)
                if alpha > 0 and opts.mlm_distill:
                    with torch.no_grad():
                        tem = self.text_encoder_m
                        assert isinstance(tem, BertForMaskedLM)
                        states_m = tem.forward_text(masked, batch.mask)
                        hidden_m = tem.forward_fusion(states_m, batch.mask, tem.cross_kv(image_tokens_m))
                        soft = F.softmax(tem.cls(hidden_m[sel_pos]).float(), dim=-1)
                    loss_distill = -torch.sum(F.log_softmax(pred_logits, dim=-1) * soft, dim=-1).mean()
                    loss_mlm = (1 - alpha) * loss_mlm + alpha * loss_distill

        total = opts.itc_weight * loss_itc + opts.itm_weight * loss_itm + opts.mlm_weight * loss_mlm
        bow = math.nan
        if opts.bow_weight > 0 and batch.bow is not None:  # from the vector the ITC projects
            loss_bow = bow_loss(self.bow_head(pool_image(image_tokens, self.config.image_pool)), batch.bow)
            total = total + opts.bow_weight * loss_bow
            bow = float(loss_bow.detach())
        obj = math.nan
        if loss_obj is not None:
            total = total + opts.object_itc_weight * loss_obj
            obj = float(loss_obj.detach())
        return AlbefLosses(
            total, loss_itc, loss_itm, loss_mlm, itm_acc, pos_acc, neg_acc, pert_acc, aux_acc, bow, obj
        )

    def _object_itc(self, image_feat: torch.Tensor, batch: AlbefBatch) -> torch.Tensor | None:
        """Contrastive loss between the images and short captions naming one of their objects, with every
        image of which a caption is true as a positive: text -> image over the batch and the image queue
        (whose ids say which data image each queued feature is), image -> text over the batch's captions."""
        if batch.obj_ids is None or batch.obj_mask is None or batch.obj_truth is None:
            return None
        truth = batch.obj_truth.bool()  # [N, B]
        n = truth.shape[0]
        obj_feat = self.text_embed(self.text_states(batch.obj_ids, batch.obj_mask))  # [B, E]
        in_batch = truth[batch.idx]  # [B images, B captions]
        q = self.idx_queue[0]
        known = (q >= 0) & (q < n)
        in_queue = truth[q.clamp(0, n - 1)] & known[:, None]  # [Q, B captions]
        columns = torch.cat([image_feat, self.image_queue.T.detach().to(image_feat.dtype)])
        t2i = obj_feat @ columns.T / self.temp  # [B captions, B + Q]
        i2t = image_feat @ obj_feat.T / self.temp  # [B images, B captions]
        return (
            soft_cross_entropy(t2i, torch.cat([in_batch, in_queue]).T) + soft_cross_entropy(i2t, in_batch)
        ) / 2


def _rows_with_mass(w: torch.Tensor) -> torch.Tensor:
    """Rows that were entirely masked (every other pair matches) fall back to uniform over other columns."""
    empty = w.sum(dim=1) <= 0
    if bool(empty.any()):
        fallback = torch.ones_like(w)
        n = min(w.shape)
        fallback[torch.arange(n), torch.arange(n)] = 0
        w = torch.where(empty[:, None], fallback, w)
    return w


# ---------------------------------------------------------------------------------------------- layouts


def inference_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The retrieval model's weights only (ALBEF's released ``mscoco.pth`` layout): drops momentum copies,
    queues, the MLM head and the bag-of-words head, and renames ``text_encoder.bert.`` → ``text_encoder.``."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        top = key.split(".", 1)[0]
        if top.endswith("_m") or top in ("image_queue", "text_queue", "idx_queue", "queue_ptr"):
            continue
        if key.startswith(("text_encoder.cls.", "bow_head.")):
            continue
        if key.startswith("text_encoder.bert."):
            key = "text_encoder." + key[len("text_encoder.bert.") :]
        if key.endswith("position_ids"):
            continue
        out[key] = value
    return out
