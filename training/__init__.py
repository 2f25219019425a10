"""Training: ALBEF's objectives (ITC with momentum distillation, ITM with hard negatives, MLM) and CLIP's, the
in-memory pair data, the loop, checkpoints and diagnostics. May import ``evaluation``, ``data``, ``models``."""
