"""The search engine: models, collections, device workers, micro-batching, limits. No HTTP in here.

::

    query ─▶ encode (dual worker, micro-batched) ─▶ FAISS top-C ─▶ image states (feature cache, memory
          LRU, or the stored file) ─▶ ITM over C pairs (cross worker, micro-batched) ─▶ sort ─▶ top-k

Use :meth:`SearchEngine.load` (or ``await start()``) once, then ``await search(...)`` from any number of
concurrent tasks (or :meth:`~SearchEngine.search_sync` from plain code), and :meth:`~SearchEngine.close`
at the end.

Where each concern lives:

=================  ==============================================================================
``lifecycle``      shared state; loading models, device workers, warm-up, close; admission
``handles``        collection names and item ids a request may use; the open-collection handle
``collections``    open collections: refresh to new versions, listing, items, thumbnails
``plan``           the search plan (validation, defaults) and the final ranking
``search``         the search stages and their thread hops
``rerank_inputs``  what the cross-encoder reads per candidate (feature cache, token LRU, files)
``ingest``         add images / texts, delete, commit
``kernels``        the batch kernels the device workers run
``caches``         the bounded in-memory LRUs (tokens, thumbnails)
=================  ==============================================================================
"""

from __future__ import annotations

from .explain import ExplainMixin
from .handles import check_collection_name, check_item_id
from .ingest import UPLOADS_DIR, IngestMixin
from .plan import SearchPlan
from .search import SearchMixin

__all__ = ["UPLOADS_DIR", "SearchEngine", "SearchPlan", "check_collection_name", "check_item_id"]


class SearchEngine(SearchMixin, IngestMixin, ExplainMixin):
    """Owns the models, the open collections, one device worker per model and the concurrency limit.

    ``SearchEngine(settings, metrics=..., dual_encoder=..., cross_encoder=...)``: models given here are used
    as they are (tests, notebooks); otherwise :meth:`load` creates them from the settings or the
    collections' manifests.
    """
