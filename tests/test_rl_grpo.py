"""sidrec.rl.grpo against independent transcriptions of upstream MiniOneRec's GRPO (ReReTrainer.compute_loss in
minionerec_trainer.py, TRL's GRPOTrainer of early 2025):

- the objective (grpo / dapo / gspo): value and d loss / d logp against NumPy float64 with the gradient written
  out analytically;
- the completion mask against upstream's argmax-of-first-EOS construction;
- token log-probs (prompt run once per group) against `qwen2.forward` run on each unpadded prompt + completion alone;
- the jitted update (shard_map, micro-batch scan, one global division) against jax.grad of the upstream loss
  written directly over `qwen2.forward`, through a gradient-capturing tx, optax.sgd(1.0) and AdamW;
- sync_reference; and, when torch is importable, upstream's torch code verbatim on the same numbers.

Upstream's per-token loss (ratio = exp(logp - logp.detach()) is 1 in value, d ratio / d logp = 1):

    l_t = -(ratio_t * A - beta * kl_t),   kl_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1
    d kl_t / d logp_t = 1 - exp(ref_t - logp_t)
    d l_t / d logp_t  = -A + beta * (1 - exp(ref_t - logp_t)) = -(A - beta * (1 - exp(ref_t - logp_t)))

Reductions over the K kept completions (weight != 0), n_i = tokens of completion i, m_it its mask:
- grpo: L = (1/K) sum_i (1/n_i) sum_t m_it l_it          dL/dlogp_it = m_it * dl_it / (K n_i)
- dapo: L = sum_it m_it l_it / sum_it m_it               dL/dlogp_it = m_it * dl_it / sum(m)
- gspo: s_i = exp(sum_t m_it (logp - sg logp) / n_i) (= 1; ds_i/dlogp_it = s_i m_it / n_i = m_it / n_i),
        L = (1/K) sum_i -(s_i A_i - beta sum_t m_it kl_it / n_i)
        dL/dlogp_it = (1/K) (-A_i m_it / n_i + beta m_it (1 - exp(ref - logp)) / n_i)
  i.e. with one update per rollout (ratio 1) gspo equals grpo in value AND gradient; the two are still checked
  separately because the code paths differ. Dropped completions and masked tokens have gradient exactly 0.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from probes import CAPTURE_GRADIENT

from sidrec import optim, parallel
from sidrec.config import MeshConfig, OptimConfig
from sidrec.model import qwen2
from sidrec.rl import grpo

EOS = 1
BETA = 0.1

# A tiny Qwen2 with a large init_std so logits are far from flat (log-probs spread over several nats) and
# the gradient is far from zero; 4 padded vocabulary rows exercise the masked logits.
CFG = qwen2.Qwen2Config(vocab_size=64, real_vocab_size=60, hidden_size=32, intermediate_size=64, num_layers=2,
                        num_heads=4, num_kv_heads=2, head_dim=8, init_std=0.3)

# float32 (sidrec) against float64 (NumPy): the inputs are fp32 numbers, so only sidrec's fp32 arithmetic
# differs, at ~6e-8 relative per operation over sums of <= 30 terms, exp and one division: worst cases ~1e-6.
# rtol 1e-5 leaves a 10x margin, while any formula slip (a missing mask, a wrong denominator, a dropped KL
# term) moves values by > 1e-2. atol only covers gradient entries that cancel to ~0 (-A + beta*(1-e^d)).
OBJ_RTOL, OBJ_ATOL = 1e-5, 1e-7
# Log-probs: the same fp32 model on left-padded rows with the prompt's K/V shared by its group vs each sequence
# alone; measured max |diff| 2.9e-6 on log-probs spanning -9.6 .. -0.7.
LOGP_TOL = 1e-5
# The update's gradient vs jax.grad of the transcription: both fp32, different reduction orders and shapes;
# measured ||diff|| / ||grad|| 1.1e-6 (grpo, dapo, gspo). A dropped KL term moves it by 3e-2, dapo's token count
# replaced by a completion count by 2e-1.
GRAD_REL_TOL = 1e-5
# Accumulation: A=2 micro-batches vs A=1 on the same rows, identical per-row arithmetic, only summation order;
# measured 6e-8.
ACCUM_REL_TOL = 1e-6


@pytest.fixture(autouse=True)
def _fp32_matmuls():
    with jax.default_matmul_precision("highest"):  # no TF32/bf16 passes on accelerators; a no-op on CPU
        yield


# ----------------------------------------------------------------------------------------------------
# Independent transcriptions


def upstream_completion_mask(completions: np.ndarray, eos_id: int) -> np.ndarray:
    """minionerec_trainer.py: eos_idx = first EOS (argmax) where any, else C; mask = arange <= eos_idx."""
    flat = completions.reshape(-1, completions.shape[-1])
    is_eos = flat == eos_id
    eos_idx = np.full(flat.shape[0], flat.shape[1])
    any_eos = is_eos.any(1)
    eos_idx[any_eos] = is_eos.astype(int).argmax(1)[any_eos]
    mask = np.arange(flat.shape[1])[None, :] <= eos_idx[:, None]
    return mask.reshape(completions.shape)


def numpy_objective(logp, ref, adv, mask, weights, *, beta, loss_type):
    """float64 (loss, d loss / d logp [n, C], mean sequence KL) over the kept completions, upstream's formulas
    with the analytic gradient of the module docstring."""
    logp, ref, adv, mask = (np.asarray(x, np.float64) for x in (logp, ref, adv, mask))
    keep = np.asarray(weights) != 0
    grad = np.zeros_like(logp)
    lp, rf, a, m = logp[keep], ref[keep], adv[keep], mask[keep]
    delta = rf - lp
    kl = np.exp(delta) - delta - 1.0
    dkl = 1.0 - np.exp(delta)
    per_token = -(1.0 * a[:, None] - beta * kl)  # the ratio is 1 in value
    d_per_token = -a[:, None] + beta * dkl
    n = m.sum(1)
    k = keep.sum()
    seq_kl = (kl * m).sum(1) / n
    if loss_type == "grpo":
        loss = ((per_token * m).sum(1) / n).mean()
        g = m * d_per_token / (n[:, None] * k)
    elif loss_type == "dapo":
        loss = (per_token * m).sum() / m.sum()
        g = m * d_per_token / m.sum()
    elif loss_type == "gspo":
        s = np.exp(np.zeros(len(a)))  # exp(mean_t(logp - sg(logp))) = 1
        loss = (-(s * a - beta * seq_kl)).mean()
        g = (-a[:, None] * s[:, None] * m / n[:, None] + beta * m * dkl / n[:, None]) / k
    else:
        raise ValueError(loss_type)
    grad[keep] = g
    return loss, grad, seq_kl.mean()


def objective_inputs(seed=0):
    """5 completions of C=6 with masks of lengths 6, 1, 3, 4, 2 and the third dropped (weight 0)."""
    rng = np.random.default_rng(seed)
    n, C = 5, 6
    logp = np.log(rng.uniform(0.02, 0.98, (n, C))).astype(np.float32)
    ref = (logp + rng.normal(0.0, 0.7, (n, C))).astype(np.float32)
    adv = rng.normal(0.0, 1.0, n).astype(np.float32)
    lengths = np.array([6, 1, 3, 4, 2])
    mask = np.arange(C)[None, :] < lengths[:, None]
    weights = np.array([1, 1, 0, 1, 1], np.float32)
    return logp, ref, adv, mask, weights


def jax_objective(loss_type, beta, ref, adv, mask, weights):
    def loss(logp):
        num, kl = grpo.objective_terms(logp, ref, adv, mask, weights, beta=beta, loss_type=loss_type)
        return num / grpo.loss_count(mask, weights, loss_type), kl / jnp.sum(weights)

    return jax.jit(jax.value_and_grad(loss, has_aux=True))


_init_params = jax.jit(qwen2.init_params, static_argnums=0)


def params_for(seed):
    params = _init_params(CFG, jax.random.key(seed))
    # non-zero biases and non-unit norms so every parameter's gradient path is exercised
    rng = np.random.default_rng(100 + seed)
    return jax.tree.map(lambda x: np.asarray(x) + 0.05 * rng.standard_normal(x.shape).astype(np.float32), params)


@jax.jit
def _forward_logps(params, seqs, completions):
    """log-probs [G, C] of completions given unpadded rows seqs [G, L + C] (L from the static shapes)."""
    C = completions.shape[-1]
    L = seqs.shape[1] - C
    positions = jnp.broadcast_to(jnp.arange(seqs.shape[1], dtype=jnp.int32), seqs.shape)
    logits = qwen2.forward(params, CFG, seqs, jnp.ones_like(seqs), positions)[:, L - 1:L - 1 + C]
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(logprobs, completions[..., None], axis=-1)[..., 0]


def per_sequence_logps(params, prompt_tokens, prompt_mask, completions):
    """[p*G, C] log-probs from qwen2.forward on each real prompt + its completions, one prompt at a time."""
    out = []
    for tokens, mask, comps in zip(prompt_tokens, prompt_mask, completions):
        real = tokens[mask.astype(bool)]
        seqs = np.concatenate([np.repeat(real[None], comps.shape[0], axis=0), comps], axis=1)
        out.append(_forward_logps(params, seqs, comps))
    return jnp.concatenate(out, axis=0)


def right_padded_logps(params, prompt_tokens, prompt_mask, completions):
    """The same [p*G, C] log-probs in ONE qwen2.forward: every real prompt + completion starts its own row at
    position 0 and is right-padded (segment 0) to the longest; trailing padding cannot change a causal
    model's earlier logits, so each row computes its sequence alone (checked against per_sequence_logps)."""
    p, G, C = completions.shape
    lengths = np.asarray(prompt_mask).astype(bool).sum(1)
    width = int(lengths.max()) + C
    tokens = np.zeros((p * G, width), np.int32)
    segments = np.zeros((p * G, width), np.int32)
    for r in range(p * G):
        i, g = divmod(r, G)
        seq = np.concatenate([np.asarray(prompt_tokens)[i][np.asarray(prompt_mask)[i].astype(bool)], completions[i, g]])
        tokens[r, :len(seq)], segments[r, :len(seq)] = seq, 1
    positions = np.broadcast_to(np.arange(width, dtype=np.int32), tokens.shape)
    index = (np.repeat(lengths, G) - 1)[:, None] + np.arange(C)[None, :]  # the logits predicting token c
    logits = jnp.take_along_axis(qwen2.forward(params, CFG, tokens, segments, positions), index[..., None], axis=1)
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(logprobs, completions.reshape(p * G, C)[..., None], axis=-1)[..., 0]


def transcribed_loss(logp, ref, batch, *, beta, loss_type):
    """Upstream's compute_loss over the whole batch (every micro-batch together) given the per-token log-probs
    [A*p*G, C] of policy and reference; returns (loss, mean sequence KL)."""
    completions = np.asarray(batch["completions"])
    C = completions.shape[-1]
    keep = np.asarray(batch["weights"]).reshape(-1) != 0  # upstream never sees what dynamic sampling drops
    mask = jnp.asarray(upstream_completion_mask(completions, EOS).reshape(-1, C)[keep], jnp.float32)
    logp, ref = logp[keep], ref[keep]
    adv = jnp.asarray(np.asarray(batch["advantages"]).reshape(-1)[keep])
    per_token_kl = jnp.exp(ref - logp) - (ref - logp) - 1
    per_token_loss = jnp.exp(logp - jax.lax.stop_gradient(logp)) * adv[:, None]
    per_token_loss = -(per_token_loss - beta * per_token_kl)
    sequence_kl = (per_token_kl * mask).sum(1) / mask.sum(1)
    if loss_type == "dapo":
        loss = (per_token_loss * mask).sum() / mask.sum()
    elif loss_type == "gspo":
        s_score = jnp.exp(((logp - jax.lax.stop_gradient(logp)) * mask).sum(1) / mask.sum(1))
        loss = -(s_score * adv - beta * sequence_kl).mean()
    else:
        loss = ((per_token_loss * mask).sum(1) / mask.sum(1)).mean()
    return loss, sequence_kl.mean()


def flat_prompts(batch):
    """[A, p, ...] -> [A*p, ...]: prompt_tokens, prompt_mask, completions (row order a, i, g)."""
    return tuple(np.asarray(batch[k]).reshape(-1, *np.shape(batch[k])[2:])
                 for k in ("prompt_tokens", "prompt_mask", "completions"))


# ----------------------------------------------------------------------------------------------------
# 1. The objective


@pytest.mark.parametrize("beta", [0.04, 1.0])
@pytest.mark.parametrize("loss_type", grpo.LOSS_TYPES)
def test_objective_value_and_gradient_equal_numpy_transcription(loss_type, beta):
    logp, ref, adv, mask, weights = objective_inputs()
    (loss, kl), grad = jax_objective(loss_type, beta, ref, adv, mask, weights)(logp)
    want_loss, want_grad, want_kl = numpy_objective(logp, ref, adv, mask, weights, beta=beta, loss_type=loss_type)
    np.testing.assert_allclose(float(loss), want_loss, rtol=OBJ_RTOL, atol=OBJ_ATOL)
    np.testing.assert_allclose(float(kl), want_kl, rtol=OBJ_RTOL)
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=OBJ_RTOL, atol=OBJ_ATOL)
    # masked tokens and the dropped completion get exactly no gradient
    dead = ~mask | (weights == 0)[:, None]
    assert np.all(np.asarray(grad)[dead] == 0.0)
    assert np.abs(want_grad).max() > 1e-2 and np.abs(want_loss) > 1e-2  # not a comparison of zeros


def test_objective_transcription_is_not_degenerate():
    """The three reductions differ where they should: dapo weights tokens, grpo/gspo weight completions."""
    logp, ref, adv, mask, weights = objective_inputs()
    out = {t: numpy_objective(logp, ref, adv, mask, weights, beta=BETA, loss_type=t) for t in grpo.LOSS_TYPES}
    assert abs(out["dapo"][0] - out["grpo"][0]) > 1e-3
    np.testing.assert_allclose(out["gspo"][0], out["grpo"][0], rtol=1e-12)  # ratio 1: equal (docstring)
    np.testing.assert_allclose(out["gspo"][1], out["grpo"][1], rtol=1e-12)


@pytest.mark.parametrize("loss_type", grpo.LOSS_TYPES)
def test_loss_count(loss_type):
    _, _, _, mask, weights = objective_inputs()
    got = float(grpo.loss_count(mask, weights, loss_type))
    assert got == (mask[weights != 0].sum() if loss_type == "dapo" else (weights != 0).sum())


def test_k3_kl_is_nonnegative_and_zero_at_equal_logps():
    logp, ref, *_ = objective_inputs()
    kl = np.asarray(grpo.k3_kl(logp, ref))
    assert (kl >= 0).all() and np.all(np.asarray(grpo.k3_kl(logp, logp)) == 0)


# ----------------------------------------------------------------------------------------------------
# 2. The completion mask


def test_completion_mask_is_up_to_and_including_first_eos():
    E = EOS
    completions = np.array([
        [5, 6, 7, E, 9, 9],    # EOS in the middle: mask through it
        [E, 5, 6, 7, 8, 9],    # EOS first: only it
        [5, 6, 7, 8, 9, 10],   # no EOS: everything
        [5, E, 6, E, E, 7],    # several EOS: the first one counts
        [5, 6, 7, 8, 9, E],    # EOS last
    ], np.int32)
    want = np.array([
        [1, 1, 1, 1, 0, 0],
        [1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1],
    ], bool)
    got = np.asarray(grpo.completion_mask(completions, E))
    assert got.dtype == bool
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(want, upstream_completion_mask(completions, E))
    # any leading shape ([p, G, C] in the update)
    rng = np.random.default_rng(0)
    many = rng.integers(0, 4, (3, 4, 7)).astype(np.int32)
    np.testing.assert_array_equal(np.asarray(grpo.completion_mask(many, E)), upstream_completion_mask(many, E))


# ----------------------------------------------------------------------------------------------------
# 3. Token log-probs


def left_padded_prompts(rng, lengths, S):
    """Left-padded prompts whose padding holds random tokens (leaking padding would change the log-probs)."""
    tokens = rng.integers(2, CFG.real_vocab_size, (len(lengths), S)).astype(np.int32)
    mask = (np.arange(S)[None, :] >= S - np.array(lengths)[:, None]).astype(np.int32)
    return tokens, mask


def random_completions(rng, shape, eos_every=3):
    """SID-like tokens with an EOS dropped in at varying places (and sometimes none)."""
    comps = rng.integers(2, CFG.real_vocab_size, shape).astype(np.int32)
    flat = comps.reshape(-1, shape[-1])
    for i in range(flat.shape[0]):
        if i % eos_every:
            flat[i, rng.integers(0, shape[-1])] = EOS
    return flat.reshape(shape)


_token_logps = jax.jit(lambda params, tokens, mask, comps: grpo.token_logps(params, CFG, tokens, mask, comps))


def test_token_logps_equal_forward_on_each_unpadded_sequence():
    rng = np.random.default_rng(1)
    params = params_for(0)
    tokens, mask = left_padded_prompts(rng, [7, 3, 1], S=7)
    comps = random_completions(rng, (3, 3, 5))
    got = np.asarray(_token_logps(params, tokens, mask, comps))
    want = np.asarray(per_sequence_logps(params, tokens, mask, comps))
    assert got.dtype == np.float32 and got.shape == (9, 5)
    np.testing.assert_allclose(got, want, rtol=0, atol=LOGP_TOL)
    # the one-forward reference the update tests use computes the same thing
    np.testing.assert_allclose(np.asarray(right_padded_logps(params, tokens, mask, comps)), want, rtol=0,
                               atol=LOGP_TOL)
    assert want.std() > 0.5 and want.max() < -0.1  # log-probs spread out, not a flat model's -log(60)


# ----------------------------------------------------------------------------------------------------
# 4. The update


def update_batch(seed=3, A=2, p=2, S=6, G=3, C=4):
    rng = np.random.default_rng(seed)
    tokens, mask = left_padded_prompts(rng, rng.integers(1, S + 1, A * p), S)
    comps = random_completions(rng, (A * p, G, C))
    adv = rng.normal(0.0, 1.0, (A * p, G)).astype(np.float32)
    weights = np.ones((A * p, G), np.float32)
    weights[0, 1] = weights[A * p - 1, 0] = 0.0  # dynamic sampling drops a completion in each micro-batch
    flat = {"prompt_tokens": tokens, "prompt_mask": mask, "completions": comps, "advantages": adv,
            "weights": weights}
    return {k: v.reshape(A, p, *v.shape[1:]) for k, v in flat.items()}




@functools.cache  # one jitted update (and its compilations) per (tx, loss type) for the whole module
def one_device_update(tx, loss_type):
    mesh = parallel.make_mesh(MeshConfig(data=1, fsdp=1), jax.devices()[:1])
    specs = parallel.param_partition_specs(qwen2.param_specs(CFG), 1)
    return jax.jit(grpo.make_update(CFG, tx, mesh, specs, beta=BETA, loss_type=loss_type, eos_id=EOS))


def initial_state(tx, params, ref_params):
    return grpo.RLState(params=params, opt_state=tx.init(params), ref_params=ref_params,
                        step=jnp.zeros((), jnp.int32))


def tree_rel(a, b):
    """||a - b|| / ||b|| over the whole tree."""
    num = sum(float(np.sum((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2))
              for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    den = sum(float(np.sum(np.asarray(y, np.float64) ** 2)) for y in jax.tree.leaves(b))
    return (num / den) ** 0.5


@pytest.fixture(scope="module")
def policy_and_reference():
    """A policy and a reference a little away from it (as after some RL steps), so the
    advantage term and the KL term both shape the gradient (mean sequence KL ~0.05)."""
    policy = params_for(0)
    rng = np.random.default_rng(7)
    reference = jax.tree.map(lambda x: x + 0.01 * rng.standard_normal(x.shape).astype(np.float32), policy)
    return policy, reference


@pytest.fixture(scope="module")
def transcription(policy_and_reference):
    """loss_type -> (loss, kl, grads) of the upstream transcription on update_batch(): per-token log-probs from
    qwen2.forward on every sequence in its own row from position 0 (right_padded_logps), the loss on them,
    and the chain rule by hand (one jax.vjp of the log-probs, pulled back with jax.grad of each loss), all
    in one jit so the model compiles once."""
    batch = update_batch()
    prompts = flat_prompts(batch)

    @jax.jit
    def all_losses(params, ref_params):
        logp, pullback = jax.vjp(lambda p: right_padded_logps(p, *prompts), params)
        ref = right_padded_logps(ref_params, *prompts)
        out = {}
        for loss_type in grpo.LOSS_TYPES:
            (loss, kl), dlogp = jax.value_and_grad(
                lambda lp, lt=loss_type: transcribed_loss(lp, ref, batch, beta=BETA, loss_type=lt), has_aux=True)(logp)
            out[loss_type] = (loss, kl, pullback(dlogp)[0])
        return out

    out = all_losses(*policy_and_reference)
    return {k: (float(loss), float(kl), jax.tree.map(np.asarray, g)) for k, (loss, kl, g) in out.items()}


SGD = optax.sgd(1.0)


# grpo and dapo read the applied gradient exactly (CAPTURE_GRADIENT); gspo through optax.sgd(1.0) as
# params - new_params (one compilation each; gspo's own formula is covered by the objective tests above).
@pytest.mark.parametrize("loss_type, tx", [("grpo", CAPTURE_GRADIENT), ("dapo", CAPTURE_GRADIENT), ("gspo", SGD)],
                         ids=["grpo-capture", "dapo-capture", "gspo-sgd"])
def test_update_applies_gradient_of_transcribed_loss(loss_type, tx, policy_and_reference, transcription):
    params, ref_params = policy_and_reference
    want_loss, want_kl, want_grads = transcription[loss_type]
    state, metrics = one_device_update(tx, loss_type)(initial_state(tx, params, ref_params), update_batch())
    if tx is SGD:
        # new = params - g rounded to fp32 adds <= ulp(|params| + |g|) ~ 1e-7 per element on top of the
        # gradient's own difference: well inside the same 1e-5 bound.
        applied = jax.tree.map(lambda old, new: np.asarray(old, np.float64) - np.asarray(new, np.float64),
                               params, state.params)
    else:
        applied = state.opt_state
    rel = tree_rel(applied, want_grads)
    assert rel <= GRAD_REL_TOL, f"{loss_type}: applied gradient differs from jax.grad of upstream's loss: {rel:.2e}"
    np.testing.assert_allclose(float(metrics["loss"]), want_loss, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["kl"]), want_kl, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["grad_norm"]), float(optax.tree_utils.tree_norm(want_grads)), rtol=1e-5)
    assert bool(metrics["finite"]) and int(state.step) == 1
    assert want_kl > 1e-3 and float(optax.tree_utils.tree_norm(want_grads)) > 1e-2  # not a comparison of zeros
    # the reference is read, not trained
    for got, ref in zip(jax.tree.leaves(state.ref_params), jax.tree.leaves(ref_params)):
        np.testing.assert_array_equal(np.asarray(got), ref)


def test_non_finite_update_leaves_state_unchanged(policy_and_reference):
    """A NaN advantage makes the loss non-finite: the update is skipped (params and step as they were) and
    reported, rather than writing NaN into the policy."""
    params, ref_params = policy_and_reference
    batch = update_batch()
    batch["advantages"] = batch["advantages"].copy()
    batch["advantages"][0, 0, 0] = np.nan
    state, metrics = one_device_update(SGD, "grpo")(initial_state(SGD, params, ref_params), batch)
    assert not bool(metrics["finite"]) and int(state.step) == 0
    for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(got), want)


def test_update_with_adamw_from_build_optimizer(policy_and_reference, transcription):
    """AdamW (build_optimizer: global-norm clipping, decoupled decay off norms/biases) fed the transcription's
    gradient directly gives the same first moment and the same parameters as the update."""
    params, ref_params = policy_and_reference
    _, _, want_grads = transcription["grpo"]
    cfg = OptimConfig(name="adamw", lr=1e-3, weight_decay=0.1, warmup_steps=0, schedule="constant", clip_norm=1.0)
    tx, _ = optim.build_optimizer(cfg, qwen2.flat_specs(CFG), total_steps=10)
    state, _ = one_device_update(tx, "grpo")(initial_state(tx, params, ref_params), update_batch())

    @jax.jit
    def direct(grads, params):
        updates, opt_state = tx.update(grads, tx.init(params), params)
        return optax.apply_updates(params, updates), opt_state

    want_params, want_opt_state = direct(want_grads, params)
    mu = [x.mu for x in jax.tree.leaves(state.opt_state, is_leaf=lambda x: hasattr(x, "mu")) if hasattr(x, "mu")]
    want_mu = [x.mu for x in jax.tree.leaves(want_opt_state, is_leaf=lambda x: hasattr(x, "mu"))
               if hasattr(x, "mu")]
    assert len(mu) == 1
    assert tree_rel(mu[0], want_mu[0]) <= GRAD_REL_TOL  # (1 - b1) * clipped gradient: linear in the gradient
    # Adam's first step is lr * g / (|g| + eps) per element (g clipped): where |g| >> eps its sensitivity to the
    # gradient's rounding, lr * eps * |dg| / g^2, is < 1e-8 for |g| > 1e-5; elements nearer 0 (where the two fp32
    # gradients differ by their absolute rounding, ~1e-7, i.e. in relative terms a lot) only get the trivial bound.
    scale = float(optax.tree_utils.tree_norm(want_grads))
    clipped = jax.tree.map(lambda g: g / max(1.0, scale / cfg.clip_norm), want_grads)
    diff = np.concatenate([np.abs(np.asarray(a) - np.asarray(b)).ravel()
                           for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(want_params))])
    large = np.concatenate([np.abs(g).ravel() > 1e-5 for g in jax.tree.leaves(clipped)])
    assert large.mean() > 0.9, large.mean()  # the bound below covers most parameters
    assert diff[large].max() <= 1e-3 * cfg.lr, diff[large].max()
    assert diff.max() <= 2.5 * cfg.lr, diff.max()
    moved = max(float(np.max(np.abs(np.asarray(a) - b))) for a, b in zip(jax.tree.leaves(state.params),
                                                                          jax.tree.leaves(params)))
    assert moved > 0.5 * cfg.lr


def test_micro_batch_accumulation_does_not_change_the_update(policy_and_reference):
    params, ref_params = policy_and_reference
    two = update_batch(A=2)
    one = {k: v.reshape(1, -1, *v.shape[2:]) for k, v in two.items()}  # the same rows as one micro-batch
    tx = CAPTURE_GRADIENT
    update = one_device_update(tx, "grpo")
    s2, m2 = update(initial_state(tx, params, ref_params), two)
    s1, m1 = update(initial_state(tx, params, ref_params), one)
    rel = tree_rel(s2.opt_state, s1.opt_state)
    assert rel <= ACCUM_REL_TOL, f"A=2 vs A=1 gradient: {rel:.2e}"
    for key in ("loss", "kl", "grad_norm"):
        np.testing.assert_allclose(float(m2[key]), float(m1[key]), rtol=ACCUM_REL_TOL)


def test_compiled_rl_steps_compile_once_and_keep_their_layout():
    """init -> update -> sync -> update: one compilation each (the state keeps one layout; a second
    compilation of a real model's update costs as much as a step), and the reference gets its own buffers."""
    mesh = parallel.make_mesh(MeshConfig(data=1, fsdp=1), jax.devices()[:1])
    specs = parallel.param_partition_specs(qwen2.param_specs(CFG), 1)
    steps = grpo.compile_rl(CFG, optax.adam(1e-3), mesh, specs, beta=BETA, loss_type="grpo", eos_id=EOS,
                            ref_sync_alpha=0.6)
    state = steps.init_state(params_for(0))
    batch = update_batch()
    for _ in range(2):
        state, _ = steps.update(state, batch)
        state = steps.sync_reference(state)
    assert steps.update._cache_size() == 1 and steps.sync_reference._cache_size() == 1
    assert int(state.step) == 2
    assert jax.tree.structure(steps.abstract_state) == jax.tree.structure(state)
    assert all(a.sharding == b.sharding for a, b in zip(jax.tree.leaves(steps.abstract_state), jax.tree.leaves(state)))


# ----------------------------------------------------------------------------------------------------
# 5. Reference sync


def test_sync_reference_mixes_policy_into_reference():
    policy = {"a": np.array([1.0, 2.0], np.float32), "b": {"c": np.array([[3.0]], np.float32)}}
    ref = {"a": np.array([-1.0, 0.5], np.float32), "b": {"c": np.array([[7.0]], np.float32)}}
    state = grpo.RLState(params=policy, opt_state=(), ref_params=ref, step=jnp.asarray(5, jnp.int32))
    alpha = 0.6
    new = grpo.sync_reference(state, alpha)
    np.testing.assert_allclose(np.asarray(new.ref_params["a"]), alpha * policy["a"] + (1 - alpha) * ref["a"],
                               rtol=1e-6)
    np.testing.assert_allclose(np.asarray(new.ref_params["b"]["c"]), [[alpha * 3.0 + (1 - alpha) * 7.0]], rtol=1e-6)
    assert new.params is policy and int(new.step) == 5
    full = grpo.sync_reference(state, 1.0)
    np.testing.assert_array_equal(np.asarray(full.ref_params["a"]), policy["a"])


# ----------------------------------------------------------------------------------------------------
# 6. Upstream's torch code, verbatim, on the same numbers


@pytest.mark.torch
@pytest.mark.parametrize("loss_type", grpo.LOSS_TYPES)
def test_objective_equals_upstream_torch_compute_loss(loss_type):
    torch = pytest.importorskip("torch")
    logp, ref, adv, _, weights = objective_inputs()
    rng = np.random.default_rng(3)
    completion_ids_np = random_completions(rng, (5, 6), eos_every=2)
    keep = weights != 0
    beta = BETA

    # minionerec_trainer.py _generate_and_score_completions (mask) and compute_loss, float64, kept rows only
    completion_ids = torch.tensor(completion_ids_np[keep], dtype=torch.long)
    is_eos = completion_ids == EOS
    eos_idx = torch.full((is_eos.size(0),), is_eos.size(1), dtype=torch.long)
    eos_idx[is_eos.any(dim=1)] = is_eos.int().argmax(dim=1)[is_eos.any(dim=1)]
    sequence_indices = torch.arange(is_eos.size(1)).expand(is_eos.size(0), -1)
    completion_mask = (sequence_indices <= eos_idx.unsqueeze(1)).int()

    per_token_logps = torch.tensor(logp[keep], dtype=torch.float64, requires_grad=True)
    ref_per_token_logps = torch.tensor(ref[keep], dtype=torch.float64)
    advantages = torch.tensor(adv[keep], dtype=torch.float64)
    per_token_kl = torch.exp(ref_per_token_logps - per_token_logps) - (ref_per_token_logps - per_token_logps) - 1
    per_token_loss = torch.exp(per_token_logps - per_token_logps.detach()) * advantages.unsqueeze(1)
    per_token_loss = -(per_token_loss - beta * per_token_kl)
    if loss_type == "dapo":
        loss = (per_token_loss * completion_mask).sum() / completion_mask.sum()
    elif loss_type == "gspo":
        per_token_ratio = per_token_logps - per_token_logps.detach()
        s_score = torch.exp((per_token_ratio * completion_mask).sum(dim=1) / completion_mask.sum(dim=1))
        sequence_kl = (per_token_kl * completion_mask).sum(dim=1) / completion_mask.sum(dim=1)
        loss = -(s_score * advantages - beta * sequence_kl).mean()
    else:
        loss = ((per_token_loss * completion_mask).sum(dim=1) / completion_mask.sum(dim=1)).mean()
    mean_kl = ((per_token_kl * completion_mask).sum(dim=1) / completion_mask.sum(dim=1)).mean()
    loss.backward()
    torch_grad = np.zeros(logp.shape)
    torch_grad[keep] = per_token_logps.grad.numpy()

    mask = np.asarray(grpo.completion_mask(completion_ids_np, EOS))
    np.testing.assert_array_equal(mask[keep], completion_mask.numpy().astype(bool))
    (got_loss, got_kl), got_grad = jax_objective(loss_type, beta, ref, adv, mask, weights)(logp)
    np.testing.assert_allclose(float(got_loss), loss.item(), rtol=OBJ_RTOL, atol=OBJ_ATOL)
    np.testing.assert_allclose(float(got_kl), mean_kl.item(), rtol=OBJ_RTOL)
    np.testing.assert_allclose(np.asarray(got_grad), torch_grad, rtol=OBJ_RTOL, atol=OBJ_ATOL)
    # and the NumPy transcription with the hand-derived gradient agrees with autograd
    want_loss, want_grad, _ = numpy_objective(logp, ref, adv, mask, weights, beta=beta, loss_type=loss_type)
    np.testing.assert_allclose(want_loss, loss.item(), rtol=1e-12)
    np.testing.assert_allclose(want_grad, torch_grad, rtol=1e-12, atol=1e-15)
