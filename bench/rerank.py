"""Rerank throughput: ALBEF cross-encoder on one text x C candidate images.

Compares, on identical random weights and inputs (image tokens are given, as from the feature cache):

* ``reference``: transformers' BERT layer stack (``BertEmbeddings`` + ``BertLayer``s, cross-attention in the
  fusion layers), run over every (text, image) pair: the text layers are recomputed per pair and the image
  K/V projected per pair, all C pairs in one batched forward;
* ``ours``: :class:`alignfuse.models.albef.AlbefModel`: text layers once, fusion layers over C pairs, image K/V projected
  from the tokens;
* ``ours_kv``: the same with the cross-attention K/V cache precomputed per image (``ImageStates.kv``).

Usage::

    python bench/rerank.py                                   # CPU: small (all C) + base (C <= 64)
    python bench/rerank.py --device cuda --precision bf16 --base-candidates 16,32,64,128,256 \
        --out bench/results/rerank_gpu.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alignfuse.models.albef.bert import attention_bias
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
}


def build_reference(model: AlbefModel) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """transformers' BERT layers with our weights (loaded by name), as a plain per-pair forward."""
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
    assert not unexpected and all(k.endswith(("token_type_ids", "position_ids")) for k in missing), missing
    p = next(model.parameters())
    ref = ref.to(device=p.device, dtype=p.dtype).eval()
    itm = model.itm_head

    def forward(ids: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        c = tokens.shape[0]
        ids, mask = ids.expand(c, -1), mask.expand(c, -1)  # every pair runs the whole stack
        x = ref["embeddings"](input_ids=ids, token_type_ids=torch.zeros_like(ids))
        bias = attention_bias(mask, x.dtype)
        for i, layer in enumerate(layers):
            if i >= cfg.fusion_layer:
                x = layer(x, attention_mask=bias, encoder_hidden_states=tokens)
            else:
                x = layer(x, attention_mask=bias)
            x = x[0] if isinstance(x, tuple) else x
        return itm(x[:, 0, :])

    return forward


def timed(
    fns: dict[str, Callable[[], torch.Tensor]], device: torch.device, repeats: int
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Warm each function up once, then run ``repeats`` interleaved rounds; best time per function (the
    least disturbed by other load on a shared machine)."""
    outs = {k: fn() for k, fn in fns.items()}
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for k, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            outs[k] = fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best, outs


def machine(device: torch.device) -> dict[str, object]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, object] = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "loadavg_start": os.getloadavg(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def run_config(
    name: str,
    cfg: AlbefConfig,
    candidates: list[int],
    device: torch.device,
    dtype: torch.dtype,
    repeats: int,
) -> list[dict[str, object]]:
    torch.manual_seed(0)
    model = AlbefModel(cfg).to(device=device, dtype=dtype).eval()
    reference = build_reference(model)
    g = torch.Generator().manual_seed(1)
    t = cfg.max_text_len
    ids = torch.randint(1000 % cfg.vocab_size, cfg.vocab_size, (1, t), generator=g).to(device)
    mask = torch.ones(1, t, dtype=torch.long, device=device)
    mask[:, 18:] = 0  # a 17-word caption padded to 30
    all_tokens = torch.randn(max(candidates), cfg.num_image_tokens, cfg.vision_width, generator=g)
    all_tokens = all_tokens.to(device=device, dtype=dtype)
    rows = []
    with torch.inference_mode():
        for c in candidates:
            tokens = all_tokens[:c]
            if device.type == "cuda":
                torch.cuda.synchronize()
            t_kv = time.perf_counter()
            kv = model.cross_kv(tokens)
            if device.type == "cuda":
                torch.cuda.synchronize()
            kv_s = time.perf_counter() - t_kv

            def reference_fn(tokens: torch.Tensor = tokens) -> torch.Tensor:
                return reference(ids, mask, tokens)

            def ours(tokens: torch.Tensor = tokens) -> torch.Tensor:
                return model.itm_logits(model.text_states(ids, mask), mask, tokens)

            def ours_kv(kv: tuple = kv) -> torch.Tensor:  # type: ignore[type-arg]
                return model.itm_logits(model.text_states(ids, mask), mask, None, kv=kv)

            best, outs = timed({"reference": reference_fn, "ours": ours, "ours_kv": ours_kv}, device, repeats)
            ref_s, ours_s, kv_s2 = best["reference"], best["ours"], best["ours_kv"]
            ref_out = outs["reference"].float()
            diff = max((outs[k].float() - ref_out).abs().max().item() for k in ("ours", "ours_kv"))
            row = {
                "config": name,
                "candidates": c,
                "reference_s": ref_s,
                "ours_s": ours_s,
                "ours_kv_s": kv_s2,
                "kv_build_s": kv_s,
                "reference_pairs_per_s": c / ref_s,
                "ours_pairs_per_s": c / ours_s,
                "ours_kv_pairs_per_s": c / kv_s2,
                "speedup": ref_s / ours_s,
                "speedup_kv": ref_s / kv_s2,
                "max_abs_logit_diff": diff,
            }
            log.info(
                "%s C=%d: ref %.1f pairs/s, ours %.1f (x%.2f), ours+kv %.1f (x%.2f), |diff| %.1e",
                name, c, row["reference_pairs_per_s"], row["ours_pairs_per_s"], row["speedup"],
                row["ours_kv_pairs_per_s"], row["speedup_kv"], diff,
            )  # fmt: skip
            rows.append(row)
    return rows


def plot(rows: list[dict[str, object]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({str(r["config"]) for r in rows})
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        sub = [r for r in rows if r["config"] == name]
        cs = [r["candidates"] for r in sub]
        for key, label in (
            ("reference_pairs_per_s", "transformers BERT stack, per pair"),
            ("ours_pairs_per_s", "ours (text once)"),
            ("ours_kv_pairs_per_s", "ours + K/V cache"),
        ):
            ax.plot(cs, [r[key] for r in sub], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("candidates C (1 text x C images)")
        ax.set_ylabel("pairs / s")
        ax.set_title(f"ALBEF {name}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--configs", default="small,base")
    ap.add_argument("--candidates", default="16,32,64,128,256", help="C values for the small config")
    ap.add_argument("--base-candidates", default="16,32,64", help="C values for the base config")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--out", default="bench/results/rerank.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.precision]
    info = machine(device)
    rows: list[dict[str, object]] = []
    t0 = time.perf_counter()
    for name in args.configs.split(","):
        cs = args.base_candidates if name == "base" else args.candidates
        rows += run_config(name, CONFIGS[name], [int(c) for c in cs.split(",")], device, dtype, args.repeats)
    info["loadavg_end"] = os.getloadavg()
    result = {
        "benchmark": "ALBEF rerank: 1 text x C images, ITM logits (random weights, image tokens given)",
        "device": str(device),
        "precision": args.precision,
        "repeats": args.repeats,
        "timing": "best of `repeats` interleaved rounds after one warm-up each",
        "machine": info,
        "total_s": time.perf_counter() - t0,
        "results": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    where = info.get("gpu") or f"{info['cpu']} ({info['torch_threads']} threads)"
    plot(rows, out.with_suffix(".png"), f"{device} {args.precision}: {where}")
    log.info("wrote %s and %s (%.0f s)", out, out.with_suffix(".png"), result["total_s"])


if __name__ == "__main__":
    main()
