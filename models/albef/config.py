"""ALBEF model configuration.

Key names follow ALBEF's own ``config_bert.json`` for the text side (so that file can be read directly with
:meth:`AlbefConfig.from_json`) plus the image-side keys of ALBEF's YAML configs (``image_res``, ``embed_dim``)
and a few of our own (``vision_*``, ``init_std``, ``vocab``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from alignfuse.errors import InvalidInputError

logger = logging.getLogger(__name__)

#: Name of the small WordPiece vocabulary shipped with the package (``models/albef/vocab_tiny.txt``).
#: ``AlbefConfig.vocab`` may hold this name, a path to a ``vocab.txt`` (or a directory holding one), or None
#: for ``bert-base-uncased`` (which needs the Hugging Face cache or network).
TINY_VOCAB = "builtin:tiny"
TINY_VOCAB_SIZE = 761  # lines in vocab_tiny.txt (checked by a test)

# Keys found in BERT / ALBEF config files that carry no information for this implementation.
_IGNORED_KEYS = frozenset(
    {
        "architectures",
        "model_type",
        "add_type_embeddings",
        "gradient_checkpointing",
        "position_embedding_type",
        "use_cache",
        "transformers_version",
        "classifier_dropout",
        "chunk_size_feed_forward",
        "is_decoder",
        "add_cross_attention",
    }
)
_RENAMED_KEYS = {"initializer_range": "init_std", "vision_layers": "vision_depth"}


@dataclass(frozen=True)
class AlbefConfig:
    """Sizes of an ALBEF retrieval model. Defaults are ALBEF's ViT-B/16 + BERT-base at 384 px."""

    # text side (ALBEF config_bert.json)
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    fusion_layer: int = 6
    encoder_width: int = 768
    type_vocab_size: int = 2
    pad_token_id: int = 0
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    # image side
    image_res: int = 384
    patch_size: int = 16
    vision_width: int = 768
    vision_depth: int = 12
    vision_heads: int = 12
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0
    patch_stem: str = (
        "linear"  # "linear" (ALBEF's patch embedding), "conv" or "hybrid" (models/albef/stem.py)
    )
    image_pool: str = (
        "cls"  # ITC image embedding read from the CLS token (ALBEF) or "max" over the patch tokens
    )
    # heads / text length
    embed_dim: int = 256
    max_text_len: int = 30
    # ours
    init_std: float = 0.02
    vocab: str | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.hidden_size % self.num_attention_heads:
            problems.append("hidden_size must be a multiple of num_attention_heads")
        if self.vision_width % self.vision_heads:
            problems.append("vision_width must be a multiple of vision_heads")
        if not 0 <= self.fusion_layer <= self.num_hidden_layers:
            problems.append("fusion_layer must lie in [0, num_hidden_layers]")
        if self.image_res % self.patch_size:
            problems.append("image_res must be a multiple of patch_size")
        if not 1 <= self.max_text_len <= self.max_position_embeddings:
            problems.append("max_text_len must lie in [1, max_position_embeddings]")
        if self.encoder_width != self.vision_width:
            problems.append("encoder_width (cross-attention K/V input) must equal vision_width")
        if self.patch_stem not in ("linear", "conv", "hybrid"):
            problems.append("patch_stem must be 'linear', 'conv' or 'hybrid'")
        if self.image_pool not in ("cls", "max"):
            problems.append("image_pool must be 'cls' or 'max'")
        if self.hidden_act != "gelu":
            problems.append("only hidden_act='gelu' (exact GELU) is supported")
        if problems:
            raise InvalidInputError("invalid ALBEF config: " + "; ".join(problems), detail=problems)

    # derived sizes
    @property
    def num_patches(self) -> int:
        return (self.image_res // self.patch_size) ** 2

    @property
    def num_image_tokens(self) -> int:
        return self.num_patches + 1

    @property
    def num_fusion_layers(self) -> int:
        return self.num_hidden_layers - self.fusion_layer

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def replace(self, **changes: Any) -> AlbefConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, path: str | Path | None = None) -> str:
        """Serialise (sorted keys). Writes to ``path`` when given; always returns the JSON text."""
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            Path(path).write_text(text + "\n", encoding="utf-8")
        return text

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, base: AlbefConfig | None = None) -> AlbefConfig:
        """Build from a dict of our keys or ALBEF's (``config_bert.json``, YAML image keys).

        Unknown keys are an error except BERT bookkeeping keys (``architectures``, ``model_type``, ...).
        Keys absent from ``data`` keep the values of ``base`` (default: the ``base`` config).
        """
        known = {f.name for f in fields(cls)}
        values: dict[str, Any] = {}
        unknown = []
        for key, value in data.items():
            key = _RENAMED_KEYS.get(key, key)
            if key in known:
                values[key] = value
            elif key in _IGNORED_KEYS:
                logger.debug("ALBEF config: ignoring key %r", key)
            else:
                unknown.append(key)
        if unknown:
            raise InvalidInputError(f"unknown ALBEF config keys: {sorted(unknown)}", detail=sorted(unknown))
        return replace(base or cls(), **values)

    @classmethod
    def from_json(cls, path: str | Path) -> AlbefConfig:
        """Read a JSON config. A relative ``vocab`` path is resolved against the file's directory."""
        p = Path(path)
        if not p.is_file():
            raise InvalidInputError(f"ALBEF config file not found: {p}")
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise InvalidInputError(f"cannot read ALBEF config {p}: {exc}") from exc
        if not isinstance(data, dict):
            raise InvalidInputError(f"ALBEF config {p} must hold a JSON object")
        vocab = data.get("vocab")
        if isinstance(vocab, str) and not vocab.startswith("builtin:") and not Path(vocab).is_absolute():
            data = {**data, "vocab": str((p.parent / vocab).resolve())}
        return cls.from_dict(data)


ALBEF_CONFIGS: dict[str, AlbefConfig] = {
    # ViT-B/16 at 384 px + BERT-base: the released fine-tuned retrieval models (mscoco.pth, flickr30k.pth).
    "base": AlbefConfig(),
    # The same at 256 px: the pre-training resolution (ALBEF.pth, ALBEF_4M.pth) and a cheaper fine-tuning size.
    "base-256": AlbefConfig(image_res=256),
    # A small model for tests and the project's own from-scratch training (built-in vocabulary).
    "tiny": AlbefConfig(
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=64,
        fusion_layer=2,
        encoder_width=64,
        image_res=64,
        patch_size=16,
        vision_width=64,
        vision_depth=2,
        vision_heads=4,
        embed_dim=32,
        init_std=0.05,
        vocab=TINY_VOCAB,
    ),
}


def get_albef_config(name: str) -> AlbefConfig:
    """A named config (``base``, ``base-256``, ``tiny``) or a path to a JSON config file."""
    if name in ALBEF_CONFIGS:
        return ALBEF_CONFIGS[name]
    if name.endswith(".json") or Path(name).is_file():
        return AlbefConfig.from_json(name)
    raise InvalidInputError(
        f"unknown ALBEF config {name!r}: use one of {sorted(ALBEF_CONFIGS)} or a path to a config .json"
    )
