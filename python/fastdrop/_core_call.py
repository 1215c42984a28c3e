"""The one door from Python into the Rust core: `apply(x, out, residual, spec, generator,
store_mask)` runs a `_spec.Spec` and returns an `Applied` (``bits``, ``first_block``,
``scale``). Every masked call of every path (NumPy, torch CPU, the compiled ops, a Mask's own
redraw) goes through it; nothing else in Python names the core's entry points for a call.

The binding reads the spec by its ``kind`` and field names (`src/bindings.rs`) into the Rust
`Spec` (`src/spec.rs`), and `src/call.rs` does the call.
"""

from __future__ import annotations

from ._core import Applied, apply

__all__ = ["Applied", "apply"]
