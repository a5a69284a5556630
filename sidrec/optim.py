"""Optimizers and learning-rate schedules: AdamW (upstream's), Muon through optax, and our own Muon.

Everything here is a pure function of the config and the parameter tree's *paths and shapes*, so the
same transformation runs on one CPU device or on FSDP-sharded arrays inside a jitted, donated step.

Which parameter gets which optimizer is decided in one place, `group_of`, from the role each parameter
declares in `qwen2.param_specs`: the per-layer weight matrices of attention and MLP go to Muon;
embeddings, LM head, norms and biases go to AdamW (at `aux_lr` when the run uses Muon). Stacked
`[L, in, out]` leaves are orthogonalised per layer.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sidrec.config import ConfigError, OptimConfig
from sidrec.model import qwen2

MUON, ADAMW = "muon", "adamw"

NS_COEFFS = (3.4445, -4.7750, 2.0315)
"""Keller Jordan's quintic Newton-Schulz coefficients (maximise the slope at zero)."""
NS_NORM_EPS = 1e-7
"""Added to the Frobenius norm before Newton-Schulz, as in Keller Jordan's Muon."""


# ----------------------------------------------------------------------------------------------
# Schedules


def warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
    """Warmup length: ceil(warmup_ratio x total) when a ratio is set (HF's warmup_ratio), else warmup_steps."""
    return math.ceil(cfg.warmup_ratio * total_steps) if cfg.warmup_ratio > 0 else cfg.warmup_steps


def lr_schedule(cfg: OptimConfig, total_steps: int, peak_lr: float | None = None) -> optax.Schedule:
    """Learning rate at optimizer step `step` (0-based), as Hugging Face's schedulers give it.

    Linear warmup from 0 over `cfg.warmup_steps` (so step 0 trains with lr 0, as upstream), then
    `linear` decay to 0 at `total_steps` (get_linear_schedule_with_warmup, upstream's), half a
    `cosine` to 0 (get_cosine_schedule_with_warmup) or `constant`. `peak_lr` defaults to `cfg.lr`.
    """
    if total_steps < 1:
        raise ConfigError(
            f"the run has {total_steps} optimizer steps; raise --train.epochs or --train.max-steps")
    peak = cfg.lr if peak_lr is None else peak_lr
    warmup = warmup_steps(cfg, total_steps)
    decay_steps = max(1, total_steps - warmup)

    def after_warmup(step):
        if cfg.schedule == "linear":
            return jnp.maximum(0.0, (total_steps - step) / decay_steps)
        if cfg.schedule == "cosine":
            progress = (step - warmup) / decay_steps
            return jnp.maximum(0.0, 0.5 * (1.0 + jnp.cos(jnp.pi * progress)))
        return jnp.ones_like(step)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        factor = jnp.where(step < warmup, step / max(1, warmup), after_warmup(step))
        return peak * factor

    return schedule


# ----------------------------------------------------------------------------------------------
# Which parameter goes where: read from each parameter's declared role (qwen2.param_specs)

NO_DECAY_ROLES = frozenset({qwen2.NORM, qwen2.BIAS})
"""Not weight-decayed, as Hugging Face Trainer decides (norm weights and biases)."""


def group_of(role: str, name: str) -> str:
    """The single routing rule: Muon takes the layer matrices (stacked [L, in, out], orthogonalised per
    layer); AdamW the embedding, the head, norms and biases (at `aux_lr` when the run uses Muon)."""
    return MUON if name == MUON and role == qwen2.MATRIX else ADAMW


def _by_path(table: Mapping[str, Any]) -> Callable[[Any], Any]:
    """params -> the tree of table[path] (works on arrays, abstract shapes and optax's masked trees)."""
    return lambda params: jax.tree_util.tree_map_with_path(lambda path, _: table[qwen2.path_name(path)], params)


# ----------------------------------------------------------------------------------------------
# Muon: our own chain


def newton_schulz(matrix: jax.Array, steps: int, dtype=jnp.float32) -> jax.Array:
    """Approximately orthogonalise one 2-D matrix (U S V^T -> ~U V^T) with the quintic iteration.

    Runs on the wide orientation (rows <= cols) so the Gram matrix is the small one.
    """
    x = matrix.astype(dtype)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / (jnp.linalg.norm(x) + NS_NORM_EPS)
    a, b, c = NS_COEFFS
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    if tall:
        x = x.T
    return x.astype(matrix.dtype)


def orthogonalize_per_matrix(update: jax.Array, steps: int, dtype=jnp.float32) -> jax.Array:
    """Newton-Schulz on the last two axes ([in, out]), independently for every leading index."""
    fn = functools.partial(newton_schulz, steps=steps, dtype=dtype)
    for _ in range(update.ndim - 2):
        fn = jax.vmap(fn)
    return fn(update)


def update_scale(shape: tuple[int, ...], muon_scale: str) -> float:
    """Static factor on the orthogonalised update; storage is [in, out], so fan_in = shape[-2]."""
    fan_in, fan_out = shape[-2], shape[-1]
    if muon_scale == "shape":
        return math.sqrt(max(1.0, fan_out / fan_in))
    if muon_scale == "rms":
        return 0.2 * math.sqrt(max(fan_in, fan_out))
    return 1.0


class LocalMuonState(NamedTuple):
    momentum: optax.Updates


def scale_by_local_muon(momentum: float, ns_steps: int, muon_scale: str,
                        ns_dtype=jnp.float32) -> optax.GradientTransformation:
    """Muon's direction for every leaf it is given (all must be matrices, possibly stacked).

    buf = momentum * buf + g; u = g + momentum * buf (Nesterov); u = NS(u / ||u||_F) per matrix;
    then the shape scale. Learning rate and weight decay are chained after it.
    """

    def init(params):
        return LocalMuonState(momentum=optax.tree.zeros_like(params))

    def update(updates, state, params=None):
        del params
        buf = jax.tree.map(lambda b, g: momentum * b + g, state.momentum, updates)
        nesterov = jax.tree.map(lambda b, g: g + momentum * b, buf, updates)
        directions = jax.tree.map(
            lambda u: orthogonalize_per_matrix(u, ns_steps, ns_dtype)
            * update_scale(u.shape, muon_scale), nesterov)
        return directions, LocalMuonState(momentum=buf)

    return optax.GradientTransformation(init, update)


def _local_muon(cfg: OptimConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
    return optax.chain(
        scale_by_local_muon(cfg.momentum, cfg.ns_steps, cfg.muon_scale, jnp.dtype(cfg.ns_dtype)),
        optax.add_decayed_weights(cfg.weight_decay),  # decoupled: p -= lr * wd * p
        optax.scale_by_learning_rate(schedule),
    )


# ----------------------------------------------------------------------------------------------
# Muon: optax's


MATRIX_DIMS = optax.contrib.MuonDimensionNumbers(reduction_axis=-2, output_axis=-1)
"""[..., in, out]: reduce over `in`, orthogonalise into `out`; leading (layer) axes are batch axes."""


def _optax_muon(cfg: OptimConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
    """optax.contrib.muon on the leaves `group_of` routed to it (optax.partition masks the rest).

    Only the Muon half of optax's muon is used: its built-in Adam shares the `nesterov` flag (so it
    would be NAdam); our AdamW branch handles the other leaves instead, identically for both impls.
    """
    if cfg.muon_scale == "none":
        raise ConfigError("--optim.muon-scale none needs --optim.impl local "
                          "(optax's muon always scales: use shape or rms)")
    return optax.contrib.muon(
        learning_rate=schedule,
        ns_coeffs=NS_COEFFS,
        ns_steps=cfg.ns_steps,
        beta=cfg.momentum,
        weight_decay=cfg.weight_decay,
        nesterov=True,
        consistent_rms=0.2 if cfg.muon_scale == "rms" else None,
        # Every leaf that reaches this branch is a Muon matrix: give each explicit dimensions.
        muon_weight_dimension_numbers=lambda tree: jax.tree.map(lambda _: MATRIX_DIMS, tree),
    )


# ----------------------------------------------------------------------------------------------
# The optimizer


@dataclasses.dataclass(frozen=True, eq=False)
class OptimizerInfo:
    """What `build_optimizer` built, for the run log and per-group learning-rate logging."""

    cfg: OptimConfig
    total_steps: int
    labels: Mapping[str, str]
    """Parameter path ('layers/wq') -> 'muon' | 'adamw'."""
    shapes: Mapping[str, tuple[int, ...]]
    schedules: Mapping[str, optax.Schedule]
    """Group -> its learning-rate schedule."""

    def group_counts(self) -> dict[str, dict[str, int]]:
        """Per group: tensors (leaves), matrices (Muon: one per layer) and parameters."""
        counts = {group: {"tensors": 0, "matrices": 0, "params": 0} for group in self.schedules}
        for path, group in self.labels.items():
            shape = self.shapes[path]
            counts[group]["tensors"] += 1
            counts[group]["matrices"] += math.prod(shape[:-2]) if group == MUON else 0
            counts[group]["params"] += math.prod(shape)
        return counts

    def learning_rates(self, step) -> dict[str, jax.Array]:
        """{'muon': lr, 'adamw': lr} (or {'adamw': lr}) used by optimizer step `step` (0-based)."""
        return {group: schedule(step) for group, schedule in self.schedules.items()}

    def describe(self) -> str:
        c = self.cfg
        impl = f" ({c.impl})" if c.name == MUON else ""
        clip = f"clip_norm {c.clip_norm}" if c.clip_norm > 0 else "no clipping"
        peaks = {MUON: c.lr, ADAMW: c.aux_lr if c.name == MUON else c.lr}
        header = (f"optimizer: {c.name}{impl}, {clip}, {c.schedule} schedule, "
                  f"warmup {warmup_steps(c, self.total_steps)} of {self.total_steps} steps")
        lines = [header]
        for group, n in self.group_counts().items():
            matrices = f" ({n['matrices']} matrices, per layer)" if group == MUON else ""
            lines.append(f"  {group:<5} peak lr {peaks[group]:g}: {n['tensors']} tensors{matrices}, "
                         f"{n['params']:,} params")
        width = max(len(p) for p in self.labels)
        lines += [f"    {p:<{width}} {list(self.shapes[p])!s:<16} {g}" for p, g in self.labels.items()]
        return "\n".join(lines)


def build_optimizer(cfg: OptimConfig, specs: Mapping[str, qwen2.ArrayInfo], total_steps: int
                    ) -> tuple[optax.GradientTransformation, OptimizerInfo]:
    """The full update rule: global-norm clipping over the whole gradient, then AdamW or Muon+AdamW.

    `specs` is the parameter declaration by path (`qwen2.flat_specs(model_cfg)`): roles and shapes.
    AdamW is optax.adamw, which matches torch.optim.AdamW (HF Trainer's): eps is added to
    sqrt(v_hat), decay is decoupled (p -= lr * wd * p); like HF, norms and biases are not decayed.
    """
    labels = {name: group_of(info.role, cfg.name) for name, info in specs.items()}
    shapes = {name: tuple(info.shape) for name, info in specs.items()}
    if cfg.name == ADAMW:
        schedules = {ADAMW: lr_schedule(cfg, total_steps, cfg.lr)}
    else:
        if MUON not in labels.values():
            raise ConfigError("--optim.name muon: no parameter is a Muon matrix (a layer matrix); use --optim.name adamw")
        schedules = {MUON: lr_schedule(cfg, total_steps, cfg.lr),
                     ADAMW: lr_schedule(cfg, total_steps, cfg.aux_lr)}

    decay = _by_path({name: info.role not in NO_DECAY_ROLES for name, info in specs.items()})
    adamw = optax.adamw(schedules[ADAMW], b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay, mask=decay)
    if cfg.name == ADAMW:
        core = adamw
    else:
        muon = (_local_muon if cfg.impl == "local" else _optax_muon)(cfg, schedules[MUON])
        core = optax.partition({MUON: muon, ADAMW: adamw}, _by_path(labels))

    tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), core) if cfg.clip_norm > 0 else core
    return tx, OptimizerInfo(cfg=cfg, total_steps=total_steps, labels=labels, shapes=shapes,
                             schedules=schedules)
