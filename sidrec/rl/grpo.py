"""GRPO as MiniOneRec's ReReTrainer computes it, as pure functions: token log-probs of a group's
completions (its prompt run once), the per-token objective, and the rollout and update that run jitted
over one mesh and one copy of the weights.

Per prompt, a group is the G best hypotheses of a trie-constrained beam search (upstream: HF generate with
num_beams = num_return_sequences = G, length penalty 0, its constraint processor): sidrec.decode.beam's
ranking, so the rollout IS `beam_search`. Each completion is the generated suffix (SID tokens, "\\n",
EOS) up to and including its first EOS (upstream's completion mask). Rewards and advantages are computed
on device from token ids (sidrec.rl.rewards).

The loss per completion token t (upstream minionerec_trainer.py `compute_loss`):

    l_t = -(exp(logp_t - stop_grad(logp_t)) * A - beta * kl_t),   kl_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1

(the ratio is 1 in value, its gradient is grad logp; one update per rollout batch, so no clipping), reduced as
- "grpo" (upstream's default): mean over each completion's tokens, then over completions;
- "dapo" (upstream's `--dapo`): one token mean over all completions' tokens;
- "gspo" (upstream's `--gspo`): per completion s = exp(mean_t(logp - stop_grad(logp))), loss -(s * A - beta *
  mean_t kl), mean over completions.
Upstream averages the per-device means over devices and accumulation steps; with equal-sized micro-batches
that is the global mean computed here (`objective_terms` returns a numerator; the step divides once by the
global count, so accumulation and sharding do not change the result).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from sidrec import parallel
from sidrec.decode import beam
from sidrec.decode.trie import SidTrie
from sidrec.model import qwen2, vocab
from sidrec.rl import rewards

LossType = Literal["grpo", "dapo", "gspo"]
LOSS_TYPES = ("grpo", "dapo", "gspo")


# ----------------------------------------------------------------------------------------------------
# Completion rows and their log-probabilities


def completion_mask(completions: jax.Array, eos_id: int) -> jax.Array:
    """bool [..., C]: tokens up to and including the first EOS (upstream's completion mask)."""
    is_eos = completions == eos_id
    before = jnp.cumsum(is_eos, axis=-1) - is_eos  # EOS tokens strictly before t
    return before == 0


def token_logps(params, model_cfg: qwen2.Qwen2Config, prompt_tokens, prompt_mask, completions, *,
                unshard=None) -> jax.Array:
    """fp32 [p*G, C]: full-vocabulary log-softmax of each completion token [p, G, C] given the left-padded
    prompt [p, S] and the completion's earlier tokens; the prompt is run once per group
    (`qwen2.continuation_hidden`), not once per completion."""
    hidden = qwen2.continuation_hidden(params, model_cfg, prompt_tokens, prompt_mask, completions, unshard=unshard)
    head = qwen2.output_head(params, model_cfg, unshard=unshard)
    cross_entropy = vocab.cross_entropy(hidden.reshape(-1, hidden.shape[-1]), head, completions.reshape(-1),
                                        model_cfg.real_vocab_size)
    return -cross_entropy.reshape(-1, completions.shape[-1])


# ----------------------------------------------------------------------------------------------------
# The objective


def k3_kl(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    """Per-token KL(policy || reference) estimate exp(ref - logp) - (ref - logp) - 1 (>= 0)."""
    delta = ref_logp - logp
    return jnp.exp(delta) - delta - 1.0


def objective_terms(logp, ref_logp, advantages, mask, weights, *, beta: float, loss_type: LossType):
    """(numerator, kl numerator) of the loss over some completions; the loss is numerator / `loss_count`.

    logp, ref_logp, mask: [n, C]; advantages, weights: [n] (weight 0 drops a completion, e.g. dynamic
    sampling's zero-advantage groups).
    """
    mask = mask.astype(jnp.float32)
    kl = k3_kl(logp, ref_logp)
    tokens = jnp.maximum(mask.sum(-1), 1.0)
    seq_kl = (kl * mask).sum(-1) / tokens
    if loss_type == "gspo":
        ratio = jnp.exp(((logp - jax.lax.stop_gradient(logp)) * mask).sum(-1) / tokens)
        return jnp.sum(weights * -(ratio * advantages - beta * seq_kl)), jnp.sum(weights * seq_kl)
    ratio = jnp.exp(logp - jax.lax.stop_gradient(logp))
    per_token = -(ratio * advantages[:, None] - beta * kl) * mask
    if loss_type == "dapo":
        return jnp.sum(weights * per_token.sum(-1)), jnp.sum(weights * seq_kl)
    return jnp.sum(weights * per_token.sum(-1) / tokens), jnp.sum(weights * seq_kl)


def loss_count(mask, weights, loss_type: LossType):
    """What the summed objective is divided by: completions (grpo, gspo) or tokens (dapo)."""
    if loss_type == "dapo":
        return jnp.sum(weights * mask.astype(jnp.float32).sum(-1))
    return jnp.sum(weights)


# ----------------------------------------------------------------------------------------------------
# Rollouts (the constrained beam search) and the update, jitted over one mesh


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RLState:
    """What an RL step carries and a checkpoint stores: policy, optimizer state, reference, step."""

    params: Any
    opt_state: Any
    ref_params: Any
    step: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Rollout:
    """One rollout batch on device: P prompts, G completions each (beam order, best first)."""

    completions: jax.Array  # int32 [P, G, C]
    scores: jax.Array       # f32 [P, G] beam scores (summed log-probs)
    rewards: jax.Array      # f32 [P, G]
    advantages: jax.Array   # f32 [P, G]
    hit: jax.Array          # bool [P, G]: the completion is the target SID


def rollout(params, prompt_tokens, prompt_mask, target_ids, *, model_cfg, trie: SidTrie, group_size: int,
            reward_type: str) -> Rollout:
    """Beam-search G completions per prompt and score them (a pure function; jit it)."""
    sequences, scores = beam.beam_search(params, model_cfg, trie, prompt_tokens, prompt_mask,
                                         num_beams=group_size, constrained=True)
    depth = trie.num_steps - 2
    valid = scores > beam.DISALLOWED / 2  # hypotheses that left the trie carry upstream's -1e6
    sid_ids = sequences[..., :depth]
    reward = rewards.compute_rewards(reward_type, sid_ids, target_ids, valid)
    return Rollout(completions=sequences, scores=scores, rewards=reward, advantages=rewards.group_advantages(reward),
                   hit=rewards.exact_match(sid_ids, target_ids, valid))


def init_state(params, tx: optax.GradientTransformation) -> RLState:
    """Step 0: the reference is the starting policy (jit it, so the state has the update's own layout
    and the reference its own buffers)."""
    return RLState(params=params, opt_state=tx.init(params), ref_params=params, step=jnp.zeros((), jnp.int32))


UPDATE_KEYS = ("prompt_tokens", "prompt_mask", "completions", "advantages", "weights")


def make_update(model_cfg, tx: optax.GradientTransformation, mesh, partition_specs, *, beta: float,
                loss_type: LossType, eos_id: int) -> Callable:
    """`update(state, batch) -> (state, metrics)`: one optimizer step on a rollout batch laid out as
    micro-batches [A, p, ...] (p prompts each, split over every device; `parallel.summed_over_devices`)."""

    def local(unshard, params, ref_params, micro_batch):
        completions = micro_batch["completions"]
        prompt = (micro_batch["prompt_tokens"], micro_batch["prompt_mask"], completions)
        logp = token_logps(params, model_cfg, *prompt, unshard=unshard)
        ref_logp = jax.lax.stop_gradient(token_logps(ref_params, model_cfg, *prompt, unshard=unshard))
        mask = completion_mask(completions.reshape(-1, completions.shape[-1]), eos_id)
        loss, kl = objective_terms(logp, ref_logp, micro_batch["advantages"].reshape(-1), mask,
                                   micro_batch["weights"].reshape(-1), beta=beta, loss_type=loss_type)
        return loss, kl

    sharded = parallel.summed_over_devices(local, mesh, partition_specs, UPDATE_KEYS, n_param_trees=2)

    def mean_loss(loss_sum, kl_sum, count):
        return loss_sum / count, kl_sum

    def update(state: RLState, batch):
        micro_batches = {k: batch[k] for k in UPDATE_KEYS}
        flat_mask = completion_mask(batch["completions"], eos_id)
        count = jnp.maximum(loss_count(flat_mask.reshape(-1, flat_mask.shape[-1]), batch["weights"].reshape(-1),
                                       loss_type), 1.0)
        # 1/count rides on the cotangents inside the differentiated function (as the SFT step does),
        # not as a pass over every gradient.
        grad_fn = jax.value_and_grad(
            lambda params, mb: mean_loss(*sharded(params, state.ref_params, mb), count), has_aux=True)

        def accumulate(carry, micro_batch):
            loss_sum, kl_sum, grad_sum = carry
            (loss, kl), grads = grad_fn(state.params, micro_batch)
            return (loss_sum + loss, kl_sum + kl, jax.tree.map(jnp.add, grad_sum, grads)), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        (loss, kl_sum, grads), _ = jax.lax.scan(
            accumulate, (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros), micro_batches)
        grad_norm = optax.tree_utils.tree_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def apply(state):
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            return dataclasses.replace(state, params=optax.apply_updates(state.params, updates),
                                       opt_state=opt_state, step=state.step + 1)

        # A non-finite step leaves the state as it was; a cond rather than a select of every array.
        new_state = jax.lax.cond(finite, apply, lambda state: state, state)
        completions = jnp.maximum(jnp.sum(batch["weights"]), 1.0)
        return new_state, {"loss": loss, "kl": kl_sum / completions, "grad_norm": grad_norm, "finite": finite}

    return update


def sync_reference(state: RLState, alpha: float) -> RLState:
    """TRL's SyncRefModelCallback: ref <- alpha * policy + (1 - alpha) * ref."""
    ref = jax.tree.map(lambda p, r: alpha * p + (1.0 - alpha) * r, state.params, state.ref_params)
    return dataclasses.replace(state, ref_params=ref)


@dataclasses.dataclass(frozen=True)
class CompiledRL:
    """The jitted state functions of a run, all with one state layout (so nothing compiles twice)."""

    init_state: Callable      # params -> RLState
    update: Callable          # (state, batch) -> (state, metrics); donates the state
    sync_reference: Callable  # state -> state; donates the state
    abstract_state: RLState   # ShapeDtypeStructs with shardings (what a checkpoint restores into)


def compile_rl(model_cfg, tx: optax.GradientTransformation, mesh, partition_specs, *, beta: float,
               loss_type: LossType, eos_id: int, ref_sync_alpha: float) -> CompiledRL:
    param_shardings = parallel.shardings(mesh, partition_specs)
    init = partial(init_state, tx=tx)
    abstract_params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                   qwen2.abstract_params(model_cfg), param_shardings)
    state_shardings = jax.jit(init).lower(abstract_params).compile().output_shardings
    abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                  jax.eval_shape(init, abstract_params), state_shardings)
    update = make_update(model_cfg, tx, mesh, partition_specs, beta=beta, loss_type=loss_type, eos_id=eos_id)
    return CompiledRL(
        init_state=jax.jit(init, in_shardings=(param_shardings,), out_shardings=state_shardings),
        update=jax.jit(update, donate_argnums=0, out_shardings=(state_shardings, NamedSharding(mesh, P()))),
        sync_reference=jax.jit(partial(sync_reference, alpha=ref_sync_alpha), donate_argnums=0,
                               out_shardings=state_shardings),
        abstract_state=abstract_state)

