"""Retrieval evaluation with ALBEF's protocol: recall metrics and the three scoring modes.

Pure metrics (numpy only, no models)
------------------------------------
:func:`recall_metrics` takes an image→text score matrix ``S[n_images, n_texts]`` (and optionally a separate
text→image matrix ``S_t2i[n_texts, n_images]``, as ALBEF's rerank produces two) plus the ground truth
(``img2txt[i]`` = the captions of image ``i``, ``txt2img[t]`` = the image of caption ``t``) and returns exactly
ALBEF's numbers (``itm_eval`` in its ``Retrieval.py``):

- TR R@K (image→text): for each image, the 0-based rank of the *best-ranked* of its ground-truth captions in
  its row; R@K = 100 · fraction of images whose rank < K. An image without captions counts as a miss.
- IR R@K (text→image): for each text, the 0-based rank of its one image in its row.
- ``r_mean`` = the mean of the six recalls.

Ranking and ties (a deterministic rule)
---------------------------------------
ALBEF ranks a row with ``np.argsort(score)[::-1]``. We define the order as that expression with a *stable*
sort: scores descending, and **among equal scores the higher index ranks first** (the reverse of a stable
ascending sort). So the rank of column ``j`` in row ``s`` is ``#{k: s[k] > s[j]} + #{k > j: s[k] == s[j]}``;
it is computed by counting (no sort). This equals ALBEF's result whenever numpy's default (unstable)
quicksort happens to keep equal scores in index order, which it does for short rows. It matters for the
non-candidates of the rerank mode, which all score −100. NaN scores are rejected.

Modes (:func:`evaluate`)
------------------------
``dual``       ``sims = image_embeds @ text_embeds.T`` from the dual encoder (cosine, no temperature);
               both directions rank ``sims``.
``rerank``     ALBEF's step 3: for every image its top-``k_test`` texts by ``sims`` and for every text its
               top-``k_test`` images (same order as above: ties → higher index first); the cross-encoder scores
               each candidate pair; candidate score = ITM logit of "match" (``fusion="itm"``, ALBEF) or that
               logit + the dual-encoder cosine (``"itm+itc"``, BLIP/LAVIS) or logit + cosine × the dual
               encoder's learned logit scale (``"itm+itc_logit"``); every other entry scores −100.
               A pair that is a candidate in both directions is scored once (``pair_evals`` counts the unique
               pairs actually run; ALBEF's protocol runs ``k·(N_i + N_t)``, reported as ``pair_evals_protocol``).
``all_pairs``  the cross-encoder over every (image, text) pair (refused above ``max_all_pairs`` pairs).

Cost columns: ``encoder_passes`` counts unimodal forward passes (one per image or text per model) the mode
needs: dual ``N_i + N_t``; rerank ``N_i + N_t`` (dual) + the cross-encoder's text/image states for the items
that appear in a candidate pair; all_pairs ``N_i + N_t`` cross-encoder states (+ ``N_i + N_t`` dual passes for
``itm+itc``/``itm+itc_logit``). Embeddings reused from the collection and image states rebuilt from the collection's feature
cache still count (they were paid at build time); ``meta`` says what was reused. ``seconds`` is the wall time
of the work the mode needs, the shared dual-encoder part included in each mode that uses it.

Hard-negative groups (:func:`group_accuracy`): when the Karpathy JSON has a ``group`` per image (the built-in
scenes), for each text: is its own image ranked first among the images of its group (``t2i``); for each
image: is the best-ranked caption among the group's captions one of its own (``i2t``). Groups with one image
are skipped. Chance = mean of 1/|group| (t2i) and of own captions / group captions (i2t). When every entry
also lists its drawn ``objects`` (the scenes do), a pick is judged by whether the caption is *true* of the
picked image (``alignfuse.data.scenes.caption_matches``): t2i = does the best group image make the caption true, i2t =
is the best group caption true of the image; choices where every option is true are skipped and chance is the
true fraction of the options.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from alignfuse.errors import (
    CorruptDataError,
    EncoderMismatchError,
    InvalidInputError,
    NotFoundError,
    UnsupportedMediaError,
)
from alignfuse.models.base import FUSIONS, CrossEncoder, DualEncoder, ImageStates, TextStates, fuse_scores

if TYPE_CHECKING:
    from alignfuse.index.collection import Collection

log = logging.getLogger(__name__)

Mode = Literal["dual", "rerank", "all_pairs"]
MODES: tuple[str, ...] = ("dual", "rerank", "all_pairs")
NON_CANDIDATE = -100.0
DEFAULT_MAX_ALL_PAIRS = 2_000_000
RECALL_KEYS: tuple[str, ...] = ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "r_mean")
MODE_KEYS: tuple[str, ...] = (*RECALL_KEYS, "encoder_passes", "pair_evals", "seconds")
GROUP_KEYS: tuple[str, ...] = (
    "group_acc_t2i",
    "group_acc_t2i_chance",
    "group_acc_i2t",
    "group_acc_i2t_chance",
)

# ------------------------------------------------------------------------------------------------ metrics


@dataclass(frozen=True)
class Recall:
    """ALBEF's retrieval metrics, in percent."""

    tr_r1: float
    tr_r5: float
    tr_r10: float
    ir_r1: float
    ir_r5: float
    ir_r10: float
    r_mean: float


def _check_scores(scores: np.ndarray, name: str) -> np.ndarray:
    s = np.asarray(scores)
    if s.ndim != 2:
        raise InvalidInputError(f"{name} must be a 2-D score matrix, got shape {s.shape}")
    if not np.issubdtype(s.dtype, np.floating):
        s = s.astype(np.float64)
    if np.isnan(s).any():
        raise InvalidInputError(f"{name} contains NaN scores")
    return s


def ranks_of(scores: np.ndarray, rows: np.ndarray, cols: np.ndarray, *, chunk: int = 256) -> np.ndarray:
    """0-based rank of ``scores[rows[p], cols[p]]`` within row ``rows[p]``, for every p (int64 [P]).

    Order: scores descending; among equal scores the higher column index first (reverse stable argsort,
    see the module docstring)."""
    s = np.asarray(scores)
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    cols = np.asarray(cols, dtype=np.int64).reshape(-1)
    out = np.empty(len(rows), dtype=np.int64)
    if len(rows) == 0:
        return out
    col_index = np.arange(s.shape[1], dtype=np.int64)[None, :]
    for a in range(0, len(rows), chunk):
        r = rows[a : a + chunk]
        c = cols[a : a + chunk]
        block = s[r]  # [b, n]
        target = block[np.arange(len(r)), c][:, None]
        greater = (block > target).sum(axis=1)
        tied_after = ((block == target) & (col_index > c[:, None])).sum(axis=1)
        out[a : a + chunk] = greater + tied_after
    return out


def ranking(row: np.ndarray) -> np.ndarray:
    """The full order of one row under the same rule: indices, best first (``argsort(stable)[::-1]``)."""
    return np.argsort(np.asarray(row), kind="stable")[::-1]


def topk_indices(scores: np.ndarray, k: int, *, chunk: int = 512) -> np.ndarray:
    """Per row, the first ``k`` indices of :func:`ranking` (int64 [n, min(k, m)]).

    ``np.argpartition`` selects the k largest; a row where the k-th value is tied with a value left outside
    falls back to the full stable sort, so the result is exactly ``ranking(row)[:k]``."""
    s = np.asarray(scores)
    n, m = s.shape
    k = min(k, m)
    out = np.empty((n, k), dtype=np.int64)
    if k == 0:
        return out
    for a in range(0, n, chunk):
        block = s[a : a + chunk]
        if k >= m:
            out[a : a + chunk] = np.argsort(block, axis=1, kind="stable")[:, ::-1][:, :k]
            continue
        part = np.argpartition(block, m - k, axis=1)[:, m - k :]
        vals = np.take_along_axis(block, part, axis=1)
        thr = vals.min(axis=1, keepdims=True)
        ambiguous = (block == thr).sum(axis=1) != (vals == thr).sum(axis=1)
        order = np.lexsort((-part, -vals), axis=-1)  # value descending, then index descending
        out[a : a + chunk] = np.take_along_axis(part, order, axis=1)
        for r in np.nonzero(ambiguous)[0]:
            out[a + r] = ranking(block[r])[:k]
    return out


def _normalise_gt(
    n_images: int, n_texts: int, img2txt: Sequence[Sequence[int]], txt2img: Sequence[int] | np.ndarray
) -> tuple[list[list[int]], np.ndarray]:
    if len(img2txt) != n_images:
        raise InvalidInputError(
            f"img2txt has {len(img2txt)} entries but the score matrix has {n_images} images"
        )
    t2i = np.asarray(txt2img, dtype=np.int64).reshape(-1)
    if len(t2i) != n_texts:
        raise InvalidInputError(f"txt2img has {len(t2i)} entries but the score matrix has {n_texts} texts")
    if n_texts and (t2i.min() < 0 or t2i.max() >= n_images):
        raise InvalidInputError("txt2img names an image index outside the score matrix")
    i2t = [[int(t) for t in caps] for caps in img2txt]
    for caps in i2t:
        for t in caps:
            if not 0 <= t < n_texts:
                raise InvalidInputError(f"img2txt names text index {t} outside the score matrix")
    return i2t, t2i


def ranks_i2t(scores_i2t: np.ndarray, img2txt: Sequence[Sequence[int]]) -> np.ndarray:
    """Per image, the rank of its best-ranked ground-truth caption (float [N_i]; ``inf`` without captions)."""
    s = _check_scores(scores_i2t, "scores_i2t")
    img_of_pair = np.asarray([i for i, caps in enumerate(img2txt) for _ in caps], dtype=np.int64)
    cap_of_pair = np.asarray([t for caps in img2txt for t in caps], dtype=np.int64)
    best = np.full(s.shape[0], np.inf)
    if len(img_of_pair):
        r = ranks_of(s, img_of_pair, cap_of_pair)
        np.minimum.at(best, img_of_pair, r.astype(np.float64))
    return best


def ranks_t2i(scores_t2i: np.ndarray, txt2img: Sequence[int] | np.ndarray) -> np.ndarray:
    """Per text, the rank of its image (int64 [N_t])."""
    s = _check_scores(scores_t2i, "scores_t2i")
    t2i = np.asarray(txt2img, dtype=np.int64).reshape(-1)
    return ranks_of(s, np.arange(s.shape[0], dtype=np.int64), t2i)


def _pct(ranks: np.ndarray, k: int) -> float:
    return 100.0 * float(np.mean(ranks < k)) if len(ranks) else 0.0


def recall_metrics(
    scores_i2t: np.ndarray,
    img2txt: Sequence[Sequence[int]],
    txt2img: Sequence[int] | np.ndarray,
    scores_t2i: np.ndarray | None = None,
) -> Recall:
    """ALBEF's TR/IR R@1/5/10 and r_mean (percent) from ``scores_i2t[N_i, N_t]`` (and ``scores_t2i[N_t, N_i]``,
    default ``scores_i2t.T``). See the module docstring for the tie rule."""
    s_i2t = _check_scores(scores_i2t, "scores_i2t")
    s_t2i = s_i2t.T if scores_t2i is None else _check_scores(scores_t2i, "scores_t2i")
    n_i, n_t = s_i2t.shape
    if s_t2i.shape != (n_t, n_i):
        raise InvalidInputError(f"scores_t2i has shape {s_t2i.shape}, expected {(n_t, n_i)}")
    i2t, t2i = _normalise_gt(n_i, n_t, img2txt, txt2img)
    tr = ranks_i2t(s_i2t, i2t)
    ir = ranks_t2i(s_t2i, t2i)
    vals = [_pct(tr, 1), _pct(tr, 5), _pct(tr, 10), _pct(ir, 1), _pct(ir, 5), _pct(ir, 10)]
    return Recall(
        tr_r1=vals[0],
        tr_r5=vals[1],
        tr_r10=vals[2],
        ir_r1=vals[3],
        ir_r5=vals[4],
        ir_r10=vals[5],
        r_mean=float(np.mean(vals)),
    )


@dataclass(frozen=True)
class GroupAccuracy:
    """Hard-negative accuracy within groups (fractions in [0, 1]) and its chance level."""

    t2i: float
    t2i_chance: float
    i2t: float
    i2t_chance: float
    groups: int
    texts: int
    images: int


def group_accuracy(
    scores_i2t: np.ndarray,
    img2txt: Sequence[Sequence[int]],
    txt2img: Sequence[int] | np.ndarray,
    groups: Sequence[int | None],
    scores_t2i: np.ndarray | None = None,
    truth: Callable[[int, int], bool] | None = None,
) -> GroupAccuracy | None:
    """Accuracy of picking the right item among a group's hard negatives (see the module docstring).

    ``groups[i]`` is the group of image ``i`` (None: no group). Returns None when no group has 2+ images.

    ``truth(t, i)``: whether text ``t`` is true of image ``i`` (the scenes know: their JSON lists the drawn
    objects). With it, a pick is right when the chosen item makes the caption true rather than when it is the
    annotated one: siblings often share a true caption ("a red circle"), and counting those picks as errors
    measures annotation, not binding. Captions true of every group image (t2i) and images of which every
    group caption is true (i2t) decide nothing and are skipped; chance is the true fraction of the choices."""
    s_i2t = _check_scores(scores_i2t, "scores_i2t")
    s_t2i = s_i2t.T if scores_t2i is None else _check_scores(scores_t2i, "scores_t2i")
    n_i, n_t = s_i2t.shape
    i2t, t2i = _normalise_gt(n_i, n_t, img2txt, txt2img)
    if len(groups) != n_i:
        raise InvalidInputError(f"groups has {len(groups)} entries, expected {n_i}")
    # without drawn objects a caption counts as true of its annotated image only
    is_true = truth if truth is not None else (lambda t, i: int(t2i[t]) == i)
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        if g is not None:
            members.setdefault(int(g), []).append(i)
    t_hits: list[float] = []
    t_chance: list[float] = []
    i_hits: list[float] = []
    i_chance: list[float] = []
    used = 0
    for imgs in members.values():
        if len(imgs) < 2:
            continue
        used += 1
        g_imgs = np.asarray(imgs, dtype=np.int64)  # ascending: local order = global order (same tie rule)
        caps = np.asarray(sorted(t for i in imgs for t in i2t[i]), dtype=np.int64)
        for i in imgs:
            for t in i2t[i]:
                true_of = [is_true(t, int(j)) for j in g_imgs]
                if all(true_of):
                    continue
                t_hits.append(float(true_of[int(ranking(s_t2i[t, g_imgs])[0])]))
                t_chance.append(sum(true_of) / len(true_of))
            if len(caps) and i2t[i]:
                true_caps = [is_true(int(c), i) for c in caps]
                if all(true_caps):
                    continue
                i_hits.append(float(true_caps[int(ranking(s_i2t[i, caps])[0])]))
                i_chance.append(sum(true_caps) / len(caps))
    if used == 0:
        return None
    return GroupAccuracy(
        t2i=float(np.mean(t_hits)) if t_hits else 0.0,
        t2i_chance=float(np.mean(t_chance)) if t_chance else 0.0,
        i2t=float(np.mean(i_hits)) if i_hits else 0.0,
        i2t_chance=float(np.mean(i_chance)) if i_chance else 0.0,
        groups=used,
        texts=len(t_hits),
        images=len(i_hits),
    )


# ------------------------------------------------------------------------------------------ evaluation data


@dataclass(frozen=True)
class EvalData:
    """A Karpathy-style test split, flattened as ALBEF does: texts enumerated image by image, captions in order.

    ``images[i]`` is the path as written in the JSON, ``image_paths[i]`` the file under the image root."""

    source: str
    images: tuple[str, ...]
    image_paths: tuple[Path, ...]
    texts: tuple[str, ...]
    txt2img: tuple[int, ...]
    img2txt: tuple[tuple[int, ...], ...]
    groups: tuple[int | None, ...] | None = None
    #: per image, the drawn objects (the built-in scenes' JSON has them): group accuracy then judges a pick
    #: by whether the caption is true of the picked image (``alignfuse.data.scenes.caption_matches``)
    objects: tuple[tuple[dict[str, Any], ...], ...] | None = None

    def truth(self) -> Callable[[int, int], bool] | None:
        """``truth(t, i)``: text t is true of image i, from the drawn objects (None without them)."""
        if self.objects is None:
            return None
        from alignfuse.data.scenes import SceneObject, caption_matches

        objs = [[SceneObject(**o) for o in per] for per in self.objects]
        cache: dict[tuple[int, int], bool] = {}

        def truth(t: int, i: int) -> bool:
            hit = cache.get((t, i))
            if hit is None:
                hit = cache[(t, i)] = self.txt2img[t] == i or caption_matches(self.texts[t], objs[i])
            return hit

        return truth

    @property
    def n_images(self) -> int:
        return len(self.images)

    @property
    def n_texts(self) -> int:
        return len(self.texts)


_Entry = tuple[str, list[str], int | None, tuple[dict[str, Any], ...] | None]


def _entries_of(raw: Any, path: Path, split: str) -> list[_Entry]:
    """(image path, captions, group, objects) per entry of either JSON layout, merging repeated images."""
    rows: list[_Entry] = []
    if isinstance(raw, dict) and isinstance(raw.get("images"), list):  # Karpathy's original dataset_*.json
        for e in raw["images"]:
            if e.get("split") != split:
                continue
            img = "/".join(p for p in (e.get("filepath", ""), e.get("filename", "")) if p)
            caps = [s.get("raw", " ".join(s.get("tokens", []))) for s in e.get("sentences", [])]
            rows.append((img, caps, None, None))
    elif isinstance(raw, list):  # ALBEF/BLIP re-packaging: [{"image": ..., "caption": [...] | "..."}]
        for n, e in enumerate(raw):
            if not isinstance(e, dict) or not isinstance(e.get("image"), str):
                raise CorruptDataError(f"{path}: entry {n} has no 'image' string")
            cap = e.get("caption", [])
            caps = [cap] if isinstance(cap, str) else list(cap)
            if not all(isinstance(c, str) for c in caps):
                raise CorruptDataError(f"{path}: entry {n} has a non-string caption")
            g = e.get("group")
            objs = e.get("objects")
            drawn = tuple(objs) if isinstance(objs, list) and all(isinstance(o, dict) for o in objs) else None
            rows.append((e["image"], caps, int(g) if isinstance(g, int | float) else None, drawn))
    else:
        raise CorruptDataError(f"{path} is neither a Karpathy split list nor a Karpathy dataset_*.json")
    merged: dict[str, tuple[list[str], int | None, tuple[dict[str, Any], ...] | None]] = {}
    for img, caps, g, objs in rows:
        if img in merged:
            merged[img][0].extend(caps)
        else:
            merged[img] = (list(caps), g, objs)
    return [(img, caps, g, objs) for img, (caps, g, objs) in merged.items()]


def load_eval_data(
    karpathy_file: str | Path,
    image_root: str | Path | None = None,
    *,
    limit: int | None = None,
    split: str = "test",
) -> EvalData:
    """Read a Karpathy-style JSON (ALBEF's ``coco_test.json``/``flickr30k_test.json``, the scenes'
    ``scenes.json``, or Karpathy's original ``dataset_coco.json`` filtered to ``split``).

    ``image_root`` defaults to the JSON's folder. ``limit`` keeps the first N images (and their captions)."""
    path = Path(karpathy_file)
    if not path.is_file():
        raise NotFoundError(f"Karpathy file {path} does not exist")
    if limit is not None and limit < 1:
        raise InvalidInputError(f"limit must be >= 1, got {limit}")
    root = Path(image_root) if image_root is not None else path.parent
    if not root.is_dir():
        raise NotFoundError(f"image root {root} is not a directory")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptDataError(f"cannot read Karpathy file {path}: {exc}") from exc
    entries = _entries_of(raw, path, split)
    if limit is not None:
        entries = entries[:limit]
    if not entries:
        raise InvalidInputError(f"{path} holds no images (split {split!r})")
    texts: list[str] = []
    txt2img: list[int] = []
    img2txt: list[tuple[int, ...]] = []
    for i, (_img, caps, _g, _o) in enumerate(entries):
        ids = []
        for c in caps:
            ids.append(len(texts))
            texts.append(c)
            txt2img.append(i)
        img2txt.append(tuple(ids))
    has_group = any(e[2] is not None for e in entries)
    has_objects = all(e[3] is not None for e in entries)
    return EvalData(
        source=str(path),
        images=tuple(e[0] for e in entries),
        image_paths=tuple(root / e[0] for e in entries),
        texts=tuple(texts),
        txt2img=tuple(txt2img),
        img2txt=tuple(img2txt),
        groups=tuple(e[2] for e in entries) if has_group else None,
        objects=tuple(e[3] or () for e in entries) if has_objects else None,
    )


def _open_image(path: Path) -> Image.Image:
    if not path.is_file():
        raise NotFoundError(f"image {path} does not exist (check --image-root)")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise UnsupportedMediaError(f"cannot decode image {path}: {exc}") from exc


def _pixel_batches(
    paths: Sequence[Path], transform: Callable[[Image.Image], torch.Tensor], batch_size: int
) -> Iterator[torch.Tensor]:
    for a in range(0, len(paths), batch_size):
        yield torch.stack([transform(_open_image(p)) for p in paths[a : a + batch_size]])


# ------------------------------------------------------------------------------------------------- report


@dataclass(frozen=True)
class ModeResult:
    """One mode's recall, hard-negative group accuracy (if the JSON has groups) and cost."""

    mode: str
    recall: Recall
    encoder_passes: int
    pair_evals: int
    seconds: float
    group: GroupAccuracy | None = None
    pair_evals_protocol: int = 0

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {k: round(float(getattr(self.recall, k)), 4) for k in RECALL_KEYS}
        d["encoder_passes"] = int(self.encoder_passes)
        d["pair_evals"] = int(self.pair_evals)
        d["seconds"] = round(float(self.seconds), 4)
        if self.group is not None:
            d["group_acc_t2i"] = round(self.group.t2i, 6)
            d["group_acc_t2i_chance"] = round(self.group.t2i_chance, 6)
            d["group_acc_i2t"] = round(self.group.i2t, 6)
            d["group_acc_i2t_chance"] = round(self.group.i2t_chance, 6)
        return d


@dataclass(frozen=True)
class EvalMeta:
    """What was evaluated, with which models, and what was reused from the collection."""

    karpathy_file: str
    n_images: int
    n_texts: int
    k_test: int
    fusion: str
    dual_encoder: str
    cross_encoder: str | None
    collection: str | None
    embeddings: str  # "collection" | "encoded" | "mixed"
    encoded_now: int  # dual-encoder passes run by this evaluation (the rest came from the collection)
    image_states_from_cache: int  # cross-encoder image states rebuilt from the collection's feature cache
    groups: int  # groups with 2+ images (0: none)
    limit: int | None = None
    pair_evals_protocol: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class EvalReport:
    meta: EvalMeta
    results: tuple[ModeResult, ...]

    def result(self, mode: str) -> ModeResult:
        for r in self.results:
            if r.mode == mode:
                return r
        raise NotFoundError(f"mode {mode!r} was not evaluated")

    def to_json(self) -> dict[str, Any]:
        """``{"dual": {...}, "rerank": {...}, "all_pairs": {...}, "meta": {...}}`` (modes that were run)."""
        out: dict[str, Any] = {r.mode: r.to_json() for r in self.results}
        out["meta"] = self.meta.to_json()
        return out


# -------------------------------------------------------------------------------------- embeddings, states


@dataclass
class _DualEmbeddings:
    images: np.ndarray
    texts: np.ndarray
    encoded_now: int
    source: str
    seconds: float


def _sha256_file(path: Path) -> str | None:
    try:
        h = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()
    except OSError:
        return None


def _stored_embeddings(
    collection: Collection | None, data: EvalData, dual: DualEncoder
) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray], np.ndarray | None]:
    """Embeddings of eval images/texts found in the collection (matched by image uri or file sha256, and by
    caption text), plus the matched image item ids (for the feature cache) or None."""
    found_i: dict[int, np.ndarray] = {}
    found_t: dict[int, np.ndarray] = {}
    if collection is None:
        return found_i, found_t, None
    try:
        collection.check_encoder(dual.info)
    except EncoderMismatchError as exc:  # the stored vectors are another model's
        log.warning("not reusing the collection's embeddings: %s", exc.message)
        return found_i, found_t, None
    img_ids, img_vecs = collection.vectors("image")
    txt_ids, txt_vecs = collection.vectors("text")
    by_uri: dict[str, int] = {}
    by_sha: dict[str, int] = {}
    if len(img_ids):
        for n, item in enumerate(collection.get_many(img_ids)):
            by_uri.setdefault(str(item.uri), n)
            by_sha.setdefault(str(item.sha256), n)
    by_text: dict[str, int] = {}
    if len(txt_ids):
        for n, item in enumerate(collection.get_many(txt_ids)):
            if item.text is not None:
                by_text.setdefault(item.text, n)
    item_ids = np.full(data.n_images, -1, dtype=np.int64)
    for i, (rel, p) in enumerate(zip(data.images, data.image_paths, strict=True)):
        keys = [
            rel,
            str(p),
            str(p.resolve()) if p.exists() else str(p),
            p.resolve().as_uri() if p.exists() else "",
        ]
        row: int | None = next((by_uri[k] for k in keys if k in by_uri), None)
        if row is None and by_sha and p.is_file():
            sha = _sha256_file(p)
            row = by_sha.get(sha) if sha else None
        if row is not None:
            found_i[i] = np.asarray(img_vecs[row], dtype=np.float32)
            item_ids[i] = int(img_ids[row])
    for t, text in enumerate(data.texts):
        trow = by_text.get(text)
        if trow is not None:
            found_t[t] = np.asarray(txt_vecs[trow], dtype=np.float32)
    return found_i, found_t, (item_ids if (item_ids >= 0).all() else None)


def _dual_embeddings(
    dual: DualEncoder,
    data: EvalData,
    stored_i: dict[int, np.ndarray],
    stored_t: dict[int, np.ndarray],
    batch_size: int,
) -> _DualEmbeddings:
    t0 = time.perf_counter()
    dim = int(dual.embed_dim)
    images = np.zeros((data.n_images, dim), dtype=np.float32)
    texts = np.zeros((data.n_texts, dim), dtype=np.float32)
    for i, v in stored_i.items():
        images[i] = v
    for t, v in stored_t.items():
        texts[t] = v
    todo_i = [i for i in range(data.n_images) if i not in stored_i]
    todo_t = [t for t in range(data.n_texts) if t not in stored_t]
    with torch.inference_mode():
        paths = [data.image_paths[i] for i in todo_i]
        done = 0
        for pixels in _pixel_batches(paths, dual.image_transform, batch_size):
            emb = dual.encode_images(pixels.to(dual.device))
            images[todo_i[done : done + len(emb)]] = emb
            done += len(emb)
        for a in range(0, len(todo_t), batch_size):
            idx = todo_t[a : a + batch_size]
            texts[idx] = dual.encode_texts([data.texts[t] for t in idx])
    encoded = len(todo_i) + len(todo_t)
    reused = len(stored_i) + len(stored_t)
    source = "encoded" if reused == 0 else ("collection" if encoded == 0 else "mixed")
    log.info("dual embeddings: %d reused from the collection, %d encoded now", reused, encoded)
    return _DualEmbeddings(images, texts, encoded, source, time.perf_counter() - t0)


def _cat_text_states(parts: list[TextStates]) -> TextStates:
    """Concatenate per-batch text states, right-padding to the longest (mask 0, ids 0, hidden 0)."""
    if len(parts) == 1:
        return parts[0]
    width = max(int(p.ids.shape[1]) for p in parts)

    def pad(x: torch.Tensor) -> torch.Tensor:
        extra = width - int(x.shape[1])
        if extra == 0:
            return x
        shape = (x.shape[0], extra, *x.shape[2:])
        return torch.cat([x, x.new_zeros(shape)], dim=1)

    ids = torch.cat([pad(p.ids) for p in parts])
    mask = torch.cat([pad(p.mask) for p in parts])
    hidden = None
    if all(p.hidden is not None for p in parts):
        hidden = torch.cat([pad(p.hidden) for p in parts if p.hidden is not None])
    return TextStates(ids, mask, hidden)


class _PairScorer:
    """Scores (image, text) pairs with a cross-encoder: text states once per text, image states once per
    image (from pixels, or from the collection's feature cache), pairs grouped by image and broadcast
    (one image × up to ``batch_size`` texts per forward). Deterministic for a given pair list."""

    def __init__(
        self,
        cross: CrossEncoder,
        data: EvalData,
        batch_size: int,
        cached_tokens: Callable[[Sequence[int]], np.ndarray] | None,
    ) -> None:
        self.cross = cross
        self.data = data
        self.batch_size = batch_size
        self.cached_tokens = cached_tokens
        self._text_states: TextStates | None = None
        self._text_rows: dict[int, int] = {}
        self.text_passes = 0
        self.image_passes = 0
        self.images_from_cache = 0

    def _ensure_texts(self, needed: np.ndarray) -> TextStates:
        missing = [int(t) for t in needed if int(t) not in self._text_rows]
        if missing:
            parts = [] if self._text_states is None else [self._text_states]
            for a in range(0, len(missing), self.batch_size):
                idx = missing[a : a + self.batch_size]
                parts.append(self.cross.text_states([self.data.texts[t] for t in idx]))
            base = len(self._text_rows)
            for n, t in enumerate(missing):
                self._text_rows[t] = base + n
            self._text_states = _cat_text_states(parts)
            self.text_passes += len(missing)
        assert self._text_states is not None
        return self._text_states

    def _image_states(self, imgs: Sequence[int]) -> ImageStates:
        dev = self.cross.device
        if self.cached_tokens is not None:
            tokens = torch.from_numpy(np.ascontiguousarray(self.cached_tokens(imgs)))
            self.images_from_cache += len(imgs)
            return self.cross.image_states_from_tokens(tokens.to(dev))
        pixels = torch.stack(
            [self.cross.image_transform(_open_image(self.data.image_paths[i])) for i in imgs]
        )
        self.image_passes += len(imgs)
        return self.cross.image_states(pixels.to(dev))

    def score(self, img: np.ndarray, txt: np.ndarray) -> np.ndarray:
        """ITM "match" logits (float32 [P]) of pairs ``(img[p], txt[p])``, which must be sorted by image."""
        logits = np.empty(len(img), dtype=np.float32)
        if len(img) == 0:
            return logits
        states = self._ensure_texts(np.unique(txt))
        rows = np.asarray([self._text_rows[int(t)] for t in txt], dtype=np.int64)
        uniq, starts = np.unique(img, return_index=True)
        ends = np.append(starts[1:], len(img))
        with torch.inference_mode():
            for a in range(0, len(uniq), self.batch_size):
                chunk = [int(i) for i in uniq[a : a + self.batch_size]]
                istates = self._image_states(chunk)
                for j in range(len(chunk)):
                    lo, hi = int(starts[a + j]), int(ends[a + j])
                    one = istates.select([j])
                    for b in range(lo, hi, self.batch_size):
                        e = min(b + self.batch_size, hi)
                        out = self.cross.score(states.select(torch.from_numpy(rows[b:e])), one)
                        logits[b:e] = np.asarray(out.logit, dtype=np.float32).reshape(-1)
        return logits


# ------------------------------------------------------------------------------------------------- modes


def _finish(
    mode: str,
    data: EvalData,
    s_i2t: np.ndarray,
    s_t2i: np.ndarray | None,
    passes: int,
    pairs: int,
    seconds: float,
    protocol: int = 0,
) -> ModeResult:
    rec = recall_metrics(s_i2t, data.img2txt, data.txt2img, s_t2i)
    grp = None
    if data.groups is not None:
        grp = group_accuracy(s_i2t, data.img2txt, data.txt2img, data.groups, s_t2i, truth=data.truth())
    return ModeResult(mode, rec, passes, pairs, seconds, grp, protocol)


def _check_args(modes: Sequence[str], k_test: int, batch_size: int, fusion: str) -> tuple[str, ...]:
    if not modes:
        raise InvalidInputError("modes is empty; choose from dual, rerank, all_pairs")
    for m in modes:
        if m not in MODES:
            raise InvalidInputError(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
    if k_test < 1:
        raise InvalidInputError(f"k_test must be >= 1, got {k_test}")
    if batch_size < 1:
        raise InvalidInputError(f"batch_size must be >= 1, got {batch_size}")
    if fusion not in FUSIONS:
        raise InvalidInputError(f"fusion must be one of {', '.join(FUSIONS)}, got {fusion!r}")
    return tuple(dict.fromkeys(modes))


def _open(collection: Collection | str | Path | None) -> Collection | None:
    if collection is None or not isinstance(collection, str | Path):
        return collection
    from alignfuse.index.collection import Collection

    return Collection.open(collection)


def evaluate(
    collection: Collection | str | Path | None,
    karpathy_file: str | Path,
    image_root: str | Path | None,
    dual_encoder: DualEncoder,
    cross_encoder: CrossEncoder | None,
    modes: Sequence[str] = ("dual", "rerank"),
    k_test: int = 256,
    batch_size: int = 64,
    *,
    fusion: str = "itm",
    limit: int | None = None,
    max_all_pairs: int = DEFAULT_MAX_ALL_PAIRS,
    use_feature_cache: bool = True,
) -> EvalReport:
    """Evaluate retrieval on a Karpathy-style split with ALBEF's protocol (see the module docstring).

    ``collection``: a :class:`~alignfuse.index.collection.Collection`, its path, or None. When the collection holds the
    split's images (matched by uri or file sha256) and captions (by text) embedded with ``dual_encoder``, the
    stored embeddings are used instead of re-encoding; its rerank feature cache is used for the cross-encoder's
    image states when it was computed by ``cross_encoder`` and covers every image."""
    modes_t = _check_args(modes, k_test, batch_size, fusion)
    needs_cross = [m for m in modes_t if m != "dual"]
    if needs_cross and cross_encoder is None:
        raise InvalidInputError(f"mode {needs_cross[0]!r} needs a cross-encoder (reranker); none was given")
    data = load_eval_data(karpathy_file, image_root, limit=limit)
    n_i, n_t = data.n_images, data.n_texts
    if "all_pairs" in modes_t and n_i * n_t > max_all_pairs:
        raise InvalidInputError(
            f"all_pairs mode would score {n_i} x {n_t} = {n_i * n_t:,} pairs, over the cap of {max_all_pairs:,}; "
            "use --limit to evaluate fewer images, or the rerank mode"
        )
    coll = _open(collection)
    try:
        return _run_modes(
            coll,
            data,
            dual_encoder,
            cross_encoder,
            modes_t,
            k_test,
            batch_size,
            fusion,
            limit,
            use_feature_cache,
        )
    finally:
        if coll is not None and coll is not collection:
            coll.close()


def _run_modes(
    coll: Collection | None,
    data: EvalData,
    dual_encoder: DualEncoder,
    cross_encoder: CrossEncoder | None,
    modes_t: tuple[str, ...],
    k_test: int,
    batch_size: int,
    fusion: str,
    limit: int | None,
    use_feature_cache: bool,
) -> EvalReport:
    n_i, n_t = data.n_images, data.n_texts
    needs_cross = [m for m in modes_t if m != "dual"]
    stored_i, stored_t, item_ids = _stored_embeddings(coll, data, dual_encoder)
    _warm_up(data, dual_encoder, cross_encoder if needs_cross else None)

    dual_emb: _DualEmbeddings | None = None
    if fusion == "itm+itc_logit" and dual_encoder.info.itc_logit_scale is None:
        raise InvalidInputError(
            f"--fusion itm+itc_logit needs a dual encoder with a learned logit scale; {dual_encoder.info.spec} "
            "has none (use itm or itm+itc)"
        )
    if any(m in ("dual", "rerank") for m in modes_t) or fusion != "itm":
        dual_emb = _dual_embeddings(dual_encoder, data, stored_i, stored_t, batch_size)
    sims: np.ndarray | None = None
    if dual_emb is not None:
        t0 = time.perf_counter()
        sims = dual_emb.images @ dual_emb.texts.T
        dual_emb.seconds += time.perf_counter() - t0

    cached_tokens: Callable[[Sequence[int]], np.ndarray] | None = None
    if cross_encoder is not None and coll is not None and use_feature_cache and item_ids is not None:
        cache = coll.features
        if (
            cache is not None
            and cache.reranker.matches(cross_encoder.info)
            and bool(cache.has(item_ids).all())
        ):
            ids_ = item_ids
            cached_tokens = lambda imgs: cache.get(ids_[np.asarray(imgs, dtype=np.int64)])  # noqa: E731
            log.info("cross-encoder image states come from the collection's feature cache")

    results: list[ModeResult] = []
    protocol: dict[str, int] = {}
    images_from_cache = 0
    for mode in modes_t:
        if mode == "dual":
            assert sims is not None and dual_emb is not None
            t0 = time.perf_counter()
            res = _finish("dual", data, sims, None, n_i + n_t, 0, 0.0)
            results.append(_with_seconds(res, dual_emb.seconds + time.perf_counter() - t0))
            continue
        assert cross_encoder is not None
        scorer = _PairScorer(cross_encoder, data, batch_size, cached_tokens)
        t0 = time.perf_counter()
        dual_s = 0.0 if dual_emb is None else dual_emb.seconds
        if mode == "rerank":
            assert sims is not None
            i2t_c = topk_indices(sims, k_test)  # [N_i, min(k, N_t)]
            t2i_c = topk_indices(sims.T, k_test)  # [N_t, min(k, N_i)]
            keys = np.unique(
                np.concatenate(
                    [
                        (np.arange(n_i, dtype=np.int64)[:, None] * n_t + i2t_c).reshape(-1),
                        (t2i_c * n_t + np.arange(n_t, dtype=np.int64)[:, None]).reshape(-1),
                    ]
                )
            )
            protocol[mode] = int(i2t_c.size + t2i_c.size)
        else:
            keys = np.arange(n_i * n_t, dtype=np.int64)
            protocol[mode] = n_i * n_t
        img, txt = keys // n_t, keys % n_t
        logits = scorer.score(img, txt)  # float32, as ALBEF's score matrices
        if fusion != "itm":
            assert sims is not None
            logits = fuse_scores(logits, sims[img, txt], fusion, dual_encoder.info.itc_logit_scale)
        full = np.full((n_i, n_t), NON_CANDIDATE, dtype=np.float32)
        if mode == "rerank":
            s_i2t = full
            rows_i = np.repeat(np.arange(n_i, dtype=np.int64), i2t_c.shape[1])
            s_i2t[rows_i, i2t_c.reshape(-1)] = logits[np.searchsorted(keys, rows_i * n_t + i2t_c.reshape(-1))]
            s_t2i = np.full((n_t, n_i), NON_CANDIDATE, dtype=np.float32)
            rows_t = np.repeat(np.arange(n_t, dtype=np.int64), t2i_c.shape[1])
            cols_i = t2i_c.reshape(-1)
            s_t2i[rows_t, cols_i] = logits[np.searchsorted(keys, cols_i * n_t + rows_t)]
            passes = n_i + n_t + scorer.text_passes + scorer.image_passes + scorer.images_from_cache
            res = _finish(mode, data, s_i2t, s_t2i, passes, len(keys), 0.0, protocol[mode])
        else:
            full[img, txt] = logits
            passes = scorer.text_passes + scorer.image_passes + scorer.images_from_cache
            passes += (n_i + n_t) if fusion != "itm" else 0
            res = _finish(mode, data, full, None, passes, len(keys), 0.0, protocol[mode])
        needs_dual = mode == "rerank" or fusion != "itm"
        results.append(_with_seconds(res, time.perf_counter() - t0 + (dual_s if needs_dual else 0.0)))
        images_from_cache = max(images_from_cache, scorer.images_from_cache)

    groups = 0
    for r in results:
        if r.group is not None:
            groups = r.group.groups
    meta = EvalMeta(
        karpathy_file=data.source,
        n_images=n_i,
        n_texts=n_t,
        k_test=k_test,
        fusion=fusion,
        dual_encoder=dual_encoder.info.id,
        cross_encoder=None if cross_encoder is None else cross_encoder.info.id,
        collection=None if coll is None else str(coll.path),
        embeddings="none" if dual_emb is None else dual_emb.source,
        encoded_now=0 if dual_emb is None else dual_emb.encoded_now,
        image_states_from_cache=images_from_cache,
        groups=groups,
        limit=limit,
        pair_evals_protocol=protocol,
    )
    return EvalReport(meta, tuple(results))


def _warm_up(data: EvalData, dual: DualEncoder, cross: CrossEncoder | None) -> None:
    """One untimed, uncounted forward of each model on the first image and caption (first-call costs:
    kernel selection, lazy initialisation), so that ``seconds`` measures the evaluation itself."""
    image = _open_image(data.image_paths[0])
    text = data.texts[0] if data.texts else "a photo"
    with torch.inference_mode():
        dual.encode_texts([text])
        dual.encode_images(dual.image_transform(image)[None].to(dual.device))
        if cross is not None:
            states = cross.image_states(cross.image_transform(image)[None].to(cross.device))
            cross.score(cross.text_states([text]), states)


def _with_seconds(res: ModeResult, seconds: float) -> ModeResult:
    return replace(res, seconds=seconds)
