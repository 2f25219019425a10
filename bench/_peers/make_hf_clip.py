"""Save a randomly initialised transformers ``CLIPModel`` of the ViT-B-32 architecture with ``save_pretrained``.

Run with the *infinity* venv's Python (its own transformers version writes the config it will read), e.g.::

    /work/peers/infinity/bin/python bench/_peers/make_hf_clip.py OUT_DIR BPE_GZ

``BPE_GZ`` is open_clip's bundled ``bpe_simple_vocab_16e6.txt.gz``: the tokenizer's ``vocab.json`` and
``merges.txt`` are rebuilt from it exactly as open_clip's ``SimpleTokenizer`` builds its table (so the ids match
OpenAI CLIP's and open_clip's). Stand-alone on purpose: it imports nothing from alignfuse.
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable unicode table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def write_tokenizer_files(out: Path, bpe_gz: Path) -> None:
    with gzip.open(bpe_gz) as f:
        merges = f.read().decode("utf-8").split("\n")
    merges = merges[1 : 49152 - 256 - 2 + 1]
    pairs = [tuple(m.split()) for m in merges]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(p) for p in pairs]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (out / "vocab.json").write_text(json.dumps({v: i for i, v in enumerate(vocab)}), encoding="utf-8")
    (out / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(p) for p in pairs) + "\n", encoding="utf-8"
    )


def main() -> None:
    out, bpe_gz = Path(sys.argv[1]), Path(sys.argv[2])
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    # open_clip ViT-B-32: vision 12 x 768 (patch 32, 224 px), text 12 x 512 (8 heads, 77 tokens), embed 512
    config = CLIPConfig(
        text_config={
            "vocab_size": 49408,
            "hidden_size": 512,
            "intermediate_size": 2048,
            "num_hidden_layers": 12,
            "num_attention_heads": 8,
            "max_position_embeddings": 77,
            "hidden_act": "gelu",
            "bos_token_id": 49406,
            "eos_token_id": 49407,
            "pad_token_id": 49407,
        },
        vision_config={
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "image_size": 224,
            "patch_size": 32,
            "hidden_act": "gelu",
        },
        projection_dim=512,
    )
    model = CLIPModel(config).eval()
    model.save_pretrained(out)
    write_tokenizer_files(out, bpe_gz)
    tok = CLIPTokenizer(vocab_file=str(out / "vocab.json"), merges_file=str(out / "merges.txt"))
    proc = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 224}, crop_size=224), tokenizer=tok
    )
    proc.save_pretrained(out)
    ids = tok("a red circle")["input_ids"]
    n_params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"dir": str(out), "params": n_params, "token_ids_a_red_circle": ids}))


if __name__ == "__main__":
    main()
