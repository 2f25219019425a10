"""Rerank cost: ALBEF's ITM cross-encoder against ALBEF's own evaluation loop, and what a rerank needs stored.

Timed on identical random weights and inputs (image tokens given, as from the feature cache), per direction:

* ``albef_loop`` (the reference): ALBEF's ``Retrieval.py`` ``evaluation()`` (salesforce/ALBEF; LAVIS
  ``compute_sim_matrix`` is the same loop): each text is encoded once by the text layers (padded to 30 tokens),
  its states are repeated over the C candidates, and only the fusion layers run per pair (``mode='fusion'``),
  with every cross-attention K/V projected per pair from the image tokens; image→text repeats the one image's
  tokens C times. Built from transformers' ``BertLayer`` (cross-attention) loaded with our weights.
* ``per_pair`` (labelled extra, the previous reference): the text layers recomputed for every pair.
* ``ours``: :class:`alignfuse.models.albef.AlbefModel` as the service calls it (``AlbefCrossEncoder.score`` →
  ``itm_logits``): trailing padding dropped, CLS-only last layer, cross-attention folded into the queries for
  many images, the image's K/V projected once for many texts.
* ``ours_serving`` (text→image): what ``service/engine/kernels.py`` runs for one query: the text states
  gathered per pair, the cached fp16 tokens converted, one aligned forward.
* ``ours_kv``: the same with the cross-attention K/V precomputed (``ImageStates.kv``). Text→image serving
  (1 text × C different images) gains from it only if K/V is *stored per image* (``kv_bytes_per_image``);
  built per query it costs ``kv_build_s`` (``ours_kv_incl_build_s``). Image→text (1 image × C texts) builds it
  once per query: ``ours_kv_incl_build_s`` is its serving cost.

Text→image times include encoding the one query text; image→text times exclude the C texts' text layers (ALBEF
encodes all texts once before its loop; ``text_layers_s`` is that cost if a service encodes them per query).

What a rerank needs stored per collection item (fp16 image tokens vs recomputing the ViT per query) is
``bench/rerank_storage.py``.

Usage::

    python bench/rerank.py                      # CPU: small (all C) + base (C <= 64), both directions
    python bench/rerank.py --quick              # toy sizes (the test)
    python bench/rerank.py --device cuda --precision bf16 --base-candidates 16,64,128,256 \
        --out bench/results/rerank_gpu.json

Reusable: ``measure_rerank(config, candidates, device, dtype, kv_cache) -> pairs/s`` (text→image by default).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_env import machine_info, resolve

from alignfuse.models.albef.bert import KV, attention_bias
from alignfuse.models.albef.config import ALBEF_CONFIGS, AlbefConfig
from alignfuse.models.albef.model import AlbefModel

log = logging.getLogger("bench.rerank")

CONFIGS: dict[str, AlbefConfig] = {
    # ViT-B/16 384 px + BERT-base: 577 image tokens, 6 + 6 text/fusion layers
    "base": ALBEF_CONFIGS["base"],
    # a small ALBEF: width 256, 4 heads, 6 + 6 layers, 224 px (197 image tokens)
    "small": AlbefConfig(
        hidden_size=256,
        num_attention_heads=4,
        intermediate_size=1024,
        encoder_width=256,
        image_res=224,
        vision_width=256,
        vision_depth=6,
        vision_heads=4,
        embed_dim=128,
    ),
    "tiny": ALBEF_CONFIGS["tiny"],
}
DIRECTIONS = ("t2i", "i2t")


# ---------------------------------------------------------------------------- the reference (ALBEF's loop)
@dataclass
class Reference:
    """transformers' BERT embeddings + layers with our weights: ALBEF's ``xbert`` text/fusion encoder."""

    embeddings: torch.nn.Module
    layers: list[torch.nn.Module]
    itm: torch.nn.Module
    fusion_layer: int

    def text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``mode='text'``: embeddings + text layers → [n, T, D]."""
        x = self.embeddings(input_ids=ids, token_type_ids=torch.zeros_like(ids))
        bias = attention_bias(mask, x.dtype)
        for layer in self.layers[: self.fusion_layer]:
            out = layer(x, attention_mask=bias)
            x = out[0] if isinstance(out, tuple) else out
        return x

    def fusion_itm(self, states: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``mode='fusion'`` over aligned pairs (states [n, T, D], tokens [n, L, W]: K/V projected per pair),
        then ``itm_head`` on the CLS state → [n, 2]."""
        x = states
        bias = attention_bias(mask, x.dtype)
        for layer in self.layers[self.fusion_layer :]:
            out = layer(x, attention_mask=bias, encoder_hidden_states=tokens)
            x = out[0] if isinstance(out, tuple) else out
        return self.itm(x[:, 0, :])


def build_reference(model: AlbefModel) -> Reference:
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertEmbeddings, BertLayer

    cfg = model.config

    def hf_config(**kw: Any) -> BertConfig:
        return BertConfig(  # type: ignore[call-arg]
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            num_attention_heads=cfg.num_attention_heads,
            intermediate_size=cfg.intermediate_size,
            max_position_embeddings=cfg.max_position_embeddings,
            layer_norm_eps=cfg.layer_norm_eps,
            hidden_act="gelu",
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            attn_implementation="sdpa",
            **kw,
        )

    emb = BertEmbeddings(hf_config())
    layers: list[torch.nn.Module] = []
    for i in range(cfg.num_hidden_layers):
        fusion = i >= cfg.fusion_layer
        layer = BertLayer(hf_config(is_decoder=fusion, add_cross_attention=fusion))
        # bidirectional: the decoder flag is only how transformers 5 enables cross-attention
        layer.attention.self.is_causal = False
        layers.append(layer)
    ref = torch.nn.ModuleDict({"embeddings": emb, "layer": torch.nn.ModuleList(layers)})
    ours = model.text_encoder.state_dict()
    missing, unexpected = ref.load_state_dict(
        {k.replace("encoder.layer.", "layer."): v for k, v in ours.items()}, strict=False
    )
    if unexpected or not all(k.endswith(("token_type_ids", "position_ids")) for k in missing):
        raise RuntimeError(f"reference weights do not match: missing {missing}, unexpected {unexpected}")
    p = next(model.parameters())
    ref = ref.to(device=p.device, dtype=p.dtype).eval()
    return Reference(emb, layers, model.itm_head, cfg.fusion_layer)


# ---------------------------------------------------------------------------- inputs and timing
@dataclass
class Inputs:
    ids: torch.Tensor  # [C, T] candidate texts (row 0 is the text→image query), padded to max_text_len
    mask: torch.Tensor
    tokens: torch.Tensor  # [C, L, W] image tokens (row 0 is the image→text query)


def make_inputs(cfg: AlbefConfig, c: int, device: torch.device, dtype: torch.dtype, seed: int = 1) -> Inputs:
    g = torch.Generator().manual_seed(seed)
    t = cfg.max_text_len
    ids = torch.randint(min(1000, cfg.vocab_size // 2), cfg.vocab_size, (c, t), generator=g)
    lengths = torch.randint(8, min(t, 22) + 1, (c,), generator=g)
    lengths[0] = min(t, 18)  # the query: a 17-word caption + [CLS]
    mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
    # rounded to fp16, as the feature cache stores them (so the serving path's fp16 → dtype copy is exact)
    tokens = torch.randn(c, cfg.num_image_tokens, cfg.vision_width, generator=g).half()
    return Inputs(ids.to(device), mask.to(device), tokens.to(device=device, dtype=dtype))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(
    fns: dict[str, Callable[[], torch.Tensor]], device: torch.device, repeats: int
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Warm each function up once, then ``repeats`` interleaved rounds; best time per function (the least
    disturbed by other load on a shared machine)."""
    outs = {k: fn() for k, fn in fns.items()}
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for k, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            outs[k] = fn()
            _sync(device)
            best[k] = min(best[k], time.perf_counter() - t0)
    return best, outs


def direction_fns(
    model: AlbefModel, ref: Reference, x: Inputs, direction: str
) -> tuple[dict[str, Callable[[], torch.Tensor]], tuple[KV, ...]]:
    """The timed functions of one direction (all returning ITM logits [C, 2]) and the precomputed K/V."""
    c = x.tokens.shape[0]
    if direction == "t2i":
        q_ids, q_mask = x.ids[:1], x.mask[:1]
        kv = model.cross_kv(x.tokens)  # K/V of every candidate image (as if stored per image)
        fns: dict[str, Callable[[], torch.Tensor]] = {
            "albef_loop": lambda: ref.fusion_itm(
                ref.text(q_ids, q_mask).repeat(c, 1, 1), q_mask.repeat(c, 1), x.tokens
            ),
            "per_pair": lambda: ref.fusion_itm(
                ref.text(q_ids.repeat(c, 1), q_mask.repeat(c, 1)), q_mask.repeat(c, 1), x.tokens
            ),
            "ours": lambda: model.itm_logits(model.text_states(q_ids, q_mask), q_mask, x.tokens),
            "ours_kv": lambda: model.itm_logits(model.text_states(q_ids, q_mask), q_mask, None, kv=kv),
            "ours_serving": partial(_serving_t2i, model, q_ids, q_mask, x.tokens.half()),
        }
        return fns, kv
    if direction != "i2t":
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    image = x.tokens[:1]
    kv = model.cross_kv(image)
    ref_states = ref.text(x.ids, x.mask)  # ALBEF encodes every text once, before its loop
    states = model.text_states(x.ids, x.mask)
    fns = {
        "albef_loop": lambda: ref.fusion_itm(ref_states, x.mask, image.repeat(c, 1, 1)),
        "ours": lambda: model.itm_logits(states, x.mask, image),
        "ours_kv": lambda: model.itm_logits(states, x.mask, None, kv=kv),
        "ours_kv_incl_build": lambda: model.itm_logits(states, x.mask, None, kv=model.cross_kv(image)),
    }
    return fns, kv


def _serving_t2i(
    model: AlbefModel, ids: torch.Tensor, mask: torch.Tensor, tokens16: torch.Tensor
) -> torch.Tensor:
    """What ``service/engine/kernels.py`` runs for one text×image job: the query's text states gathered once per
    pair (``TextStates.select``), the cached fp16 tokens converted to the model's dtype, one aligned forward."""
    c = tokens16.shape[0]
    per_pair = torch.zeros(c, dtype=torch.long, device=ids.device)
    hidden = model.text_states(ids, mask)[per_pair]
    tokens = tokens16.to(next(model.parameters()).dtype)
    return model.itm_logits(hidden, mask[per_pair], tokens)


def _first_k(model: AlbefModel, tokens: torch.Tensor) -> torch.Tensor:
    return model.cross_kv(tokens)[0][0]


def _model(cfg: AlbefConfig, device: torch.device, dtype: torch.dtype) -> AlbefModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AlbefModel(cfg)
    return model.to(device=device, dtype=dtype).eval()


def measure_rerank(
    config: AlbefConfig | str,
    candidates: int,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    kv_cache: bool = False,
    *,
    direction: str = "t2i",
    repeats: int = 3,
) -> float:
    """Rerank pairs/s of our ALBEF ITM path (random weights) for 1 text × ``candidates`` images
    (``direction="t2i"``) or 1 image × ``candidates`` texts (``"i2t"``). ``kv_cache``: the cross-attention K/V
    are precomputed and not timed (t2i: as if stored per image; i2t: built once per image). Best of
    ``repeats`` after one warm-up. ``config``: an :class:`AlbefConfig` or a name of :data:`CONFIGS`."""
    cfg = CONFIGS[config] if isinstance(config, str) else config
    dev = torch.device(device)
    model = _model(cfg, dev, dtype)
    x = make_inputs(cfg, candidates, dev, dtype)
    with torch.inference_mode():
        if direction == "t2i":
            q_ids, q_mask = x.ids[:1], x.mask[:1]
            states, mask, tokens = model.text_states(q_ids, q_mask), q_mask, x.tokens
        else:
            states, mask, tokens = model.text_states(x.ids, x.mask), x.mask, x.tokens[:1]
        kv = model.cross_kv(tokens) if kv_cache else None
        if direction == "t2i":

            def fn() -> torch.Tensor:
                return model.itm_logits(
                    model.text_states(q_ids, q_mask), mask, None if kv is not None else tokens, kv=kv
                )
        else:

            def fn() -> torch.Tensor:
                return model.itm_logits(states, mask, None if kv is not None else tokens, kv=kv)

        best, _ = timed({"fn": fn}, dev, repeats)
    return candidates / best["fn"]


def run_config(
    name: str, cfg: AlbefConfig, candidates: list[int], device: torch.device, dtype: torch.dtype, repeats: int
) -> list[dict[str, object]]:
    model = _model(cfg, device, dtype)
    ref = build_reference(model)
    kv_bytes = 2 * cfg.num_fusion_layers * cfg.num_image_tokens * cfg.hidden_size * 2  # K and V, fp16
    rows: list[dict[str, object]] = []
    with torch.inference_mode():
        for c in candidates:
            x = make_inputs(cfg, c, device, dtype)
            for direction in DIRECTIONS:
                fns, _ = direction_fns(model, ref, x, direction)
                best, outs = timed(fns, device, repeats)
                # the K/V build per query: C images (t2i) or the one image (i2t)
                build_tokens = x.tokens if direction == "t2i" else x.tokens[:1]
                kv_time, _ = timed({"kv": partial(_first_k, model, build_tokens)}, device, repeats)
                text_s = None
                if direction == "i2t":  # the C candidate texts' text layers (not in the i2t times)
                    fn = partial(model.text_states, x.ids, x.mask)
                    text_time, _ = timed({"t": fn}, device, repeats)
                    text_s = text_time["t"]
                if direction == "t2i":
                    best["ours_kv_incl_build"] = best["ours_kv"] + kv_time["kv"]
                ref_out = outs["albef_loop"].float()
                row: dict[str, object] = {
                    "config": name,
                    "direction": direction,
                    "candidates": c,
                    "kv_build_s": kv_time["kv"],
                    "text_layers_s": text_s,
                    "kv_bytes_per_image_fp16": kv_bytes,
                }
                for k, s in best.items():
                    row[f"{k}_s"] = s
                    row[f"{k}_pairs_per_s"] = c / s
                    if k != "albef_loop":
                        row[f"speedup_{k}"] = best["albef_loop"] / s
                for k, out in outs.items():
                    if k != "albef_loop":
                        row[f"max_abs_logit_diff_{k}"] = (out.float() - ref_out).abs().max().item()
                rows.append(row)
                log.info(
                    "%s %s C=%d: ALBEF loop %.1f pairs/s, ours x%.2f, ours+kv x%.2f (x%.2f incl. build)%s",
                    name, direction, c, row["albef_loop_pairs_per_s"], row["speedup_ours"],
                    row["speedup_ours_kv"], row["speedup_ours_kv_incl_build"],
                    f", per-pair text x{row['speedup_per_pair']:.2f}" if "speedup_per_pair" in row else "",
                )  # fmt: skip
    return rows


# ---------------------------------------------------------------------------- report
SERIES = (
    ("albef_loop_pairs_per_s", "ALBEF's eval loop (reference)"),
    ("per_pair_pairs_per_s", "text layers per pair (old reference)"),
    ("ours_pairs_per_s", "ours"),
    ("ours_serving_pairs_per_s", "ours as kernels.py serves it"),
    ("ours_kv_pairs_per_s", "ours + K/V cache (K/V given)"),
    ("ours_kv_incl_build_pairs_per_s", "ours + K/V built per query"),
)


def plot(rows: list[dict[str, object]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(str(r["config"]) for r in rows))
    fig, axes = plt.subplots(len(names), 2, figsize=(11, 3.8 * len(names)), squeeze=False)
    for ax_row, name in zip(axes, names, strict=True):
        for ax, direction in zip(ax_row, DIRECTIONS, strict=True):
            sub = [r for r in rows if r["config"] == name and r["direction"] == direction]
            cs = [int(str(r["candidates"])) for r in sub]
            for key, label in SERIES:
                if sub and key in sub[0]:
                    ax.plot(cs, [r[key] for r in sub], marker="o", label=label)
            ax.set_xscale("log", base=2)
            what = "1 text x C images (serving)" if direction == "t2i" else "1 image x C texts (evaluation)"
            ax.set_xlabel(f"candidates C ({what})")
            ax.set_ylabel("pairs / s")
            ax.set_title(f"ALBEF {name}, {direction}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--configs", default="small,base")
    ap.add_argument("--candidates", default="16,32,64,128,256", help="C values for non-base configs")
    ap.add_argument("--base-candidates", default="16,32,64", help="C values for the base config")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: leave as is)")
    ap.add_argument("--quick", action="store_true", help="toy sizes: tiny config, C in {4, 8}")
    ap.add_argument("--out", default="bench/results/rerank.json")
    ap.add_argument("--plot", default=None, help="default: docs/img/<the --out file's stem>.png")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.quick:
        args.configs, args.candidates, args.repeats = "tiny", "4,8", 1
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.precision]
    info = machine_info(device)
    rows: list[dict[str, object]] = []
    t0 = time.perf_counter()
    out = resolve(args.out)
    png = resolve(args.plot or f"docs/img/{out.stem}.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    png.parent.mkdir(parents=True, exist_ok=True)
    plan = [
        (name, int(c))
        for name in args.configs.split(",")
        for c in (args.base_candidates if name == "base" else args.candidates).split(",")
    ]
    for n_done, (name, c) in enumerate(plan, start=1):
        rows += run_config(name, CONFIGS[name], [c], device, dtype, args.repeats)
        info["loadavg_end"] = list(os.getloadavg())
        result = {
            "benchmark": "ALBEF rerank ITM logits vs ALBEF's own eval loop, both directions (random weights, "
            "image tokens given)",
            "reference": "salesforce/ALBEF Retrieval.py evaluation(): text states once, repeated over C, fusion "
            "layers per pair with K/V projected per pair, 30 padded tokens (transformers BertLayer, our weights)",
            "device": str(device),
            "precision": args.precision,
            "repeats": args.repeats,
            "timing": "best of `repeats` interleaved rounds after one warm-up each",
            "complete": n_done
            == len(plan),  # written after every (config, C): a cut-short run keeps its rows
            "machine": info,
            "total_s": time.perf_counter() - t0,
            "results": rows,
        }
        out.write_text(json.dumps(result, indent=2) + "\n")
        where = info.get("gpu") or f"{info['cpu']} ({info['torch_threads']} threads)"
        load = f"load {info['loadavg_start'][0]:.1f} to {os.getloadavg()[0]:.1f}"  # type: ignore[index]
        plot(rows, png, f"{device} {args.precision}: {where}, {load}")
    log.info("wrote %s and %s (%.0f s)", out, png, time.perf_counter() - t0)


if __name__ == "__main__":
    main()
