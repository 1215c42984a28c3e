"""Which path an input takes: NumPy, torch on the CPU, or torch's own ops elsewhere."""

from __future__ import annotations

import sys
from typing import Any


def is_torch_tensor(x: Any) -> bool:
    """True for a torch.Tensor, without importing torch when the caller never did."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)
