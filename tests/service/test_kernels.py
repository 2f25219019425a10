"""The dual-encoder batch kernel: a request whose text the model rejects fails alone, never the requests
batched with it (found by the API fuzzer: ALBEF's caption cleaning empties a punctuation-only query)."""

from __future__ import annotations

import numpy as np

from alignfuse.errors import InvalidInputError
from alignfuse.models.registry import create_dual_encoder
from alignfuse.service.engine.kernels import DualKernels


def test_a_bad_text_fails_its_own_request_only() -> None:
    model = create_dual_encoder("albef:tiny")
    kernels = DualKernels(model)
    good = kernels.texts([["a red circle"], ["two blue squares", "a star"]])
    mixed = kernels.texts([["a red circle"], ["?!..."], ["two blue squares", "a star"]])
    assert isinstance(mixed[1], InvalidInputError)
    for want, got in zip(good, [mixed[0], mixed[2]], strict=True):
        assert isinstance(got, np.ndarray) and got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-5)
