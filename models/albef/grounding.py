"""Where ALBEF's ITM looks: Grad-CAM on a fusion layer's cross-attention (ALBEF paper, section 6).

For one (text, image) pair, at fusion layer ``layer``: the cross-attention probabilities ``A`` [h, T, L]
of the text tokens over the image tokens, the gradient ``G = d logit_match / d A``, and the map
``mean_heads(A * max(G, 0))`` [T, L]. The image's CLS column is dropped and the patch columns are laid out
on the ViT's patch grid. This is ALBEF's own recipe (its ``Grounding.ipynb``: ``block_num=8``, the third
fusion layer of the base model, which is this module's default where the model has one).

The forward runs the same layers as :meth:`AlbefModel.itm_logits` (same sub-blocks, same weights); only the
chosen layer's cross-attention is written out explicitly, so its probabilities exist as a tensor that
autograd can differentiate against. Nothing here changes the scoring paths.
"""

from __future__ import annotations

import numpy as np
import torch

from alignfuse.errors import InvalidInputError
from alignfuse.models.albef.bert import _merge_heads, _split_heads, attention_bias
from alignfuse.models.albef.model import AlbefModel, trailing_length

#: ALBEF's Grounding notebook explains block 8 of 12, i.e. fusion layer 2 (fusion starts at layer 6)
DEFAULT_FUSION_LAYER = 2


def default_layer(model: AlbefModel) -> int:
    """ALBEF's choice, but never the last fusion layer: there only the [CLS] row reaches the ITM head, so
    the words' rows get no gradient and every word's map is zero."""
    return max(0, min(DEFAULT_FUSION_LAYER, len(model.text_encoder.fusion_layers) - 2))


def check_layer(model: AlbefModel, layer: int | None) -> int:
    n = len(model.text_encoder.fusion_layers)
    if layer is None:
        return default_layer(model)
    if not 0 <= layer < n:
        raise InvalidInputError(
            f"layer must be a fusion layer index 0..{n - 1}, got {layer}",
            detail={"field": "layer", "min": 0, "max": n - 1},
        )
    return layer


def cross_attention_gradcam(
    model: AlbefModel, ids: torch.Tensor, mask: torch.Tensor, image_tokens: torch.Tensor, layer: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pair (``ids``/``mask`` [1, T], ``image_tokens`` [1, L, Dv]) → (ITM logits [2], map [T', L]) where
    T' is the text up to its last real token and the map is mean over heads of attention × positive grad."""
    if ids.shape[0] != 1 or image_tokens.shape[0] != 1:
        raise InvalidInputError("grounding explains one (text, image) pair at a time")
    length = trailing_length(mask)
    ids, mask = ids[:, :length], mask[:, :length]
    layers = model.text_encoder.fusion_layers
    with torch.enable_grad():
        x = model.text_states(ids, mask).detach()
        bias = attention_bias(mask, x.dtype)
        probs: torch.Tensor | None = None
        for i, lyr in enumerate(layers):
            x = lyr.self_block(x, bias)
            if i == layer:
                attn = lyr.crossattention.self
                q = _split_heads(attn.query(x), attn.num_heads)  # [1, h, T, d]
                k, v = attn.project_kv(image_tokens)  # [1, h, L, d]
                scores = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
                probs = scores.softmax(dim=-1).detach().requires_grad_(True)  # [1, h, T, L]
                x = lyr.crossattention.output(_merge_heads(probs @ v), x)
            else:
                x = lyr.cross_block(x, None, image_tokens)
            x = lyr.ffn_block(x)
        logits = model.itm_head(x[:, 0, :])[0]
        assert probs is not None
        (grad,) = torch.autograd.grad(logits[1], probs)
    cam = (probs.detach() * grad.clamp(min=0)).mean(dim=1)[0]  # [T, L]
    return logits.detach().float(), cam.float()


def patch_grid(cam: torch.Tensor, num_tokens: int) -> np.ndarray:
    """[T, 1 + P] token × image-token map → [T, g, g] over the patch grid (CLS column dropped)."""
    p = num_tokens - 1
    g = round(p**0.5)
    if g * g != p:
        raise InvalidInputError(f"image tokens {num_tokens} do not form a square patch grid")
    return cam[:, 1:].reshape(cam.shape[0], g, g).cpu().numpy().astype(np.float32)
