"""Loading ALBEF checkpoints, and fetching the official ones.

Three formats are accepted (see ``shared/albef/REFERENCE.md``), as ``.pth`` or ``.safetensors``:

* **released** fine-tuned retrieval weights (``mscoco.pth``, ``flickr30k.pth``): a bare state_dict;
* **retrieval** training dicts ``{"model": state_dict, ...}`` with momentum copies (``*_m.*``) and queues;
* **pretrain** dicts (``ALBEF.pth``, ``ALBEF_4M.pth``): ``{"model", "optimizer", "lr_scheduler", "config",
  "epoch"}`` whose text encoder is ``text_encoder.bert.*`` with an MLM head ``text_encoder.cls.*`` and whose
  ``pos_embed`` is for 256 px (interpolated bicubically to the model's grid, CLS row kept).

Keys the model has are always loaded (so a training model with momentum encoders loads them too). Keys it lacks
are dropped only when the format documents them (momentum copies, queues, MLM head, ``position_ids``);
anything else, a model weight left uninitialised, or a shape mismatch raises :class:`CheckpointError`.
"""

from __future__ import annotations

import logging
import math
import pickle
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from alignfuse.errors import CheckpointError, InvalidInputError, ModelUnavailableError

logger = logging.getLogger(__name__)

ALBEF_BASE_URL = "https://storage.googleapis.com/sfr-pcl-data-research/ALBEF"
#: Pretrained tags of the official checkpoints → file names at :data:`ALBEF_BASE_URL`.
ALBEF_WEIGHTS: dict[str, str] = {
    "coco": "mscoco.pth",
    "flickr30k": "flickr30k.pth",
    "4m": "ALBEF_4M.pth",
    "14m": "ALBEF.pth",
}
_TAG_ALIASES = {"mscoco": "coco", "flickr": "flickr30k", "albef_4m": "4m", "albef": "14m"}

CheckpointFormat = Literal["released", "retrieval", "pretrain"]

_QUEUES = frozenset({"image_queue", "text_queue", "idx_queue", "queue_ptr"})
_POS_EMBED_KEYS = ("visual_encoder.pos_embed", "visual_encoder_m.pos_embed")


def is_documented_extra(key: str) -> bool:
    """Keys an ALBEF checkpoint may hold that an inference model does not need: momentum encoders
    (``*_m.*``), queues, the MLM head (``text_encoder.cls.*``), ``position_ids`` buffers, and the
    bag-of-words head of alignfuse's own training checkpoints (``bow_head.*``)."""
    head = key.split(".", 1)[0]
    return (
        key in _QUEUES
        or head.endswith("_m")
        or head == "bow_head"
        or key.startswith(("text_encoder.cls.", "text_encoder_m.cls."))
        or key.endswith("embeddings.position_ids")
    )


@dataclass(frozen=True)
class LoadReport:
    """What :func:`load_albef_checkpoint` did. ``ignored``: checkpoint keys the format documents and the model
    lacks; ``missing``: model keys the checkpoint lacks that are allowed to be absent (e.g. momentum copies
    of a training model fed a released file); ``interpolated``: ``(key, old_shape, new_shape)``."""

    path: str
    format: CheckpointFormat
    loaded: tuple[str, ...]
    ignored: tuple[str, ...]
    missing: tuple[str, ...]
    interpolated: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...]
    weights_only: bool

    def summary(self) -> str:
        return (
            f"{self.path}: {self.format} checkpoint, {len(self.loaded)} tensors loaded, "
            f"{len(self.ignored)} documented extras ignored, {len(self.missing)} optional model keys absent"
            + (f", interpolated {[k for k, _, _ in self.interpolated]}" if self.interpolated else "")
        )


# ----------------------------------------------------------------------------------------------- reading
def read_checkpoint_file(path: str | Path) -> tuple[Mapping[str, Any], bool]:
    """Read a ``.safetensors`` or torch file → (top-level object, loaded with weights_only).

    ``torch.load(weights_only=True, mmap=True)`` first; only a file that the safe unpickler refuses (a
    pre-training dict whose config or scheduler holds arbitrary objects) is re-read with
    ``weights_only=False``, which is logged as a warning: load such files only from trusted sources.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise ModelUnavailableError(f"ALBEF checkpoint {p} does not exist")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(p), device="cpu"), True
        except Exception as exc:
            raise CheckpointError(f"cannot read safetensors file {p}: {exc}") from exc
    try:
        obj = _torch_load(p, weights_only=True)
        weights_only = True
    except pickle.UnpicklingError as exc:
        logger.warning(
            "%s holds objects the safe loader refuses (%s); re-reading it with weights_only=False "
            "(arbitrary code could run: use trusted files only)",
            p,
            str(exc).splitlines()[0],
        )
        try:
            obj = _torch_load(p, weights_only=False)
        except Exception as exc2:
            raise CheckpointError(f"cannot read checkpoint {p}: {exc2}") from exc2
        weights_only = False
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise CheckpointError(f"cannot read checkpoint {p}: {exc}") from exc
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint {p} holds a {type(obj).__name__}, not a state_dict")
    return obj, weights_only


def _torch_load(path: Path, *, weights_only: bool) -> Any:
    """torch.load memory-mapped (zip format, the default since torch 1.6), else read in full (legacy)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):
            raise
        return torch.load(path, map_location="cpu", weights_only=weights_only)


def extract_state_dict(obj: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], CheckpointFormat]:
    """``obj.get("model", obj)`` with its format; ``text_encoder.bert.`` → ``text_encoder.`` (also for the
    momentum copy). Non-tensor entries are an error."""
    inner = obj.get("model") if isinstance(obj.get("model"), Mapping) else None
    sd = inner if inner is not None else obj
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"checkpoint entries that are not tensors: {bad[:10]}", detail=bad)
    pretrain = any(k.startswith("text_encoder.bert.") for k in sd)
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        for prefix in ("text_encoder.bert.", "text_encoder_m.bert."):
            if key.startswith(prefix):
                key = prefix.removesuffix("bert.") + key[len(prefix) :]
                break
        out[key] = value
    fmt: CheckpointFormat = "pretrain" if pretrain else ("retrieval" if inner is not None else "released")
    return out, fmt


def interpolate_pos_embed(pos: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """ViT position embeddings [1, 1+g*g, D] → [1, num_tokens, D]: keep the CLS row, bicubic-resize the
    g×g grid (align_corners=False) to the new square grid."""
    old_grid = pos.shape[1] - 1
    new_grid = num_tokens - 1
    g0, g1 = math.isqrt(old_grid), math.isqrt(new_grid)
    if g0 * g0 != old_grid or g1 * g1 != new_grid:
        raise CheckpointError(
            f"pos_embed with {pos.shape[1]} / {num_tokens} positions is not CLS + square grid"
        )
    cls, grid = pos[:, :1], pos[:, 1:]
    dim = pos.shape[-1]
    grid = grid.reshape(1, g0, g0, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=(g1, g1), mode="bicubic", align_corners=False).to(pos.dtype)
    grid = grid.permute(0, 2, 3, 1).reshape(1, g1 * g1, dim)
    return torch.cat([cls, grid], dim=1)


@dataclass(frozen=True)
class ConvertedStateDict:
    state_dict: dict[str, torch.Tensor]
    ignored: tuple[str, ...]
    missing: tuple[str, ...]
    interpolated: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...]


def convert_state_dict(
    sd: Mapping[str, torch.Tensor],
    target: Mapping[str, torch.Size | tuple[int, ...]],
    *,
    source: str = "checkpoint",
    optional: Callable[[str], bool] = is_documented_extra,
) -> ConvertedStateDict:
    """Map a (prefix-normalised) ALBEF state_dict onto the model keys/shapes in ``target``.

    Works on any device including ``meta``. Raises :class:`CheckpointError` listing unexpected keys, model
    weights the checkpoint lacks (unless ``optional(key)``), and shape mismatches."""
    out: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    unexpected: list[str] = []
    mismatched: list[str] = []
    interpolated: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []
    for key, value in sd.items():
        if key not in target:
            (ignored if is_documented_extra(key) else unexpected).append(key)
            continue
        want = tuple(target[key])
        if tuple(value.shape) != want:
            if key in _POS_EMBED_KEYS and value.ndim == 3 and value.shape[-1] == want[-1] and len(want) == 3:
                new = interpolate_pos_embed(value, want[1])
                interpolated.append((key, tuple(value.shape), want))
                logger.info("%s: %s interpolated %s -> %s", source, key, tuple(value.shape), want)
                value = new
            else:
                mismatched.append(f"{key}: checkpoint {tuple(value.shape)} vs model {want}")
                continue
        out[key] = value
    absent = [k for k in target if k not in out and k not in {m.split(":")[0] for m in mismatched}]
    missing = [k for k in absent if not optional(k)]
    problems = []
    if missing:
        problems.append(f"model weights missing from the checkpoint: {missing}")
    if mismatched:
        problems.append(f"shape mismatches: {mismatched}")
    if unexpected:
        problems.append(f"unexpected keys: {unexpected}")
    if problems:
        raise CheckpointError(
            f"{source} does not fit the ALBEF model: " + "; ".join(problems),
            detail={"missing": missing, "mismatched": mismatched, "unexpected": unexpected},
        )
    return ConvertedStateDict(
        out, tuple(ignored), tuple(k for k in absent if optional(k)), tuple(interpolated)
    )


def load_albef_checkpoint(
    model: nn.Module, path: str | Path, *, optional: Callable[[str], bool] = is_documented_extra
) -> LoadReport:
    """Load an ALBEF checkpoint (any of the three formats, ``.pth`` or ``.safetensors``) into ``model``.

    ``optional(key)`` says which model keys may be absent from the file (default: the documented extras, so
    a training model's momentum copies/queues may be absent; they are then left as initialised)."""
    t0 = time.perf_counter()
    obj, weights_only = read_checkpoint_file(path)
    sd, fmt = extract_state_dict(obj)
    target = {k: v.shape for k, v in model.state_dict().items()}
    conv = convert_state_dict(sd, target, source=str(path), optional=optional)
    result = model.load_state_dict(conv.state_dict, strict=False)
    leftover = [k for k in result.missing_keys if k in conv.state_dict or not optional(k)]
    if leftover or result.unexpected_keys:  # pragma: no cover - convert_state_dict already checked
        raise CheckpointError(
            f"{path}: load_state_dict left {leftover} / unexpected {result.unexpected_keys}"
        )
    report = LoadReport(
        path=str(path),
        format=fmt,
        loaded=tuple(conv.state_dict),
        ignored=conv.ignored,
        missing=conv.missing,
        interpolated=conv.interpolated,
        weights_only=weights_only,
    )
    logger.info("%s (%.1f s)", report.summary(), time.perf_counter() - t0)
    return report


# ----------------------------------------------------------------------------------------------- download
def normalise_tag(tag: str) -> str:
    t = tag.lower()
    t = _TAG_ALIASES.get(t, t)
    if t not in ALBEF_WEIGHTS:
        raise InvalidInputError(
            f"unknown ALBEF weights tag {tag!r}; known: {', '.join(sorted(ALBEF_WEIGHTS))} or a local file path"
        )
    return t


def albef_cache_path(tag: str, cache_dir: str | Path | None = None) -> Path:
    from alignfuse.models.hub import DEFAULT_CACHE_DIR

    root = Path(cache_dir).expanduser() if cache_dir is not None else DEFAULT_CACHE_DIR
    return root / "albef" / ALBEF_WEIGHTS[normalise_tag(tag)]


def resolve_albef_weights(
    tag: str,
    cache_dir: str | Path | None = None,
    *,
    spec: str | None = None,
    base_url: str = ALBEF_BASE_URL,
    timeout: float = 5.0,
    progress: bool = True,
) -> Path:
    """Local path of an official checkpoint (``coco``, ``flickr30k``, ``4m``, ``14m``), downloaded into
    ``<cache_dir>/albef/`` (default ``~/.cache/alignfuse``) with a progress bar when absent; its sha256 is
    recorded beside it. Offline or unreachable: :class:`ModelUnavailableError` within ``timeout`` seconds
    (one attempt, no retries), naming the spec and how to pass a local file instead."""
    from alignfuse.models.hub import sha256_file

    t = normalise_tag(tag)
    target = albef_cache_path(t, cache_dir)
    if target.is_file():
        return target
    fname = ALBEF_WEIGHTS[t]
    url = f"{base_url.rstrip('/')}/{fname}"
    label = spec or f"albef:base@{t}"
    hint = f"Download {url} elsewhere and pass the file: albef:base@/path/to/{fname}"
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    logger.info("%s: downloading %s -> %s", label, url, target)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, part.open("wb") as out:
            total = int(resp.headers.get("Content-Length") or 0) or None
            bar = _progress_bar(total, fname, progress)
            while block := resp.read(1 << 20):
                out.write(block)
                bar(len(block))
            bar(-1)
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        part.unlink(missing_ok=True)
        reason = getattr(exc, "reason", exc)
        raise ModelUnavailableError(f"{label}: cannot download {url} ({reason}); offline? {hint}") from exc
    part.replace(target)
    digest = sha256_file(target)
    logger.info("%s: saved %s (sha256 %s)", label, target, digest)
    return target


def _progress_bar(total: int | None, name: str, enabled: bool) -> Callable[[int], None]:
    if not enabled:
        return lambda n: None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return lambda n: None
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=name)

    def update(n: int) -> None:
        if n < 0:
            bar.close()
        else:
            bar.update(n)

    return update
