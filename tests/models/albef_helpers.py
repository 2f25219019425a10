"""Test support for ALBEF: the official state_dict manifests (copied from shared/albef) and random state_dicts
built from them, at the manifest's own sizes (``meta`` tensors by default: no memory) or scaled to a small
config (real tensors, for round trips through files)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from alignfuse.models.albef.config import AlbefConfig
from alignfuse.models.albef.model import AlbefModel

DATA = Path(__file__).resolve().parent / "data" / "albef"
MANIFESTS = {
    "released": "albef_retrieval_released_keys.json",
    "retrieval": "albef_retrieval_keys.json",
    "pretrain": "albef_pretrain_keys.json",
}


def load_manifest(kind: str) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` in state_dict order; ``kind`` in released / retrieval / pretrain."""
    raw = json.loads((DATA / MANIFESTS[kind]).read_text())
    return {k: tuple(v) for k, v in raw.items()}


def name_pattern(name: str) -> str:
    """A state_dict name with layer/block indices replaced by N (compare formats across depths)."""
    return re.sub(r"\.\d+\.", ".N.", name)


def format_shapes(
    kind: str, config: AlbefConfig, *, queue_size: int = 8, pos_grid: int | None = None
) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of a checkpoint in format ``kind`` (released / retrieval / pretrain) for a model of
    ``config``'s sizes (queues of ``queue_size``; ``pos_grid`` sets the checkpoint's ViT grid, e.g. smaller
    than the model's as in pre-training files). Checked against the official manifest's name patterns."""
    with torch.device("meta"):
        ref = {k: tuple(v.shape) for k, v in AlbefModel(config).state_dict().items()}
    d, v, e = config.hidden_size, config.vocab_size, config.embed_dim
    if pos_grid is not None:
        ref["visual_encoder.pos_embed"] = (1, 1 + pos_grid * pos_grid, config.vision_width)

    def main(prefix_bert: bool, momentum: bool) -> dict[str, tuple[int, ...]]:
        out: dict[str, tuple[int, ...]] = {}
        suffix = "_m" if momentum else ""
        for head in ("visual_encoder", "vision_proj", "text_encoder", "text_proj", "itm_head"):
            if momentum and head == "itm_head":
                continue
            items = [(k, s) for k, s in ref.items() if k.split(".", 1)[0] == head]
            for k, shape in items:
                rest = k.split(".", 1)[1]
                if head == "text_encoder":
                    te = f"text_encoder{suffix}." + ("bert." if prefix_bert else "")
                    if rest.startswith("embeddings.LayerNorm.bias"):
                        out[k.replace("text_encoder.", te)] = shape
                        continue
                    if rest.startswith("embeddings.word"):
                        out[te + "embeddings.position_ids"] = (1, config.max_position_embeddings)
                    out[te + rest] = shape
                else:
                    out[f"{head}{suffix}.{rest}"] = shape
            if head == "text_encoder" and prefix_bert:
                cls = f"text_encoder{suffix}.cls.predictions."
                out.update(
                    {
                        cls + "bias": (v,),
                        cls + "transform.dense.weight": (d, d),
                        cls + "transform.dense.bias": (d,),
                        cls + "transform.LayerNorm.weight": (d,),
                        cls + "transform.LayerNorm.bias": (d,),
                        cls + "decoder.weight": (v, d),
                        cls + "decoder.bias": (v,),
                    }
                )
        return out

    shapes: dict[str, tuple[int, ...]] = {"temp": ()}
    if kind != "released":
        shapes.update({"image_queue": (e, queue_size), "text_queue": (e, queue_size)})
        if kind == "retrieval":
            shapes["idx_queue"] = (1, queue_size)
        shapes["queue_ptr"] = (1,)
    shapes.update(main(kind == "pretrain", False))
    if kind != "released":
        shapes.update(main(kind == "pretrain", True))
    manifest = load_manifest(kind)
    assert {name_pattern(k) for k in shapes} == {name_pattern(k) for k in manifest}, kind
    return shapes


def build_from_manifest(
    shapes: dict[str, tuple[int, ...]], *, device: str = "meta", seed: int = 0
) -> dict[str, torch.Tensor]:
    """A state_dict with these names/shapes: ``meta`` tensors (free), or seeded random values elsewhere
    (integer buffers such as ``position_ids``/``queue_ptr`` get integer values)."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        if device == "meta":
            out[name] = torch.empty(shape, device="meta")
        elif name.endswith(("position_ids", "queue_ptr", "idx_queue")):
            out[name] = torch.arange(int(torch.tensor(shape).prod())).reshape(shape)
        else:
            out[name] = torch.randn(shape, generator=gen) * 0.05
    return out
