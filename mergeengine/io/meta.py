"""What a plan knows of a tensor before reading it (torch-free: validation and planning import it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class TensorMeta:
    """Shape and dtype of a tensor, known before any data is read."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor in memory."""
        return self.numel * self.dtype.itemsize
