"""Outer products written as `matmul` become broadcast multiplies while capturing.

transformers' rotary embeddings (5.17 to 5.22) compute `inv_freq[b, d, 1] @ position_ids[b, 1, s]`.
`matmul` folds its batch dimensions in C++, whose size checks add `batch != 1` guards that export
rejects for a batch dimension starting at 1. With an inner dimension of 1 a matmul is an outer
product: one multiply per output element, no sum, so `a * b` gives the same bits without a guard.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

_MATMULS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__}


class _OuterProductMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _MATMULS and not kwargs and len(args) == 2:
            a, b = args
            if (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dim() >= 2 and b.dim() >= 2
                    and isinstance(a.shape[-1], int) and a.shape[-1] == 1 and isinstance(b.shape[-2], int)
                    and b.shape[-2] == 1):
                return a * b
        return func(*args, **kwargs)


@contextlib.contextmanager
def outer_products_as_multiply():
    with _OuterProductMode():
        yield
