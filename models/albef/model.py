"""ALBEF's retrieval model (inference side): ViT-B/16 image encoder, BERT text + fusion encoder, ITC
projections and the ITM head, with ALBEF's exact parameter names (``visual_encoder``, ``text_encoder``,
``vision_proj``, ``text_proj``, ``itm_head``, ``temp``) so official checkpoints load by name.

Tensor-level API (all batched, no Python loops over pairs)::

    tokens = model.image_tokens(pixels)              # [n, L, Dv]  ViT tokens after the final norm
    states = model.text_states(ids, mask)            # [n, T, D]   text layers 0 .. fusion_layer-1
    model.image_embed(tokens), model.text_embed(states)   # [n, E] L2-normalised ITC embeddings
    kv = model.cross_kv(tokens)                      # per fusion layer (K, V), each [n, h, L, d]
    model.fuse(states, mask, tokens, kv=None)        # [n, T, D] fusion layers
    model.itm_logits(states, mask, tokens, kv=None)  # [n, 2], index 1 = match

Text and image sides may each have batch 1 and broadcast against the other's batch (one text × C images
is one batched forward).
"""

from __future__ import annotations

import logging
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from alignfuse.models.albef.bert import KV, AlbefBert
from alignfuse.models.albef.config import AlbefConfig
from alignfuse.models.albef.stem import ConvStemPatchEmbed, HybridPatchEmbed

logger = logging.getLogger(__name__)

VIT_LN_EPS = 1e-6


def build_visual_encoder(config: AlbefConfig) -> VisionTransformer:
    """timm ViT as ALBEF configures it: class token, learned pos_embed, qkv bias, LayerNorm eps 1e-6,
    exact GELU, final norm, no head, no pooling (all tokens returned); ``patch_stem="conv"`` / ``"hybrid"`` swap the
    linear patch embedding for a small convolutional stem / CNN backbone (same token grid; our scenes models only)."""
    return VisionTransformer(
        img_size=config.image_res,
        patch_size=config.patch_size,
        embed_dim=config.vision_width,
        depth=config.vision_depth,
        num_heads=config.vision_heads,
        mlp_ratio=config.mlp_ratio,
        qkv_bias=True,
        num_classes=0,
        global_pool="",
        class_token=True,
        norm_layer=partial(nn.LayerNorm, eps=VIT_LN_EPS),
        drop_path_rate=config.drop_path_rate,
        embed_layer=_PATCH_EMBEDS[config.patch_stem],
    )


_PATCH_EMBEDS: dict[str, type[PatchEmbed]] = {
    "linear": PatchEmbed,
    "conv": ConvStemPatchEmbed,
    "hybrid": HybridPatchEmbed,
}


def pool_image(tokens: torch.Tensor, how: str) -> torch.Tensor:
    """The vector the ITC image embedding projects: the CLS token (ALBEF, ``"cls"``) or the max over the patch
    tokens (``"max"``, what a CNN's global max pool reads) → [n, Dv]."""
    return tokens[:, 1:, :].amax(dim=1) if how == "max" else tokens[:, 0, :]


class AlbefModel(nn.Module):
    """ALBEF retrieval model without momentum encoders, queues or MLM head (see ``training.py`` for those).

    Build on the ``meta`` device (``with torch.device("meta"): AlbefModel(cfg)``) to inspect shapes for free.
    """

    def __init__(self, config: AlbefConfig) -> None:
        super().__init__()
        self.config = config
        self.temp = nn.Parameter(torch.tensor(0.07))
        self.visual_encoder = build_visual_encoder(config)
        self.text_encoder = AlbefBert(config)
        self.vision_proj = nn.Linear(config.vision_width, config.embed_dim)
        self.text_proj = nn.Linear(config.hidden_size, config.embed_dim)
        self.itm_head = nn.Linear(config.hidden_size, 2)
        self.init_weights()

    # ------------------------------------------------------------------ init
    def init_weights(self) -> None:
        """BERT-style init (normal(0, init_std), zero bias, unit LayerNorm) for text side and heads; the ViT
        keeps timm's initialisation (truncated normal 0.02). ``temp`` = 0.07."""
        std = self.config.init_std
        for module in (self.text_encoder, self.vision_proj, self.text_proj, self.itm_head):
            for m in module.modules():
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=std)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
                elif isinstance(m, nn.Embedding):
                    nn.init.normal_(m.weight, std=std)
                elif isinstance(m, nn.LayerNorm):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)
        with torch.no_grad():
            self.temp.fill_(0.07)

    # ------------------------------------------------------------------ unimodal
    def image_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """ViT over normalised pixels [n, 3, R, R] → all tokens after the final norm [n, 1+P, Dv]."""
        return self.visual_encoder.forward_features(pixels)

    def text_states(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Token ids/mask [n, T] → unimodal text states [n, T, D] (layers 0 .. fusion_layer-1)."""
        return self.text_encoder.forward_text(ids, mask)

    def image_embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """ITC image embedding: normalize(vision_proj(CLS token, or the patch tokens' max: ``image_pool``)) → [n, E]."""
        return F.normalize(
            full_precision(self.vision_proj, pool_image(tokens, self.config.image_pool)), dim=-1
        )

    def text_embed(self, states: torch.Tensor) -> torch.Tensor:
        """ITC text embedding: normalize(text_proj(CLS state of the text layers)) → [n, E]."""
        return F.normalize(full_precision(self.text_proj, states[:, 0, :]), dim=-1)

    # ------------------------------------------------------------------ fusion
    def cross_kv(self, image_tokens: torch.Tensor) -> tuple[KV, ...]:
        """Cross-attention K/V projections of the image tokens for every fusion layer, each [n, h, L, d].

        They depend on the image alone (about 70% of the fusion FLOPs), so they can be computed once per
        image and reused for every text (``ImageStates.kv``)."""
        return self.text_encoder.cross_kv(image_tokens)

    def fuse(
        self,
        text_states: torch.Tensor,
        mask: torch.Tensor,
        image_tokens: torch.Tensor | None,
        kv: tuple[KV, ...] | None = None,
    ) -> torch.Tensor:
        """Fusion layers: text states [n_t, T, D] (+ mask [n_t, T]) attending to image tokens [n_i, L, Dv]
        (or their precomputed ``kv``; then ``image_tokens`` may be None). ``n_t`` and ``n_i`` are equal or
        one is 1 (broadcast) → [max(n_t, n_i), T, D]."""
        if kv is None and image_tokens is None:
            raise ValueError("fuse() needs image_tokens or kv")
        return self.text_encoder.forward_fusion(text_states, mask, kv=kv, image_tokens=image_tokens)

    def itm_logits(
        self,
        text_states: torch.Tensor,
        mask: torch.Tensor,
        image_tokens: torch.Tensor | None,
        kv: tuple[KV, ...] | None = None,
    ) -> torch.Tensor:
        """ITM logits [n, 2] of the fused CLS state; index 1 = match. Broadcasting as in :meth:`fuse`.

        Same result as ``itm_head(fuse(...)[:, 0])``, computed with less work: trailing padding columns are
        dropped (padding never influences real tokens) and the last fusion layer computes the CLS row only."""
        length = trailing_length(mask)
        if length < mask.shape[1]:
            text_states, mask = text_states[:, :length], mask[:, :length]
        if kv is None and image_tokens is None:
            raise ValueError("itm_logits() needs image_tokens or kv")
        fused = self.text_encoder.forward_fusion(
            text_states, mask, kv=kv, image_tokens=image_tokens, cls_only=True
        )
        return full_precision(self.itm_head, fused[:, 0, :])


def full_precision(head: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``head(x)`` in fp32 when autocast is on (CPU bf16 serving): the output heads are a negligible share of
    the FLOPs, and bf16 would round ITM logits to ~0.03 at the usual magnitudes, tying close candidates."""
    if not torch.is_autocast_enabled(x.device.type):
        return head(x)  # type: ignore[no-any-return]
    with torch.autocast(x.device.type, enabled=False):
        return head(x.float())  # type: ignore[no-any-return]


def trailing_length(mask: torch.Tensor) -> int:
    """1 + the last column holding a real token in any row (columns after it are padding everywhere)."""
    cols = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    return max(1, int((mask.ne(0) * cols).max()))
