"""Manual-axis types inside shard_map, for hand-written VJPs and scan carries (jax's varying manual axes).

Autodiff keeps these types right by itself; a custom VJP or a scan carry built from constants must
be told: a carry must vary like the values folded into it, and a gradient must vary like its primal.
"""

from __future__ import annotations

import jax


def varying(x) -> frozenset:
    """The manual mesh axes (inside shard_map) over which x differs from device to device."""
    return jax.typeof(x).manual_axis_type.varying


def varying_like(value, *references):
    """value, varying over the manual mesh axes the references vary over: inside shard_map a scan's
    carry must keep one type (chunked logits vary like the hidden states, and like the head if it does)."""
    axes = set().union(*map(varying, references)) - varying(value)
    return jax.lax.pcast(value, tuple(sorted(axes)), to="varying") if axes else value


def summed_like(gradient, primal):
    """A gradient varying over axes its primal does not is summed over them, as autodiff's transpose
    of the implicit broadcast would (a device-invariant head gets the sum of every device's part)."""
    axes = varying(gradient) - varying(primal)
    return jax.lax.psum(gradient, tuple(sorted(axes))) if axes else gradient
