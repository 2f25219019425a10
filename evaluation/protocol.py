"""Retrieval evaluation with ALBEF's protocol: the three scoring modes, :func:`evaluate` and its report.

The metrics are :mod:`.metrics` (recall, the tie rule, group accuracy), the data :mod:`.data`, the embeddings
and the pair scorer :mod:`.scoring`.

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

Group accuracy (``group_acc_*``) is reported when the split has groups; ``truth`` (a :data:`~.data.TruthFn`,
e.g. the scenes' ``caption_matches``) makes it judge picks by truth when every image lists its drawn objects,
and adds truth-aware recall (``*_true`` keys, :data:`TRUTH_RECALL_KEYS`: a retrieved image counts when it makes
the caption true, a retrieved caption when it is true of the image) next to ALBEF's numbers, which stay as
they are.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from alignfuse.errors import InvalidInputError, NotFoundError
from alignfuse.models.base import FUSIONS, CrossEncoder, DualEncoder, fuse_scores

from .data import EvalData, TruthFn, load_eval_data, open_image
from .metrics import (
    RECALL_KEYS,
    TRUTH_RECALL_KEYS,
    GroupAccuracy,
    PairTruth,
    Recall,
    group_accuracy,
    recall_metrics,
    topk_indices,
    truth_recall_metrics,
)
from .scoring import DualEmbeddings, PairScorer, cached_token_reader, dual_embeddings, stored_embeddings

if TYPE_CHECKING:
    from alignfuse.index.collection import Collection

Mode = Literal["dual", "rerank", "all_pairs"]
MODES: tuple[str, ...] = ("dual", "rerank", "all_pairs")
NON_CANDIDATE = -100.0
DEFAULT_MAX_ALL_PAIRS = 2_000_000
MODE_KEYS: tuple[str, ...] = (*RECALL_KEYS, "encoder_passes", "pair_evals", "seconds")
GROUP_KEYS: tuple[str, ...] = (
    "group_acc_t2i",
    "group_acc_t2i_chance",
    "group_acc_i2t",
    "group_acc_i2t_chance",
)

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
    #: truth-aware recall (a retrieved item counts when the caption is true of the image), with a truth function
    truth_recall: Recall | None = None

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {k: round(float(getattr(self.recall, k)), 4) for k in RECALL_KEYS}
        if self.truth_recall is not None:
            for key, name in zip(TRUTH_RECALL_KEYS, RECALL_KEYS, strict=True):
                d[key] = round(float(getattr(self.truth_recall, name)), 4)
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
    #: what ran each model: "<runtime> <precision>", e.g. "torch fp32", "onnx int8"
    dual_runtime: str = "torch fp32"
    cross_runtime: str | None = None

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


# ------------------------------------------------------------------------------------------------- modes


def _finish(
    mode: str,
    data: EvalData,
    truth: PairTruth | None,
    s_i2t: np.ndarray,
    s_t2i: np.ndarray | None,
    *,
    passes: int,
    pairs: int,
    started: float,
    earlier_seconds: float = 0.0,
    protocol: int = 0,
) -> ModeResult:
    """The mode's metrics; ``seconds`` = the time since ``started`` (this metric work included) plus
    ``earlier_seconds`` (the shared dual-encoder work the mode needs)."""
    rec = recall_metrics(s_i2t, data.img2txt, data.txt2img, s_t2i)
    grp = None
    if data.groups is not None:
        grp = group_accuracy(s_i2t, data.img2txt, data.txt2img, data.groups, s_t2i, truth=truth)
    seconds = time.perf_counter() - started + earlier_seconds
    # after the clock: truth-aware recall is a reporting extra, not part of the mode's cost
    true_rec = None if truth is None else truth_recall_metrics(s_i2t, truth, s_t2i)
    return ModeResult(mode, rec, passes, pairs, seconds, grp, protocol, true_rec)


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
    truth: TruthFn | None = None,
) -> EvalReport:
    """Evaluate retrieval on a Karpathy-style split with ALBEF's protocol (see the module docstring).

    ``collection``: a :class:`~alignfuse.index.collection.Collection`, its path, or None. When the collection holds the
    split's images (matched by uri or file sha256) and captions (by text) embedded with ``dual_encoder``, the
    stored embeddings are used instead of re-encoding; its rerank feature cache is used for the cross-encoder's
    image states when it was computed by ``cross_encoder`` and covers every image.

    ``truth``: judges a caption against an image's drawn objects (for the built-in scenes pass
    :func:`alignfuse.data.scenes.caption_matches`). When it is given and every image of the split lists its
    ``objects``, group accuracy counts a pick as right when the caption is true of the picked image; otherwise
    a caption is true of its annotated image only."""
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
            modes_t=modes_t,
            k_test=k_test,
            batch_size=batch_size,
            fusion=fusion,
            limit=limit,
            use_feature_cache=use_feature_cache,
            truth=data.pair_truth(truth),
        )
    finally:
        if coll is not None and coll is not collection:
            coll.close()


def _run_modes(
    coll: Collection | None,
    data: EvalData,
    dual_encoder: DualEncoder,
    cross_encoder: CrossEncoder | None,
    *,
    modes_t: tuple[str, ...],
    k_test: int,
    batch_size: int,
    fusion: str,
    limit: int | None,
    use_feature_cache: bool,
    truth: PairTruth | None,
) -> EvalReport:
    n_i, n_t = data.n_images, data.n_texts
    needs_cross = [m for m in modes_t if m != "dual"]
    stored_i, stored_t, item_ids = stored_embeddings(coll, data, dual_encoder)
    _warm_up(data, dual_encoder, cross_encoder if needs_cross else None)

    dual_emb: DualEmbeddings | None = None
    if fusion == "itm+itc_logit" and dual_encoder.info.itc_logit_scale is None:
        raise InvalidInputError(
            f"--fusion itm+itc_logit needs a dual encoder with a learned logit scale; {dual_encoder.info.spec} "
            "has none (use itm or itm+itc)"
        )
    if any(m in ("dual", "rerank") for m in modes_t) or fusion != "itm":
        dual_emb = dual_embeddings(dual_encoder, data, stored_i, stored_t, batch_size)
    sims: np.ndarray | None = None
    if dual_emb is not None:
        t0 = time.perf_counter()
        sims = dual_emb.images @ dual_emb.texts.T
        dual_emb.seconds += time.perf_counter() - t0

    cached_tokens = None
    if cross_encoder is not None and use_feature_cache:
        cached_tokens = cached_token_reader(coll, cross_encoder, item_ids)

    results: list[ModeResult] = []
    protocol: dict[str, int] = {}
    images_from_cache = 0
    for mode in modes_t:
        if mode == "dual":
            assert sims is not None and dual_emb is not None
            results.append(
                _finish(
                    "dual",
                    data,
                    truth,
                    sims,
                    None,
                    passes=n_i + n_t,
                    pairs=0,
                    started=time.perf_counter(),
                    earlier_seconds=dual_emb.seconds,
                )
            )
            continue
        assert cross_encoder is not None
        scorer = PairScorer(cross_encoder, data, batch_size, cached_tokens)
        t0 = time.perf_counter()
        needs_dual = mode == "rerank" or fusion != "itm"
        dual_s = dual_emb.seconds if dual_emb is not None and needs_dual else 0.0
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
            s_i2t_out, s_t2i_out = s_i2t, s_t2i
        else:
            full[img, txt] = logits
            passes = scorer.text_passes + scorer.image_passes + scorer.images_from_cache
            passes += (n_i + n_t) if fusion != "itm" else 0
            s_i2t_out, s_t2i_out = full, None
        results.append(
            _finish(
                mode,
                data,
                truth,
                s_i2t_out,
                s_t2i_out,
                passes=passes,
                pairs=len(keys),
                started=t0,
                earlier_seconds=dual_s,
                protocol=protocol[mode],
            )
        )
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
        dual_runtime=_runtime_of(dual_encoder),
        cross_runtime=None if cross_encoder is None else _runtime_of(cross_encoder),
    )
    return EvalReport(meta, tuple(results))


def _runtime_of(model: object) -> str:
    """``"<runtime> <precision>"`` of a model built by the registry (torch fp32 for others)."""
    precision = getattr(model, "precision", None) or getattr(
        getattr(model, "bundle", None), "precision", None
    )
    return f"{getattr(model, 'runtime', 'torch')} {precision or 'fp32'}"


def _warm_up(data: EvalData, dual: DualEncoder, cross: CrossEncoder | None) -> None:
    """One untimed, uncounted forward of each model on the first image and caption (first-call costs:
    kernel selection, lazy initialisation), so that ``seconds`` measures the evaluation itself."""
    image = open_image(data.image_paths[0])
    text = data.texts[0] if data.texts else "a photo"
    with torch.inference_mode():
        dual.encode_texts([text])
        dual.encode_images(dual.image_transform(image)[None].to(dual.device))
        if cross is not None:
            states = cross.image_states(cross.image_transform(image)[None].to(cross.device))
            cross.score(cross.text_states([text]), states)
