"""RQ-VAE (upstream rq/rqvae.py + rq/models/{rqvae,rq,vq,layers}.py, trainer.py), in JAX.

An MLP encoder (ReLU between layers, none after the last; Xavier-normal weights, zero biases) maps an
item embedding to an e_dim latent; L residual vector quantisers (codebooks initialised by k-means on
the first batch's residuals, level by level) quantise it; the mirrored decoder reconstructs the input.
Loss: MSE(reconstruction, x) + quant_loss_weight * mean over levels of
MSE(q, sg(r)) + beta * MSE(sg(q), r), straight-through gradients through the quantiser. AdamW (weight
decay 0), lr constant after a linear warmup of `warmup_epochs`, gradient norm clipped at 1.0, batches of
`batch_size` shuffled items. Every `eval_every` epochs the collision rate of the argmin codes is
measured and the parameters with the lowest one are kept (upstream's best_collision_model.pth, which
its generate_indices.py reads). Codes are the argmin per level (upstream: use_sk=False).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sidrec.sids import kmeans as km
from sidrec.sids.quantize import Quantized


@dataclass(frozen=True)
class RQVAESettings:
    layers: tuple[int, ...] = (2048, 1024, 512, 256, 128, 64)  # upstream's default hidden sizes
    e_dim: int = 32
    codes: tuple[int, ...] = (256, 256, 256)
    beta: float = 0.25
    quant_loss_weight: float = 1.0
    lr: float = 1e-3
    epochs: int = 10000          # rqvae.sh
    batch_size: int = 20480      # rqvae.sh (the whole catalogue in one batch)
    warmup_epochs: int = 50
    eval_every: int = 50
    kmeans_iterations: int = 100


def _init_mlp(rng: np.random.Generator, dims: tuple[int, ...]) -> list[dict]:
    """Xavier-normal weights, zero biases; drawn with NumPy (jax.random would compile a program per shape)."""
    layers = []
    for n_in, n_out in zip(dims[:-1], dims[1:]):
        std = np.sqrt(2.0 / (n_in + n_out))  # xavier_normal_
        layers.append({"w": jnp.asarray(std * rng.standard_normal((n_in, n_out)), jnp.float32),
                       "b": jnp.zeros(n_out, jnp.float32)})
    return layers


def _mlp(layers: list[dict], x: jax.Array) -> jax.Array:
    for i, layer in enumerate(layers):
        x = x @ layer["w"] + layer["b"]
        if i < len(layers) - 1:
            x = jax.nn.relu(x)
    return x


def _quantise(codebooks: list[jax.Array], z: jax.Array, beta: float):
    residual, quantised, losses, codes = z, jnp.zeros_like(z), [], []
    for book in codebooks:
        idx = jnp.argmin(km.squared_distances(residual, book), 1)
        q = book[idx]
        losses.append(jnp.mean((q - jax.lax.stop_gradient(residual)) ** 2)
                      + beta * jnp.mean((jax.lax.stop_gradient(q) - residual) ** 2))
        q_st = residual + jax.lax.stop_gradient(q - residual)  # straight-through
        residual = residual - q_st
        quantised = quantised + q_st
        codes.append(idx)
    return quantised, jnp.mean(jnp.stack(losses)), jnp.stack(codes, 1).astype(jnp.int32)


def _loss(params, x, settings: RQVAESettings):
    z = _mlp(params["encoder"], x)
    quantised, quant_loss, _ = _quantise(params["codebooks"], z, settings.beta)
    reconstruction = _mlp(params["decoder"], quantised)
    recon = jnp.mean((reconstruction - x) ** 2)
    return recon + settings.quant_loss_weight * quant_loss, recon


@jax.jit
def codes_of(params, x: jax.Array) -> jax.Array:
    return _quantise(params["codebooks"], _mlp(params["encoder"], x), 0.0)[2]


def _collision_rate(codes: np.ndarray) -> float:
    return 1.0 - len({tuple(r) for r in codes}) / len(codes)


@jax.jit
def _residual(residual: jax.Array, centres: jax.Array, assign: jax.Array) -> jax.Array:
    return residual - centres[assign]


def _initial_params(seed: int, key: jax.Array, data: jax.Array, first_rows: jax.Array,
                    settings: RQVAESettings) -> dict:
    """MLPs, then codebooks by k-means of the first batch's latent residuals, level by level (upstream's
    lazy kmeans_init). A few compiled calls (k-means compiles once for equal code counts), not one per op."""
    rng, dims = np.random.default_rng(seed), (data.shape[1], *settings.layers, settings.e_dim)
    params = {"encoder": _init_mlp(rng, dims), "decoder": _init_mlp(rng, dims[::-1])}
    residual, books = jax.jit(_mlp)(params["encoder"], data[first_rows]), []
    for level, k in enumerate(settings.codes):
        centres, assign = km.kmeans(jax.random.fold_in(key, 10 + level), residual, k, settings.kmeans_iterations)
        books.append(centres)
        residual = _residual(residual, centres, assign)
    return {**params, "codebooks": books}


@partial(jax.jit, static_argnames="settings")
def _final(params, data: jax.Array, settings: RQVAESettings):
    """Latents, codes, latent residual MSE after each level, reconstruction MSE."""
    z = _mlp(params["encoder"], data)
    codes = codes_of(params, data)
    residual, mse = z, []
    for level, book in enumerate(params["codebooks"]):
        residual = residual - book[codes[:, level]]
        mse.append(jnp.mean(residual ** 2))
    return z, codes, jnp.stack(mse), _loss(params, data, settings)[1]


def train_rqvae(x: np.ndarray, settings: RQVAESettings, seed: int, log=print) -> tuple[Quantized, np.ndarray, dict]:
    """The lowest-collision parameters' quantisation of the latents (codes, codebooks, latent residual
    MSE per level), those latents [items, e_dim], and a training summary."""
    n = x.shape[0]
    key = jax.random.key(seed)
    data = jnp.asarray(x, jnp.float32)
    order_key = jax.random.fold_in(key, 2)
    batch = min(settings.batch_size, n)
    steps_per_epoch = -(-n // batch)
    first_rows = jax.random.permutation(jax.random.fold_in(order_key, 0), n)[:batch]
    params = _initial_params(seed, key, data, first_rows, settings)

    warmup = settings.warmup_epochs * steps_per_epoch
    schedule = optax.join_schedules([optax.linear_schedule(0.0, settings.lr, max(warmup, 1)),
                                     optax.constant_schedule(settings.lr)], [warmup])
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.0))
    state = jax.jit(optimizer.init)(params)

    @jax.jit
    def epoch(params, state, epoch_key):
        perm = jax.random.permutation(epoch_key, n)
        pad = steps_per_epoch * batch - n
        perm = jnp.concatenate([perm, perm[:pad]]).reshape(steps_per_epoch, batch)

        def step(carry, rows):
            params, state = carry
            (loss, recon), grads = jax.value_and_grad(_loss, has_aux=True)(params, data[rows], settings)
            updates, state = optimizer.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), (loss, recon)

        (params, state), (losses, recons) = jax.lax.scan(step, (params, state), perm)
        return params, state, losses.mean(), recons.mean()

    best = (np.inf, None, -1)
    history = []
    for e in range(settings.epochs):
        params, state, loss, recon = epoch(params, state, jax.random.fold_in(order_key, e + 1))
        if (e + 1) % settings.eval_every == 0 or e + 1 == settings.epochs:
            codes = np.asarray(codes_of(params, data))
            rate = _collision_rate(codes)
            history.append({"epoch": e + 1, "loss": float(loss), "recon": float(recon), "collision_rate": rate})
            if rate < best[0]:
                best = (rate, params, e + 1)
            if len(history) % 10 == 1 or e + 1 == settings.epochs:
                log(f"  rqvae epoch {e + 1}: loss {float(loss):.4g}, reconstruction {float(recon):.4g}, "
                    f"collision rate {rate:.4f}")
    params = best[1]
    z, codes, mse, recon = jax.device_get(_final(params, data, settings))
    summary = {"best_epoch": best[2], "best_collision_rate": best[0], "reconstruction_mse": float(recon),
               "history": history}
    books = tuple(np.asarray(b) for b in params["codebooks"])
    return Quantized(np.asarray(codes), books, tuple(float(m) for m in mse)), np.asarray(z), summary
