"""The retrieval evaluation protocol (ALBEF's: TR/IR R@K, dual / rerank / all-pairs modes, group accuracy).

May import ``index`` (stored embeddings), ``data`` (dataset readers) and ``models``; never ``service``.
"""

from alignfuse.evaluation.protocol import GroupAccuracy, group_accuracy

__all__ = ["GroupAccuracy", "group_accuracy"]
