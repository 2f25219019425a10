"""Model adapters: what the training loop needs from a model family (:class:`ModelAdapter`), for ALBEF
(:class:`AlbefArch`) and open_clip CLIP (:class:`ClipArch`), and the builders that make a fresh model and its
adapter from :class:`~alignfuse.training.options.ModelOptions` (:func:`build_adapter`)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from alignfuse.data.scenes import COLOURS, RELATIONS, SHAPES
from alignfuse.errors import InvalidInputError, NotFoundError
from alignfuse.models.albef.model import AlbefModel
from alignfuse.training.bow import BowTable, bow_labels, bow_loss, bow_size
from alignfuse.training.contrastive import soft_cross_entropy
from alignfuse.training.data import PairData, step_rng
from alignfuse.training.objectives_albef import (
    AlbefBatch,
    AlbefForTraining,
    AlbefTrainingOptions,
    inference_state_dict,
)
from alignfuse.training.options import ModelOptions, TrainOptions


class ModelAdapter:
    """What the loop and the diagnostics need from a model family."""

    model: Any  # an nn.Module with the family's methods

    def step_loss(self, data: PairData, images: list[int], step: int, epoch_frac: float) -> dict[str, Any]:
        """Losses of one micro-batch of ``images`` (floats to log, and ``"_total"``: the tensor to backprop).
        ``epoch_frac``: share of the first epoch done (1.0 afterwards)."""
        raise NotImplementedError

    def embed(
        self, data: PairData, image_idx: Sequence[int], caption_idx: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised dual-encoder embeddings of the images and captions (float32, on the CPU)."""
        raise NotImplementedError

    def itm_logits(self, data: PairData, pairs: Sequence[tuple[int, str]]) -> torch.Tensor | None:
        """The ITM head's two logits ("no match", "match") per (image, caption text) pair, float32 [n, 2] on
        the CPU; None if the model has no ITM head."""
        return None

    def itm(self, data: PairData, pairs: Sequence[tuple[int, str]]) -> torch.Tensor | None:
        """Match margin (logit of class 1 minus class 0: > 0 means "match") per pair; None if no ITM head."""
        logits = self.itm_logits(data, pairs)
        return None if logits is None else logits[:, 1] - logits[:, 0]

    def save_weights(self, out_dir: Path, name: str) -> list[Path]:
        """Export loadable inference weights ``out_dir/<name>.safetensors`` + ``<name>.json``; their paths."""
        raise NotImplementedError


class AlbefArch(ModelAdapter):
    """ALBEF (:class:`~alignfuse.training.objectives_albef.AlbefForTraining`): ITC + ITM (+ MLM) steps."""

    def __init__(self, model: nn.Module, tokenizer: Any, opts: TrainOptions, device: torch.device) -> None:
        assert isinstance(model, AlbefModel)
        self.model = model
        self.tok = tokenizer
        self.opts = opts
        self.device = device
        self._bow: tuple[PairData, BowTable] | None = None  # (the data it was built for, table)

    def bow_table(self, data: PairData) -> BowTable:
        """Per image, the bag-of-words labels of all its captions (built once per dataset)."""
        if self._bow is None or self._bow[0] is not data:
            m = self.model
            assert isinstance(m, AlbefForTraining)
            ids, mask = self.tok(data.captions)
            rows = [row[: int(n)].tolist() for row, n in zip(ids, mask.sum(dim=1), strict=True)]
            table = bow_table_of(
                rows, data, m.options.special_ids, m.config.vocab_size, m.options.bow_buckets
            )
            self._bow = (data, table)
        return self._bow[1]

    def _tokens(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.tok(list(texts))
        t = max(1, int(mask.sum(dim=1).max()))
        return ids[:, :t].contiguous(), mask[:, :t].contiguous()

    def step_loss(self, data: PairData, images: list[int], step: int, epoch_frac: float) -> dict[str, Any]:
        rng = step_rng(self.opts.seed, step)
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
        if isinstance(self.model, AlbefForTraining) and self.model.options.bow_weight > 0:
            batch.bow = self.bow_table(data).targets(images)
        if (
            isinstance(self.model, AlbefForTraining)
            and self.model.options.object_itc_weight > 0
            and data.object_claim is not None
        ):
            claims = [data.object_claim(i, rng) for i in images]
            batch.obj_ids, batch.obj_mask = self._tokens([t for t, _ in claims])
            batch.obj_truth = torch.stack([truth for _, truth in claims], dim=1)
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
    def itm_logits(self, data: PairData, pairs: Sequence[tuple[int, str]]) -> torch.Tensor | None:
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
            out.append(logits.cpu())
        return torch.cat(out) if out else torch.zeros(0, 2)

    def save_weights(self, out_dir: Path, name: str) -> list[Path]:
        from safetensors.torch import save_file

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


def bow_table_of(
    token_rows: Sequence[Sequence[int]], data: PairData, special: Sequence[int], vocab_size: int, buckets: int
) -> BowTable:
    """The bag-of-words table of ``data``: per image, the labels of all its captions' token ids
    (``token_rows[k]``: caption k's ids; special tokens are never labels)."""
    skip = set(special)
    per_caption = [bow_labels(row, skip, vocab_size, buckets) for row in token_rows]
    per_image = [set().union(*(per_caption[k] for k in caps)) for caps in data.captions_of]
    return BowTable(per_image, bow_size(vocab_size, buckets))


class ClipArch(ModelAdapter):
    """An open_clip CLIP: symmetric contrastive steps (an image's other captions are positives); no ITM head.

    With ``bow_weight > 0`` a training-only linear head (``model.bow_head``, never exported) predicts from the
    image embedding the words and hashed word pairs of the image's captions (:mod:`alignfuse.training.bow`),
    as ``--bow`` does for ALBEF. With ``object_itc > 0`` (and scenes data with ``object_claim``) a second
    contrastive loss pairs each image with a short caption naming one of its objects, every batch image the
    caption is true of a positive (ALBEF's object ITC without the queue)."""

    #: open_clip's tokenizer: padding, start and end of text (never labels)
    CLIP_SPECIAL = (0, 49406, 49407)

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        model_cfg: dict[str, Any],
        opts: TrainOptions,
        device: torch.device,
        bow_weight: float = 0.0,
        bow_buckets: int = 2048,
        object_itc: float = 0.0,
    ) -> None:
        if object_itc < 0:
            raise InvalidInputError("object_itc must be >= 0")
        self.model = model
        self.object_itc = object_itc
        self.tok = tokenizer
        self.model_cfg = model_cfg
        self.opts = opts
        self.device = device
        self.bow_weight = bow_weight
        self.bow_buckets = bow_buckets
        self._bow: tuple[PairData, BowTable] | None = None
        if bow_weight > 0:
            vocab = int(model_cfg["text_cfg"].get("vocab_size", 49408))
            width = int(model_cfg["embed_dim"])
            model.bow_head = nn.Linear(width, bow_size(vocab, bow_buckets)).to(device)

    def bow_table(self, data: PairData) -> BowTable:
        """Per image, the bag-of-words labels of all its captions (built once per dataset)."""
        if self._bow is None or self._bow[0] is not data:
            ids = self.tok(data.captions)
            rows = [[int(t) for t in row if int(t) != 0] for row in ids]
            vocab = int(self.model_cfg["text_cfg"].get("vocab_size", 49408))
            self._bow = (data, bow_table_of(rows, data, self.CLIP_SPECIAL, vocab, self.bow_buckets))
        return self._bow[1]

    def step_loss(self, data: PairData, images: list[int], step: int, epoch_frac: float) -> dict[str, Any]:
        rng = step_rng(self.opts.seed, step)
        caps = [data.captions_of[i][int(rng.integers(0, len(data.captions_of[i])))] for i in images]
        tokens = self.tok([data.captions[k] for k in caps]).to(self.device)
        m = self.model
        feats = m.encode_image(data.pixels(images).to(self.device)).float()
        img = F.normalize(feats, dim=-1)
        txt = F.normalize(m.encode_text(tokens).float(), dim=-1)
        scale = m.logit_scale.exp().clamp(max=100.0)
        logits = scale * img @ txt.T
        idx = torch.tensor(images, device=self.device)
        pos = torch.eq(idx[:, None], idx[None, :]).float()
        targets = pos / pos.sum(1, keepdim=True)
        loss_i = -(F.log_softmax(logits, dim=1) * targets).sum(1).mean()
        loss_t = -(F.log_softmax(logits.T, dim=1) * targets).sum(1).mean()
        itc = (loss_i + loss_t) / 2
        out: dict[str, Any] = {"itc": float(itc.detach())}
        loss = itc
        if self.bow_weight > 0:
            bow = bow_loss(m.bow_head(feats), self.bow_table(data).targets(images).to(self.device))
            loss = loss + self.bow_weight * bow
            out["bow"] = float(bow.detach())
        if self.object_itc > 0 and data.object_claim is not None:
            claims = [data.object_claim(i, rng) for i in images]
            otxt = F.normalize(
                m.encode_text(self.tok([t for t, _ in claims]).to(self.device)).float(), dim=-1
            )
            truth = torch.stack([t for _, t in claims], dim=1)[idx.cpu()].to(self.device)  # [image, caption]
            ologits = scale * img @ otxt.T
            obj = (soft_cross_entropy(ologits, truth) + soft_cross_entropy(ologits.T, truth.T)) / 2
            loss = loss + self.object_itc * obj
            out["obj_itc"] = float(obj.detach())
        out.update(loss=float(loss.detach()), _total=loss)
        return out

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

        sd = {
            k: v.detach().float().contiguous().cpu()
            for k, v in self.model.state_dict().items()
            if not k.startswith("bow_head.")  # training-only
        }
        path = out_dir / f"{name}.safetensors"
        save_file(sd, str(path), metadata={"format": "pt", "layout": "open_clip"})
        cfg_path = out_dir / f"{name}.json"
        cfg_path.write_text(json.dumps(self.model_cfg, indent=2) + "\n")
        return [path, cfg_path]


# ---------------------------------------------------------------------------------------------- building


def build_adapter(model: ModelOptions, opts: TrainOptions, device: torch.device) -> tuple[ModelAdapter, int]:
    """A freshly initialised model of ``opts.arch`` on ``device``, its adapter, and its image resolution."""
    if opts.arch == "albef":
        return build_albef(model, opts, device)
    return build_clip(
        model.config,
        opts,
        device,
        bow_weight=model.bow_weight,
        bow_buckets=model.bow_buckets,
        object_itc=model.object_itc,
    )


def build_albef(model: ModelOptions, opts: TrainOptions, device: torch.device) -> tuple[AlbefArch, int]:
    """An :class:`AlbefForTraining` from ``model.config`` (a config name or JSON), with ``model.vocab`` (if
    given) as its WordPiece vocabulary; returns the adapter and the image resolution."""
    from alignfuse.models.albef.config import get_albef_config
    from alignfuse.models.text import AlbefTokenizer

    cfg = get_albef_config(model.config)
    if model.vocab is not None:
        if not model.vocab.is_file():
            raise NotFoundError(f"vocabulary {model.vocab} does not exist")
        cfg = cfg.replace(vocab=str(model.vocab.resolve()))
    tok = AlbefTokenizer(cfg.vocab, max_len=cfg.max_text_len)
    if tok.vocab_size != cfg.vocab_size:
        cfg = cfg.replace(vocab_size=tok.vocab_size)
    topts = AlbefTrainingOptions(
        queue_size=model.queue_size,
        momentum=model.momentum,
        itm_balance=model.itm_balance,
        mlm=model.mlm,
        mlm_distill=model.mlm_distill,
        concept_mask_prob=model.concept_mask if model.mlm else 0.0,
        concept_groups=concept_groups(tok) if model.mlm and model.concept_mask > 0 else (),
        special_ids=(tok.cls_id, tok.sep_id, tok.mask_id, tok.pad_id),
        bow_weight=model.bow_weight,
        bow_buckets=model.bow_buckets,
        object_itc_weight=model.object_itc,
    )
    net = AlbefForTraining(cfg, topts).to(device)
    return AlbefArch(net, tok, opts, device), cfg.image_res


def build_clip(
    model_config: str,
    opts: TrainOptions,
    device: torch.device,
    *,
    bow_weight: float = 0.0,
    bow_buckets: int = 2048,
    object_itc: float = 0.0,
) -> tuple[ClipArch, int]:
    """An open_clip CLIP from an open_clip model config JSON (with the bag-of-words head when ``bow_weight``,
    the object ITC when ``object_itc``); returns the adapter and the image resolution."""
    import open_clip
    from open_clip import factory

    p = Path(model_config)
    if not p.is_file():
        raise NotFoundError(f"CLIP model config {p} does not exist (an open_clip config JSON)")
    cfg = json.loads(p.read_text())
    if not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise InvalidInputError(f"{p}: an open_clip config needs embed_dim, vision_cfg and text_cfg")
    arch_name = "alignfuse-train-" + p.stem
    factory._MODEL_CONFIGS[arch_name] = cfg
    net = open_clip.create_model(arch_name, pretrained=None, device=device)
    tok = open_clip.get_tokenizer(arch_name)
    arch = ClipArch(
        net, tok, cfg, opts, device, bow_weight=bow_weight, bow_buckets=bow_buckets, object_itc=object_itc
    )
    return arch, int(cfg["vision_cfg"]["image_size"])


def concept_groups(tok: Any) -> tuple[tuple[int, ...], ...]:
    """Token ids of the scenes' colour words, shape words (singular and plural) and relation words, one group
    each (for ALBEF's concept masking); groups with no word in the vocabulary are left out."""
    vocab = tok.tokenizer.vocab
    groups = []
    colour_ids = tuple(vocab[w] for w in COLOURS if w in vocab)
    shape_words = [*SHAPES, *(s + ("es" if s == "cross" else "s") for s in SHAPES)]
    shape_ids = tuple(vocab[w] for w in shape_words if w in vocab)
    rel_ids = tuple(vocab[w] for w in {r.split()[0] for r in RELATIONS} if w in vocab)
    for g in (colour_ids, shape_ids, rel_ids):
        if g:
            groups.append(g)
    return tuple(groups)
