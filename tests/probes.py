"""Optimizer probes shared by the in-process tests and tests/scripts (which put tests/ on sys.path)."""

import jax
import jax.numpy as jnp
import optax

# A tx whose state becomes the gradient it is given and whose update is zero: the exact applied gradient.
CAPTURE_GRADIENT = optax.GradientTransformation(
    init=lambda params: jax.tree.map(jnp.zeros_like, params),
    update=lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))
