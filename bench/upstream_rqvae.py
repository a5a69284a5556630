"""Upstream's RQ-VAE training (rq/rqvae.py, rq/models/{rqvae,rq,vq,layers}.py, rq/trainer.py, HEAD 81b4ba9)
restated in PyTorch for the side-by-side SID benchmark; needs torch and scikit-learn.

What it keeps from upstream: the MLP encoder/decoder (Linear layers, ReLU between them, none after the
last, Xavier-normal weights, zero biases; dropout 0 and no batch norm as rqvae.sh runs it), codebooks
initialised lazily on the first training batch by scikit-learn KMeans(max_iter=kmeans_iters) level by
level, argmin quantisation (sk_epsilons 0, so no Sinkhorn while training), loss MSE(recon, x) +
quant_loss_weight * mean over levels of (MSE(q, sg(r)) + beta * MSE(sg(q), r)), straight-through
gradients, AdamW (weight decay 0) with transformers' constant-with-warmup schedule stepped per batch,
gradient norm clipped at 1.0, a shuffled loader, and every `eval_every` epochs the collision rate of all
items' codes with the lowest-collision parameters kept. What it leaves out: upstream writes a checkpoint
file at every evaluation (here the best state is copied in memory) and draws a tqdm bar per epoch.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch
from sklearn.cluster import KMeans
from torch import nn


def _mlp(dims: tuple[int, ...]) -> nn.Sequential:
    modules: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(dims[:-1], dims[1:])):
        linear = nn.Linear(n_in, n_out)
        nn.init.xavier_normal_(linear.weight)
        nn.init.zeros_(linear.bias)
        modules.append(linear)
        if i < len(dims) - 2:
            modules.append(nn.ReLU())
    return nn.Sequential(*modules)


class RQVAE(nn.Module):
    def __init__(self, in_dim: int, layers: tuple[int, ...], e_dim: int, codes: tuple[int, ...], beta: float,
                 quant_loss_weight: float, kmeans_iterations: int, seed: int):
        super().__init__()
        dims = (in_dim, *layers, e_dim)
        self.encoder, self.decoder = _mlp(dims), _mlp(dims[::-1])
        self.codebooks = nn.ParameterList([nn.Parameter(torch.zeros(k, e_dim)) for k in codes])
        self.beta, self.quant_loss_weight = beta, quant_loss_weight
        self.kmeans_iterations, self.seed, self.initialised = kmeans_iterations, seed, False

    def quantise(self, z: torch.Tensor):
        residual, quantised, losses, codes = z, torch.zeros_like(z), [], []
        for level, book in enumerate(self.codebooks):
            if not self.initialised and self.training:  # upstream's lazy kmeans_init, on the residual it sees
                centres = KMeans(n_clusters=book.shape[0], max_iter=self.kmeans_iterations,
                                 random_state=self.seed + level).fit(residual.detach().numpy()).cluster_centers_
                book.data.copy_(torch.from_numpy(centres).to(book.dtype))
            distances = (residual ** 2).sum(1, keepdim=True) + (book ** 2).sum(1)[None] - 2 * residual @ book.T
            idx = distances.argmin(-1)
            q = book[idx]
            losses.append(nn.functional.mse_loss(q, residual.detach())
                          + self.beta * nn.functional.mse_loss(q.detach(), residual))
            q = residual + (q - residual).detach()
            residual, quantised = residual - q, quantised + q
            codes.append(idx)
        self.initialised = True
        return quantised, torch.stack(losses).mean(), torch.stack(codes, -1)

    def forward(self, x: torch.Tensor):
        quantised, quant_loss, codes = self.quantise(self.encoder(x))
        reconstruction = self.decoder(quantised)
        recon = nn.functional.mse_loss(reconstruction, x)
        return recon + self.quant_loss_weight * quant_loss, recon, codes


def train(x: np.ndarray, layers: tuple[int, ...], e_dim: int, codes: tuple[int, ...], epochs: int, lr: float,
          batch_size: int, warmup_epochs: int, eval_every: int, seed: int, beta: float = 0.25,
          quant_loss_weight: float = 1.0, kmeans_iterations: int = 100) -> dict:
    """Wall time of the whole fit, the best (lowest) collision rate and its epoch, and the reconstruction
    MSE and codes of the parameters upstream's generate_indices.py would read (best_collision_model)."""
    torch.manual_seed(seed)
    data = torch.from_numpy(np.ascontiguousarray(x, np.float32))
    n = len(data)
    started = time.perf_counter()
    model = RQVAE(x.shape[1], layers, e_dim, codes, beta, quant_loss_weight, kmeans_iterations, seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    steps_per_epoch = -(-n // batch_size)
    warmup = warmup_epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, step / max(1, warmup)))
    best = (np.inf, None, -1)
    for epoch in range(epochs):
        model.train()
        for rows in torch.randperm(n).split(batch_size):
            optimizer.zero_grad()
            loss, _, _ = model(data[rows])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
        if (epoch + 1) % eval_every == 0:
            model.eval()
            with torch.no_grad():
                item_codes = model.quantise(model.encoder(data))[2].numpy()
            rate = 1.0 - len({tuple(c) for c in item_codes}) / n
            if rate < best[0]:
                best = (rate, copy.deepcopy(model.state_dict()), epoch + 1)
    wall = time.perf_counter() - started
    model.load_state_dict(best[1])
    model.eval()
    with torch.no_grad():
        _, recon, item_codes = model(data)
    return {"wall_s": wall, "best_collision_rate": best[0], "best_epoch": best[2],
            "reconstruction_mse": float(recon), "codes": item_codes.numpy().astype(np.int32)}
