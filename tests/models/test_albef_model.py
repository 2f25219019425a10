"""ALBEF model: parameter names/shapes vs the official manifests, and numerical equivalence (float64) of our
BERT text layers, fusion layers and ViT with transformers' / timm's / a plain re-derivation."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from alignfuse.models.albef.bert import BertMLMHead, attention_bias
from alignfuse.models.albef.config import ALBEF_CONFIGS, AlbefConfig
from alignfuse.models.albef.model import AlbefModel
from tests.models.albef_helpers import load_manifest

transformers = pytest.importorskip("transformers")

SMALL = AlbefConfig(
    vocab_size=120,
    hidden_size=32,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=40,
    fusion_layer=2,
    encoder_width=32,
    image_res=48,
    patch_size=16,
    vision_width=32,
    vision_depth=2,
    vision_heads=4,
    embed_dim=16,
    max_text_len=12,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
TOL = 1e-8


@pytest.fixture(scope="module")
def small() -> AlbefModel:
    torch.manual_seed(0)
    return AlbefModel(SMALL).double().eval()


def _ids_mask(n: int, t: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, SMALL.vocab_size, (n, t), generator=g)
    ids[:, 0] = 2
    mask = torch.ones(n, t, dtype=torch.long)
    for i in range(n):
        keep = int(torch.randint(2, t + 1, (1,), generator=g))
        mask[i, keep:] = 0
        ids[i, keep:] = 0
    return ids, mask


def _hf_config(**kw: object):  # type: ignore[no-untyped-def]
    return transformers.BertConfig(
        vocab_size=SMALL.vocab_size,
        hidden_size=SMALL.hidden_size,
        num_attention_heads=SMALL.num_attention_heads,
        intermediate_size=SMALL.intermediate_size,
        max_position_embeddings=SMALL.max_position_embeddings,
        layer_norm_eps=SMALL.layer_norm_eps,
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation="eager",
        **kw,
    )


# ------------------------------------------------------------------------------------------- names and shapes
def test_base_state_dict_matches_released_manifest() -> None:
    with torch.device("meta"):
        model = AlbefModel(ALBEF_CONFIGS["base"])
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    released = load_manifest("released")
    released.pop("text_encoder.embeddings.position_ids")
    assert list(ours) == list(released)  # same names, same order
    assert ours == released


def test_base_256_differs_only_in_pos_embed() -> None:
    with torch.device("meta"):
        sd = AlbefModel(ALBEF_CONFIGS["base-256"]).state_dict()
    assert tuple(sd["visual_encoder.pos_embed"].shape) == (1, 257, 768)
    assert ALBEF_CONFIGS["base-256"].num_image_tokens == 257


def test_mlm_head_names_match_pretrain_manifest() -> None:
    cfg = ALBEF_CONFIGS["base"]
    with torch.device("meta"):
        emb = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        head = BertMLMHead(cfg, emb)
    ours = {f"text_encoder.cls.{k}": tuple(v.shape) for k, v in head.state_dict().items()}
    manifest = {k: v for k, v in load_manifest("pretrain").items() if k.startswith("text_encoder.cls.")}
    assert list(ours) == list(manifest) and ours == manifest
    assert head.predictions.decoder.weight is emb.weight  # tied to the word embeddings


# ------------------------------------------------------------------------------------------- text layers
def test_text_layers_match_transformers_bert(small: AlbefModel) -> None:
    hf = transformers.BertModel(_hf_config(num_hidden_layers=SMALL.fusion_layer), add_pooling_layer=False)
    hf = hf.double().eval()
    # our names are BERT's: load our text layers into transformers' model by name
    ours = small.text_encoder.state_dict()
    hf_sd = hf.state_dict()
    shared = {k: ours[k] for k in hf_sd if k in ours}
    assert set(hf_sd) - set(shared) <= {"embeddings.token_type_ids", "embeddings.position_ids"}
    hf.load_state_dict(shared, strict=False)
    ids, mask = _ids_mask(3, SMALL.max_text_len)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)).last_hidden_state
        got = small.text_states(ids, mask)
    assert got.dtype == torch.float64
    assert (got - ref).abs().max().item() < TOL


def test_fusion_layer_matches_transformers_cross_attention_layer(small: AlbefModel) -> None:
    # transformers 5 only builds cross-attention in a decoder layer; bidirectional self-attention here comes
    # from eager attention with our non-causal additive mask (is_causal is also switched off).
    from transformers.models.bert.modeling_bert import BertLayer as HFBertLayer

    layer = small.text_encoder.encoder.layer[SMALL.fusion_layer]
    hf = HFBertLayer(_hf_config(is_decoder=True, add_cross_attention=True)).double().eval()
    hf.attention.self.is_causal = False
    hf.load_state_dict(layer.state_dict())
    ids, mask = _ids_mask(3, SMALL.max_text_len, seed=1)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, SMALL.max_text_len, SMALL.hidden_size, generator=g, dtype=torch.float64)
    img = torch.randn(3, 10, SMALL.encoder_width, generator=g, dtype=torch.float64)
    bias = attention_bias(mask, torch.float64)
    with torch.no_grad():
        ref = hf(x, attention_mask=bias, encoder_hidden_states=img)
        ref = ref[0] if isinstance(ref, tuple) else ref
        got = layer(x, bias, layer.crossattention.self.project_kv(img))
    assert (got - ref).abs().max().item() < TOL


# ------------------------------------------------------------------------------------------- ViT
def _vit_reference(vit: VisionTransformer, pixels: torch.Tensor, heads: int) -> torch.Tensor:
    """ALBEF's ViT written out: patchify, CLS, pos_embed, pre-LN blocks (fused qkv, exact GELU), final norm."""
    x = vit.patch_embed.proj(pixels).flatten(2).transpose(1, 2)
    x = torch.cat([vit.cls_token.expand(len(x), -1, -1), x], dim=1) + vit.pos_embed
    for blk in vit.blocks:
        h = F.layer_norm(x, x.shape[-1:], blk.norm1.weight, blk.norm1.bias, eps=1e-6)
        n, t, d = h.shape
        qkv = F.linear(h, blk.attn.qkv.weight, blk.attn.qkv.bias).view(n, t, 3, heads, d // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        att = ((q @ k.transpose(-1, -2)) / (d // heads) ** 0.5).softmax(-1)
        h = (att @ v).transpose(1, 2).reshape(n, t, d)
        x = x + F.linear(h, blk.attn.proj.weight, blk.attn.proj.bias)
        h = F.layer_norm(x, x.shape[-1:], blk.norm2.weight, blk.norm2.bias, eps=1e-6)
        h = F.linear(
            F.gelu(F.linear(h, blk.mlp.fc1.weight, blk.mlp.fc1.bias)), blk.mlp.fc2.weight, blk.mlp.fc2.bias
        )
        x = x + h
    return F.layer_norm(x, x.shape[-1:], vit.norm.weight, vit.norm.bias, eps=1e-6)


def test_vit_matches_reference_and_timm(small: AlbefModel) -> None:
    g = torch.Generator().manual_seed(4)
    pixels = torch.randn(2, 3, SMALL.image_res, SMALL.image_res, generator=g, dtype=torch.float64)
    with torch.no_grad():
        got = small.image_tokens(pixels)
        ref = _vit_reference(small.visual_encoder, pixels, SMALL.vision_heads)
        timm_vit = (
            VisionTransformer(
                img_size=SMALL.image_res,
                patch_size=SMALL.patch_size,
                embed_dim=SMALL.vision_width,
                depth=SMALL.vision_depth,
                num_heads=SMALL.vision_heads,
                num_classes=0,
                global_pool="",
                norm_layer=partial(nn.LayerNorm, eps=1e-6),
            )
            .double()
            .eval()
        )
        timm_vit.load_state_dict(small.visual_encoder.state_dict())
        timm_out = timm_vit(pixels)
    assert got.shape == (2, SMALL.num_image_tokens, SMALL.vision_width)
    assert (got - ref).abs().max().item() < TOL
    assert (got - timm_out).abs().max().item() < TOL


# ------------------------------------------------------------------------------------------- ITM / ITC
def test_embeddings_are_normalised(small: AlbefModel) -> None:
    ids, mask = _ids_mask(3, SMALL.max_text_len)
    pixels = torch.randn(2, 3, SMALL.image_res, SMALL.image_res, dtype=torch.float64)
    with torch.no_grad():
        t = small.text_embed(small.text_states(ids, mask))
        i = small.image_embed(small.image_tokens(pixels))
    assert t.shape == (3, SMALL.embed_dim) and i.shape == (2, SMALL.embed_dim)
    torch.testing.assert_close(t.norm(dim=-1), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(i.norm(dim=-1), torch.ones(2, dtype=torch.float64))


def test_itm_batched_equals_pair_by_pair(small: AlbefModel) -> None:
    ids, mask = _ids_mask(4, SMALL.max_text_len, seed=5)
    pixels = torch.randn(4, 3, SMALL.image_res, SMALL.image_res, dtype=torch.float64)
    with torch.no_grad():
        states = small.text_states(ids, mask)
        tokens = small.image_tokens(pixels)
        aligned = small.itm_logits(states, mask, tokens)
        pairs = torch.cat(
            [small.itm_logits(states[i : i + 1], mask[i : i + 1], tokens[i : i + 1]) for i in range(4)]
        )
        one_text = small.itm_logits(states[:1], mask[:1], tokens)  # 1 text x 4 images
        one_text_ref = torch.cat(
            [small.itm_logits(states[:1], mask[:1], tokens[j : j + 1]) for j in range(4)]
        )
        one_image = small.itm_logits(states, mask, tokens[:1])  # 4 texts x 1 image
        one_image_ref = torch.cat(
            [small.itm_logits(states[i : i + 1], mask[i : i + 1], tokens[:1]) for i in range(4)]
        )
    assert aligned.shape == (4, 2)
    assert (aligned - pairs).abs().max().item() < TOL
    assert (one_text - one_text_ref).abs().max().item() < TOL
    assert (one_image - one_image_ref).abs().max().item() < TOL
    # padding tokens are ignored: changing ids under mask 0 changes nothing
    ids2 = ids.clone()
    ids2[mask == 0] = 7
    with torch.no_grad():
        again = small.itm_logits(small.text_states(ids2, mask), mask, tokens)
    assert (again - aligned).abs().max().item() < TOL


def test_kv_cache_changes_nothing(small: AlbefModel) -> None:
    ids, mask = _ids_mask(1, SMALL.max_text_len, seed=6)
    pixels = torch.randn(5, 3, SMALL.image_res, SMALL.image_res, dtype=torch.float64)
    with torch.no_grad():
        states = small.text_states(ids, mask)
        tokens = small.image_tokens(pixels)
        kv = small.cross_kv(tokens)
        plain = small.itm_logits(states, mask, tokens)
        cached = small.itm_logits(states, mask, None, kv=kv)
    assert len(kv) == SMALL.num_fusion_layers
    assert kv[0][0].shape == (5, SMALL.num_attention_heads, SMALL.num_image_tokens, SMALL.head_dim)
    torch.testing.assert_close(plain, cached, rtol=0, atol=TOL)


def test_fuse_runs_all_layers_with_gradients() -> None:
    torch.manual_seed(0)
    model = AlbefModel(SMALL).train()
    ids, mask = _ids_mask(2, SMALL.max_text_len)
    out = model.itm_logits(model.text_states(ids, mask), mask, model.image_tokens(torch.randn(2, 3, 48, 48)))
    out.sum().backward()
    grads = [n for n, p in model.named_parameters() if p.grad is None and n != "temp"]
    # only the ITC projections are unused by ITM
    assert all(n.startswith(("vision_proj", "text_proj")) for n in grads)


def test_config_json_roundtrip_and_albef_keys(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cfg = ALBEF_CONFIGS["tiny"]
    path = tmp_path / "c.json"
    cfg.to_json(path)
    assert AlbefConfig.from_json(path) == cfg
    # ALBEF's own config_bert.json keys are accepted (bookkeeping keys ignored, initializer_range renamed)
    bert = tmp_path / "config_bert.json"
    bert.write_text(
        '{"architectures": ["BertForMaskedLM"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",'
        ' "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 3072,'
        ' "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "bert",'
        ' "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 0, "type_vocab_size": 2,'
        ' "vocab_size": 30522, "fusion_layer": 6, "encoder_width": 768}'
    )
    assert AlbefConfig.from_json(bert) == ALBEF_CONFIGS["base"]
    from alignfuse.errors import InvalidInputError

    bad = tmp_path / "bad.json"
    bad.write_text('{"hidden_sise": 3}')
    with pytest.raises(InvalidInputError, match="hidden_sise"):
        AlbefConfig.from_json(bad)
    with pytest.raises(InvalidInputError, match="multiple"):
        AlbefConfig(hidden_size=100)


def test_itm_shortcuts_are_exact(small: AlbefModel) -> None:
    """itm_logits drops trailing padding and computes only the CLS row of the last layer: same numbers as the
    full fusion pass."""
    ids, mask = _ids_mask(3, SMALL.max_text_len, seed=8)
    mask[:, 9:] = 0  # every row padded after column 8
    pixels = torch.randn(3, 3, SMALL.image_res, SMALL.image_res, dtype=torch.float64)
    with torch.no_grad():
        states = small.text_states(ids, mask)
        tokens = small.image_tokens(pixels)
        full = small.itm_head(small.fuse(states, mask, None, kv=small.cross_kv(tokens))[:, 0])
        fast = small.itm_logits(states, mask, tokens)
    assert (full - fast).abs().max().item() < TOL


@pytest.mark.parametrize("n_text", [1, 4])
def test_folded_cross_attention_equals_kv_projection(small: AlbefModel, n_text: int) -> None:
    layer = small.text_encoder.encoder.layer[SMALL.fusion_layer]
    attn = layer.crossattention.self
    g = torch.Generator().manual_seed(9)
    x = torch.randn(n_text, 7, SMALL.hidden_size, generator=g, dtype=torch.float64)
    tokens = torch.randn(4, 50, SMALL.vision_width, generator=g, dtype=torch.float64)
    with torch.no_grad():
        folded = attn.cross_attention_folded(x, tokens)
        plain = attn.cross_attention(x, attn.project_kv(tokens))
    assert folded.shape == plain.shape == (4, 7, SMALL.hidden_size)
    assert (folded - plain).abs().max().item() < TOL
    assert attn.folded_is_cheaper(n_text, 7, 4, 50) and not attn.folded_is_cheaper(n_text, 7, 1, 50)


def test_itm_with_folded_path_forced(small: AlbefModel, monkeypatch: pytest.MonkeyPatch) -> None:
    from alignfuse.models.albef.bert import BertSelfAttention

    ids, mask = _ids_mask(1, SMALL.max_text_len, seed=10)
    pixels = torch.randn(5, 3, SMALL.image_res, SMALL.image_res, dtype=torch.float64)
    with torch.no_grad():
        states, tokens = small.text_states(ids, mask), small.image_tokens(pixels)
        monkeypatch.setattr(BertSelfAttention, "folded_is_cheaper", lambda self, *a: True)
        folded = small.itm_logits(states, mask, tokens)
        monkeypatch.setattr(BertSelfAttention, "folded_is_cheaper", lambda self, *a: False)
        projected = small.itm_logits(states, mask, tokens)
        cached = small.itm_logits(states, mask, None, kv=small.cross_kv(tokens))
    assert (folded - projected).abs().max().item() < TOL
    assert (folded - cached).abs().max().item() < TOL


def test_config_vocab_path_is_relative_to_the_json(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from alignfuse.models.albef.config import get_albef_config

    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nred\n")
    cfg_path = tmp_path / "model.json"
    cfg_path.write_text('{"vocab": "sub/vocab.txt", "hidden_size": 64, "num_attention_heads": 4}')
    cfg = get_albef_config(str(cfg_path))
    assert cfg.vocab == str((tmp_path / "sub" / "vocab.txt").resolve())
    assert cfg.hidden_size == 64 and cfg.fusion_layer == 6  # unspecified keys keep the base values
    assert AlbefConfig.from_dict({"vocab": "builtin:tiny"}).vocab == "builtin:tiny"
