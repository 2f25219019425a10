"""Datasets: the built-in synthetic scenes world and the readers of public dataset formats (Karpathy splits).

Imports nothing of alignfuse but :mod:`alignfuse.errors`; knows nothing of models, indexes or HTTP."""
