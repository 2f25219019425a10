"""Helpers of bench/peers.py (alignfuse against clip-retrieval and infinity)."""
