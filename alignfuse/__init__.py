"""alignfuse: two-stage image-text retrieval (dual encoder + FAISS, then an ITM cross-encoder rerank).

The installed import names all live under this one package, so nothing collides with another project's
top-level ``models`` or ``service``.  In the source tree the subpackages are the top-level folders
(``models/``, ``index/``, ``service/``, ``data/``, ``evaluation/``, ``training/``), reached through the
symbolic links beside this file; a wheel holds real copies under ``alignfuse/``.

Layers (checked by import-linter, see ``.importlinter``)::

    service      HTTP API, CLI, settings, the search engine
    training     ALBEF / CLIP training (objectives, data, loop)
    evaluation   the retrieval protocol: metrics, scoring, modes
    index        collections on disk: FAISS segments + item store + feature cache; sources; builder
    data | models   the synthetic scenes world and dataset readers | encoders and rerankers (torch only)
    errors       the one error taxonomy
"""

__version__ = "0.1.0"
