"""The retrieval evaluation protocol (ALBEF's: TR/IR R@K, dual / rerank / all-pairs modes, group accuracy).

Modules: :mod:`.metrics` (ranks, recall, top-k, group accuracy; numpy only), :mod:`.data` (the split, read by
:func:`alignfuse.data.karpathy.read_karpathy`, and the truth function type), :mod:`.scoring` (dual embeddings,
stored embeddings, the pair scorer), :mod:`.protocol` (the modes, :func:`evaluate`, the report), :mod:`.grounding` (the pointing game of
grounding heatmaps).

May import ``index`` (stored embeddings), ``data`` (dataset readers) and ``models``; never ``service``. It knows
no dataset's semantics: the caller passes a truth function (the scenes' ``caption_matches``) when it has one.
"""

from alignfuse.evaluation.data import EvalData, TruthFn, load_eval_data
from alignfuse.evaluation.grounding import PointingCase, PointingResult, pointing_cases, pointing_game
from alignfuse.evaluation.metrics import (
    RECALL_KEYS,
    TRUTH_DEPTH,
    TRUTH_RECALL_KEYS,
    GroupAccuracy,
    PairTruth,
    Recall,
    group_accuracy,
    ranking,
    ranks_i2t,
    ranks_of,
    ranks_t2i,
    recall_metrics,
    topk_indices,
    truth_ranks,
    truth_recall_metrics,
)
from alignfuse.evaluation.protocol import (
    DEFAULT_MAX_ALL_PAIRS,
    GROUP_KEYS,
    MODE_KEYS,
    MODES,
    NON_CANDIDATE,
    EvalMeta,
    EvalReport,
    Mode,
    ModeResult,
    evaluate,
)

__all__ = [
    "DEFAULT_MAX_ALL_PAIRS",
    "GROUP_KEYS",
    "MODES",
    "MODE_KEYS",
    "NON_CANDIDATE",
    "RECALL_KEYS",
    "TRUTH_DEPTH",
    "TRUTH_RECALL_KEYS",
    "EvalData",
    "EvalMeta",
    "EvalReport",
    "GroupAccuracy",
    "Mode",
    "ModeResult",
    "PairTruth",
    "PointingCase",
    "PointingResult",
    "Recall",
    "TruthFn",
    "evaluate",
    "group_accuracy",
    "load_eval_data",
    "pointing_cases",
    "pointing_game",
    "ranking",
    "ranks_i2t",
    "ranks_of",
    "ranks_t2i",
    "recall_metrics",
    "topk_indices",
    "truth_ranks",
    "truth_recall_metrics",
]
