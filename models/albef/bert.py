"""ALBEF's BERT: text layers, fusion layers with cross-attention to image tokens, and the MLM head.

Parameter names follow Hugging Face's BERT (which ALBEF's ``xbert.py`` extends) so ALBEF checkpoints load by
name: ``embeddings.*``, ``encoder.layer.{i}.attention.*``, ``encoder.layer.{i}.crossattention.*`` (only in
layers ``i >= fusion_layer``), ``intermediate.dense``, ``output.*``; MLM head ``cls.predictions.*``.
Attention runs through :func:`torch.nn.functional.scaled_dot_product_attention`.

Batch conventions of the fusion layers: text states and image K/V may each have batch 1 and broadcast
against the other's batch ``n`` (views via ``expand``; with one image and many texts the texts are folded
into the query sequence, so the image's K/V are never repeated). Cross-attention to many images without a
K/V cache folds the key/value weights into the queries instead of projecting every image token
(:meth:`BertSelfAttention.cross_attention_folded`), about half the FLOPs at ALBEF's sizes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from alignfuse.models.albef.config import AlbefConfig

#: Additive attention bias on padding tokens (ALBEF/BERT: -10000, not -inf).
MASK_BIAS = -10000.0

KV = tuple[torch.Tensor, torch.Tensor]

# The folded cross-attention rounds the attention scores to the working dtype once more than a fused SDPA
# kernel does; in fp16/bf16 that costs accuracy, so it is used in full precision only (CPU, fp32 GPU).
_FOLD_DTYPES = (torch.float32, torch.float64)


def attention_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[n, T] 0/1 attention mask → additive bias [n, 1, 1, T] (0 on tokens, -10000 on padding)."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * MASK_BIAS


def linear_params(linear: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [out, in], bias [out] or None) of a Linear as float tensors, also for a dynamically quantized
    ``torch.ao.nn.quantized.dynamic.Linear`` (whose ``weight``/``bias`` are methods and the weight a quantized
    tensor): what code that uses a projection's matrix directly (the folded cross-attention) reads."""
    weight = linear.weight
    bias = linear.bias
    if callable(weight):  # quantized Linear: weight() -> qint8 tensor, bias() -> float tensor or None
        w = weight()
        weight = w.dequantize() if w.is_quantized else w
        bias = bias() if callable(bias) else bias
    assert isinstance(weight, torch.Tensor)
    return weight, bias if isinstance(bias, torch.Tensor) else None


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    n, t, _ = x.shape
    return x.view(n, t, heads, -1).transpose(1, 2)  # [n, h, t, d]


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    n, h, t, d = x.shape
    return x.transpose(1, 2).reshape(n, t, h * d)


class BertEmbeddings(nn.Module):
    """word + position + token-type (row 0 for every token) → LayerNorm → dropout."""

    def __init__(self, config: AlbefConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, d, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, d)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, d)
        self.LayerNorm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        # Not persistent: checkpoints may or may not hold it (it carries no learned information).
        self.register_buffer(
            "position_ids", torch.arange(config.max_position_embeddings).unsqueeze(0), persistent=False
        )

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[1]
        x = self.word_embeddings(input_ids)
        position_ids: torch.Tensor = self.position_ids  # type: ignore[assignment]
        x = x + self.token_type_embeddings.weight[0] + self.position_embeddings(position_ids[:, :t])
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    """Multi-head attention projections (``query``, ``key``, ``value``); ``kv_width`` for cross-attention."""

    def __init__(self, config: AlbefConfig, kv_width: int | None = None) -> None:
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(kv_width or d, d)
        self.value = nn.Linear(kv_width or d, d)
        self.dropout_p = config.attention_probs_dropout_prob

    def project_kv(self, states: torch.Tensor) -> KV:
        """Key/value projections of ``states`` [n, L, W] → two [n, h, L, d] contiguous tensors."""
        k = _split_heads(self.key(states), self.num_heads).contiguous()
        v = _split_heads(self.value(states), self.num_heads).contiguous()
        return k, v

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        p = self.dropout_p if self.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p)

    def self_attention(
        self, x: torch.Tensor, bias: torch.Tensor | None, *, cls_only: bool = False
    ) -> torch.Tensor:
        """Bidirectional self-attention over ``x`` [n, T, D] with additive ``bias`` [n, 1, 1, T].
        ``cls_only``: compute the output of the first token only ([n, 1, D])."""
        q = _split_heads(self.query(x[:, :1] if cls_only else x), self.num_heads)
        k = _split_heads(self.key(x), self.num_heads)
        v = _split_heads(self.value(x), self.num_heads)
        return _merge_heads(self._attend(q, k, v, bias))

    def cross_attention(self, x: torch.Tensor, kv: KV) -> torch.Tensor:
        """Queries from ``x`` [n_t, T, D] attend (unmasked) to ``kv`` ([n_i, h, L, d] each).

        ``n_t`` and ``n_i`` are equal or one of them is 1; the result has batch ``max(n_t, n_i)``.
        """
        k, v = kv
        n_t, t, _ = x.shape
        n_i = k.shape[0]
        q = _split_heads(self.query(x), self.num_heads)  # [n_t, h, T, d]
        if n_i == 1 and n_t > 1:
            # One image, many texts: fold the texts into the query axis (rows are independent without a
            # mask), so the image's K/V are used once instead of being repeated n_t times.
            h, d = q.shape[1], q.shape[3]
            qf = q.transpose(0, 1).reshape(1, h, n_t * t, d)
            out = self._attend(qf, k, v, None).reshape(h, n_t, t, d).transpose(0, 1)
            return _merge_heads(out)
        if n_t == 1 and n_i > 1:
            q = q.expand(n_i, -1, -1, -1)
        elif n_t != n_i:
            raise ValueError(f"text batch {n_t} and image batch {n_i} do not broadcast")
        return _merge_heads(self._attend(q, k, v, None))

    def folded_is_cheaper(self, n_t: int, t: int, n_i: int, num_tokens: int) -> bool:
        """Whether :meth:`cross_attention_folded` beats projecting K/V for these sizes (eval only)."""
        return not self.training and n_i > 1 and n_t in (1, n_i) and self.num_heads * t < num_tokens

    def cross_attention_folded(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Cross-attention straight from the image tokens [n_i, L, W], without projecting them to K/V.

        Per head h: ``q_h . (W_k,h x + b_k,h) = (q_h W_k,h) . x + const`` (the constant drops out of the
        softmax) and ``sum_j a_j (W_v,h x_j + b_v,h) = W_v,h (sum_j a_j x_j) + b_v,h``. The image side then
        costs h*T*L*W per pair instead of the K/V projections' 2*L*W*D, a saving whenever h*T < L
        (ALBEF: 12 heads x <=30 tokens vs 577 image tokens). Exact up to float rounding.
        ``x`` [n_t, T, D] with n_t in (1, n_i) → [n_i, T, D]."""
        n_t, t, dim = x.shape
        n_i, length, width = tokens.shape
        h = self.num_heads
        d = dim // h
        q = self.query(x).view(n_t, t, h, d)
        wk = linear_params(self.key)[0].to(x.dtype).view(h, d, width)
        qk = torch.einsum("nthd,hdw->nhtw", q, wk).reshape(n_t, h * t, width) * (d**-0.5)
        if n_t == 1:  # one GEMM over all images' tokens: [n_i*L, W] x [W, h*T]
            scores = (tokens.reshape(n_i * length, width) @ qk[0].T).view(n_i, length, h * t)
            probs = scores.softmax(dim=1).transpose(1, 2)  # [n_i, h*T, L]
        else:
            probs = torch.bmm(qk, tokens.transpose(1, 2)).softmax(dim=-1)
        if self.training and self.dropout_p > 0:
            probs = F.dropout(probs, self.dropout_p)
        ctx = torch.bmm(probs, tokens).view(n_i, h, t, width)  # attention-weighted image tokens
        wv, bv = linear_params(self.value)
        out = torch.einsum("nhtw,hdw->nthd", ctx, wv.to(ctx.dtype).view(h, d, width)).reshape(n_i, t, dim)
        return out if bv is None else out + bv.to(out.dtype)


class BertSelfOutput(nn.Module):
    """``dense`` → dropout → residual → ``LayerNorm`` (post-LN)."""

    def __init__(self, config: AlbefConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: AlbefConfig, kv_width: int | None = None) -> None:
        super().__init__()
        self.self = BertSelfAttention(config, kv_width)
        self.output = BertSelfOutput(config)


class BertIntermediate(nn.Module):
    def __init__(self, config: AlbefConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class BertOutput(nn.Module):
    def __init__(self, config: AlbefConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class BertLayer(nn.Module):
    """Self-attention → (cross-attention to image tokens, fusion layers only) → FFN; all post-LN."""

    def __init__(self, config: AlbefConfig, cross: bool) -> None:
        super().__init__()
        self.has_cross = cross
        self.attention = BertAttention(config)
        if cross:
            self.crossattention = BertAttention(config, kv_width=config.encoder_width)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def self_block(
        self, x: torch.Tensor, bias: torch.Tensor | None, *, cls_only: bool = False
    ) -> torch.Tensor:
        out = self.attention.self.self_attention(x, bias, cls_only=cls_only)
        return self.attention.output(out, x[:, :1] if cls_only else x)

    def cross_block(
        self, x: torch.Tensor, kv: KV | None = None, tokens: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Cross-attention sub-block with precomputed ``kv`` or from image ``tokens`` (K/V projected, or the
        folded form when that is cheaper)."""
        attn = self.crossattention.self
        if kv is not None:
            out = attn.cross_attention(x, kv)
        elif tokens is None:
            raise ValueError("cross_block needs kv or tokens")
        elif tokens.dtype in _FOLD_DTYPES and attn.folded_is_cheaper(
            x.shape[0], x.shape[1], tokens.shape[0], tokens.shape[1]
        ):
            out = attn.cross_attention_folded(x, tokens)
        else:
            out = attn.cross_attention(x, attn.project_kv(tokens))
        if out.shape[0] != x.shape[0]:
            x = x.expand(out.shape[0], -1, -1)
        return self.crossattention.output(out, x)

    def ffn_block(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.intermediate(x), x)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None, kv: KV | None = None) -> torch.Tensor:
        x = self.self_block(x, bias)
        if kv is not None:
            x = self.cross_block(x, kv)
        return self.ffn_block(x)


class BertEncoder(nn.Module):
    def __init__(self, config: AlbefConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(
            BertLayer(config, cross=i >= config.fusion_layer) for i in range(config.num_hidden_layers)
        )


class AlbefBert(nn.Module):
    """ALBEF's text encoder (no pooler): ``embeddings`` + ``encoder.layer``.

    Layers ``0 .. fusion_layer-1`` are text-only; layers ``fusion_layer ..`` are the fusion encoder.
    """

    def __init__(self, config: AlbefConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)

    @property
    def fusion_layers(self) -> list[BertLayer]:
        return [m for m in self.encoder.layer[self.config.fusion_layer :] if isinstance(m, BertLayer)]

    def forward_text(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Embeddings + text-only layers → [n, T, D]."""
        x = self.embeddings(input_ids)
        bias = attention_bias(mask, x.dtype)
        for layer in self.encoder.layer[: self.config.fusion_layer]:
            x = layer(x, bias)
        return x

    def forward(
        self, input_ids: torch.Tensor, mask: torch.Tensor, image_tokens: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Text layers, then (with ``image_tokens``) the fusion layers: ALBEF's ``multi_modal`` pass."""
        x = self.forward_text(input_ids, mask)
        if image_tokens is None:
            return x
        return self.forward_fusion(x, mask, image_tokens=image_tokens)

    def cross_kv(self, image_tokens: torch.Tensor) -> tuple[KV, ...]:
        """Cross-attention K/V of every fusion layer: depends on the image alone (cacheable)."""
        return tuple(layer.crossattention.self.project_kv(image_tokens) for layer in self.fusion_layers)

    def forward_fusion(
        self,
        text_states: torch.Tensor,
        mask: torch.Tensor,
        kv: tuple[KV, ...] | None = None,
        image_tokens: torch.Tensor | None = None,
        *,
        cls_only: bool = False,
    ) -> torch.Tensor:
        """Fusion layers over text states [n_t, T, D] attending to image K/V (batch n_i); n_t, n_i broadcast.

        Pass the precomputed ``kv`` (one (K, V) per fusion layer) or ``image_tokens`` (then each layer's
        cross-attention works from the tokens directly, one layer at a time). ``cls_only``: the last layer
        computes the first token only (all ITM needs) → [n, 1, D]."""
        layers = self.fusion_layers
        if kv is not None and len(kv) != len(layers):
            raise ValueError(f"expected K/V for {len(layers)} fusion layers, got {len(kv)}")
        if kv is None and image_tokens is None:
            raise ValueError("forward_fusion needs kv or image_tokens")
        x = text_states
        bias = attention_bias(mask, x.dtype)
        for i, layer in enumerate(layers):
            # The first self-attention block runs at the text batch; everything after at the pair batch.
            last = cls_only and i == len(layers) - 1
            b = bias if bias.shape[0] == x.shape[0] else bias.expand(x.shape[0], -1, -1, -1)
            x = layer.self_block(x, b, cls_only=last)
            x = layer.cross_block(x, None if kv is None else kv[i], image_tokens)
            x = layer.ffn_block(x)
        return x


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config: AlbefConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(F.gelu(self.dense(x)))


class BertLMPredictionHead(nn.Module):
    def __init__(self, config: AlbefConfig) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.decoder.bias = self.bias  # tied, as in BERT (both names appear in state_dicts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(x))


class BertMLMHead(nn.Module):
    """BERT's MLM head, attached as ``cls`` (``cls.predictions.{transform.{dense,LayerNorm},decoder,bias}``).

    Pass the text encoder's ``word_embeddings`` to tie the decoder weight to them, as BERT does.
    """

    def __init__(self, config: AlbefConfig, word_embeddings: nn.Embedding | None = None) -> None:
        super().__init__()
        self.predictions = BertLMPredictionHead(config)
        if word_embeddings is not None:
            self.predictions.decoder.weight = word_embeddings.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., D] → vocabulary logits [..., vocab_size]."""
        return self.predictions(hidden)
