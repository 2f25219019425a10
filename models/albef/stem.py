"""Convolutional stems for ALBEF's ViT (``AlbefConfig.patch_stem = "conv"`` or ``"hybrid"``): our own small scenes
models only.

ALBEF's ViT embeds each patch with one linear map (a conv with kernel = stride = patch size). Trained from scratch on
a few thousand images, that ViT reads colour (one pixel tells it) but hardly shape (an edge's orientation inside a
patch must be learned from scratch by 4 attention layers): ``docs/training/diagnose_shapes.py`` measured it. A
stack of 3×3 convolutions whose strides multiply to the patch size (Xiao et al., "Early convolutions help
transformers see better", 2021) gives the same token grid with local edge detectors built in. Official ALBEF
checkpoints keep the linear embedding (the default), so their ``patch_embed.proj`` keys load unchanged.

``"hybrid"`` goes further, as ViT-hybrid does: a small CNN backbone (3×3 conv + GELU at full resolution, then a
max-pool, per stage; the pools multiply to the patch size) embeds the tokens. Max-pooling keeps the strongest
edge response of each region, which the strided conv stem averages away; under direct supervision a ViT on this
backbone, read by a max over its patch tokens, learned the scenes' shape sets ~4× better than the conv stem
(``docs/training/README.md``, "Pooling").
"""

from __future__ import annotations

from typing import Any

import torch
from timm.layers import PatchEmbed
from torch import nn

from alignfuse.errors import InvalidInputError


def stem_strides(patch_size: int) -> list[int]:
    """Factor ``patch_size`` into conv strides of 2 (then one of the rest): 12 → [2, 2, 3], 16 → [2, 2, 2, 2]."""
    if patch_size < 2:
        raise InvalidInputError(f"a conv stem needs patch_size >= 2 (got {patch_size})")
    strides: list[int] = []
    rest = patch_size
    while rest % 2 == 0 and rest > 1:
        strides.append(2)
        rest //= 2
    if rest > 1:
        strides.append(rest)
    return strides


class ConvStem(nn.Module):
    """3×3 convolutions (GELU between; the last one k = s when its stride is odd), channels from ``width // 4``
    doubling up to ``width``, then a 1×1 to ``width``."""

    def __init__(self, patch_size: int, width: int, in_chans: int = 3) -> None:
        super().__init__()
        strides = stem_strides(patch_size)
        layers: list[nn.Module] = []
        chans = in_chans
        out = min(width, max(16, width // 4))
        for s in strides:
            k, p = (3, 1) if s == 2 else (s, 0)
            layers += [nn.Conv2d(chans, out, k, s, p), nn.GELU()]
            chans, out = out, min(out * 2, width)
        layers.append(nn.Conv2d(chans, width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class HybridStem(nn.Module):
    """A CNN backbone: per pool factor of the patch size (:func:`stem_strides`), a 3×3 conv (stride 1) + GELU and a
    max-pool of that factor; channels from ``width // 3`` growing to ``width``; then a 1×1 conv to ``width``."""

    def __init__(self, patch_size: int, width: int, in_chans: int = 3) -> None:
        super().__init__()
        pools = stem_strides(patch_size)
        layers: list[nn.Module] = []
        chans = in_chans
        out = min(width, max(16, width // 3))
        for i, pool in enumerate(pools):
            layers += [nn.Conv2d(chans, out, 3, 1, 1), nn.GELU(), nn.MaxPool2d(pool)]
            chans = out
            out = width if i == len(pools) - 2 else min(out * 2, width)
        layers.append(nn.Conv2d(chans, width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _StemPatchEmbed(PatchEmbed):
    """timm's ``PatchEmbed`` (same token grid, flatten, checks) with ``proj`` replaced by ``stem(patch, width, in)``."""

    stem: type[ConvStem] | type[HybridStem]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        width = self.proj.out_channels
        in_chans = self.proj.in_channels
        self.proj = self.stem(self.patch_size[0], width, in_chans)  # type: ignore[assignment]


class ConvStemPatchEmbed(_StemPatchEmbed):
    """The token embedding of ``patch_stem="conv"``: a :class:`ConvStem`."""

    stem = ConvStem


class HybridPatchEmbed(_StemPatchEmbed):
    """The token embedding of ``patch_stem="hybrid"``: a :class:`HybridStem`."""

    stem = HybridStem
