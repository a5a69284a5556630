"""Optimizers and schedules against references nobody here wrote: Hugging Face's schedule formulas,
optax.adamw / optax.contrib.muon used directly, torch.optim.AdamW, and a NumPy statement of Muon."""

import functools
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sidrec.config import ConfigError, OptimConfig
from sidrec.model import qwen2
from sidrec.optim import (
    OptimizerInfo,
    build_optimizer,
    lr_schedule,
    orthogonalize_per_matrix,
)

L, D, H, K, HD, F, V = 2, 16, 2, 1, 8, 24, 32
SHAPES = {
    "embed": (V, D),
    "layers": {
        "attn_norm": (L, D), "wq": (L, D, H * HD), "bq": (L, H * HD), "wk": (L, D, K * HD),
        "bk": (L, K * HD), "wv": (L, D, K * HD), "bv": (L, K * HD), "wo": (L, H * HD, D),
        "mlp_norm": (L, D), "w_gate": (L, D, F), "w_up": (L, D, F), "w_down": (L, F, D),
    },
    "final_norm": (D,),
    "lm_head": (D, V),
}
# The Qwen2 whose declaration has exactly these shapes (optimizer routing reads its roles).
MODEL = qwen2.Qwen2Config(vocab_size=V, real_vocab_size=V, hidden_size=D, intermediate_size=F, num_layers=L,
                          num_heads=H, num_kv_heads=K, head_dim=HD, tie_word_embeddings=False)
SPECS = qwen2.flat_specs(MODEL)
MUON_PATHS = {f"layers/{n}" for n in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")}
NO_DECAY_PATHS = {"layers/attn_norm", "layers/mlp_norm", "final_norm", "layers/bq", "layers/bk", "layers/bv"}
NS = (3.4445, -4.7750, 2.0315)
# Grad scales per step chosen so that clip_norm=50 is inactive at step 0 (|g| ~ 7) and active after.
GRAD_SCALES = (0.1, 1.0, 10.0)
CLIP = 50.0


def _is_shape(x):
    return isinstance(x, tuple)


def tiny_params(seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s), jnp.float32), SHAPES, is_leaf=_is_shape)


def tiny_grads(step):
    rng = np.random.default_rng(100 + step)
    return jax.tree.map(lambda s: jnp.asarray(GRAD_SCALES[step] * rng.normal(size=s), jnp.float32),
                        SHAPES, is_leaf=_is_shape)


def flat(tree) -> dict[str, np.ndarray]:
    return {"/".join(str(k.key) for k in path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def run_steps(tx, params, steps=3):
    """Parameters after each of `steps` optimizer steps (jitted, as the trainer runs them)."""
    state = tx.init(params)

    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    history = []
    for i in range(steps):
        params, state = step(params, state, tiny_grads(i))
        history.append(flat(params))
    return history


# HF transformers.optimization, written out: lr_lambda(step) multiplies the peak lr.
def hf_linear(step, warmup, total):
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def hf_cosine(step, warmup, total, num_cycles=0.5):
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * num_cycles * 2.0 * progress)))


def hf_constant(step, warmup, total):
    return step / max(1.0, warmup) if step < warmup else 1.0


HF = {"linear": hf_linear, "cosine": hf_cosine, "constant": hf_constant}


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
@pytest.mark.parametrize("warmup,total", [(20, 100), (0, 7), (3, 3), (5, 4)])
def test_schedules_match_hugging_face(kind, warmup, total):
    schedule = lr_schedule(OptimConfig(schedule=kind, warmup_steps=warmup, lr=3e-4), total)
    steps = np.arange(total + 1)
    ours = np.asarray(jax.vmap(schedule)(steps))
    want = np.array([3e-4 * HF[kind](int(s), warmup, total) for s in steps])
    # fp32 schedule vs Python doubles: a few fp32 ulps (rtol 1e-6), and near the end of the cosine,
    # where 1 + cos(x) cancels, 1e-7 of the peak lr in absolute terms.
    np.testing.assert_allclose(ours, want, rtol=1e-6, atol=1e-7 * 3e-4)
    if warmup:
        assert ours[0] == 0.0  # upstream's first step trains with lr 0
    if kind != "constant" and total > warmup:
        assert ours[total] == 0.0 and ours[warmup] == pytest.approx(3e-4)


def test_labels_route_attention_and_mlp_matrices_to_muon():
    # From the roles of the model's own declaration: attention and MLP matrices to Muon, the rest AdamW.
    _, info = build_optimizer(OptimConfig(name="muon"), SPECS, 10)
    assert {p for p, g in info.labels.items() if g == "muon"} == MUON_PATHS
    assert {p for p, g in info.labels.items() if g == "adamw"} == set(SPECS) - MUON_PATHS
    assert {p for p, i in SPECS.items() if i.role in ("norm", "bias")} == NO_DECAY_PATHS
    _, adamw = build_optimizer(OptimConfig(name="adamw"), SPECS, 10)
    assert set(adamw.labels.values()) == {"adamw"}
    # The declaration has the shapes the tests' tiny trees use.
    assert {name: i.shape for name, i in SPECS.items()} == {name: a.shape for name, a in flat(tiny_params()).items()}


# ---------------------------------------------------------------------------------------------
# Shared set-up: lr 1 (aux 0.5) makes every update O(1), so absolute tolerances are not shrunk by lr.

LOCAL = {"name": "muon", "impl": "local", "lr": 1.0, "aux_lr": 0.5, "weight_decay": 0.1,
         "clip_norm": CLIP, "schedule": "linear", "warmup_steps": 1}
TOTAL = 4  # lr factors over the 3 steps: 0 (warmup), 1, 2/3


def hf_linear_optax(peak):
    """HF's linear schedule for warmup=1, total=TOTAL, built from optax's own pieces."""
    return optax.join_schedules([optax.linear_schedule(0.0, peak, 1),
                                 optax.linear_schedule(peak, 0.0, TOTAL - 1)], [1])


@functools.cache
def optax_adamw_history():
    """optax.adamw used directly at the aux lr, clipped, norms and biases not decayed (as HF)."""
    decays = jax.tree_util.tree_map_with_path(
        lambda path, _: "/".join(str(k.key) for k in path) not in NO_DECAY_PATHS, tiny_params())
    tx = optax.chain(optax.clip_by_global_norm(CLIP), optax.adamw(
        hf_linear_optax(LOCAL["aux_lr"]), weight_decay=LOCAL["weight_decay"], mask=decays))
    return run_steps(tx, tiny_params())


def assert_adamw_leaves_match_optax_adamw(history, info):
    """Both Muons send exactly embed, lm_head, norms and biases to AdamW at aux_lr."""
    assert {p for p, g in info.labels.items() if g == "muon"} == MUON_PATHS
    for got, ref in zip(history, optax_adamw_history()):
        for k in set(ref) - MUON_PATHS:
            # The same optax ops; only the schedule's fp32 arithmetic differs (ours vs optax's
            # join_schedules), by an ulp of the lr: 1e-6 absolute on O(1) parameters.
            np.testing.assert_allclose(got[k], ref[k], atol=1e-6, rtol=0, err_msg=k)
    for k in MUON_PATHS:  # ... and no Muon matrix got the AdamW update (step 0 has lr 0: see the last)
        assert np.abs(history[-1][k] - optax_adamw_history()[-1][k]).max() > 1e-3, k


# ---------------------------------------------------------------------------------------------
# Local Muon vs a NumPy statement of the rule (float64)

def np_newton_schulz(m):
    x = m.T if m.shape[0] > m.shape[1] else m
    x = x / (np.linalg.norm(x) + 1e-7)
    for _ in range(5):
        a = x @ x.T
        x = NS[0] * x + (NS[1] * a + NS[2] * a @ a) @ x
    return x.T if m.shape[0] > m.shape[1] else x


def np_scale(fan_in, fan_out, kind):
    return {"none": 1.0, "shape": max(1.0, fan_out / fan_in) ** 0.5, "rms": 0.2 * max(fan_in, fan_out) ** 0.5}[kind]


def numpy_muon_adamw(params, scale_kind, steps=3):
    """Clip over the whole gradient; Muon (Keller Jordan) on MUON_PATHS; torch AdamW on the rest."""
    p = {k: v.astype(np.float64) for k, v in flat(params).items()}
    buf = {k: np.zeros_like(v) for k, v in p.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v2 = {k: np.zeros_like(v) for k, v in p.items()}
    b1, b2, eps, wd = 0.9, 0.999, 1e-8, LOCAL["weight_decay"]
    history = []
    for t in range(steps):
        g = {k: x.astype(np.float64) for k, x in flat(tiny_grads(t)).items()}
        norm = math.sqrt(sum((x ** 2).sum() for x in g.values()))
        if norm > CLIP:
            g = {k: x * CLIP / norm for k, x in g.items()}
        factor = hf_linear(t, LOCAL["warmup_steps"], TOTAL)
        for k, gk in g.items():
            if k in MUON_PATHS:
                lr = LOCAL["lr"] * factor
                buf[k] = 0.95 * buf[k] + gk
                u = gk + 0.95 * buf[k]
                o = np.stack([np_newton_schulz(u[layer]) for layer in range(L)])
                o *= np_scale(u.shape[1], u.shape[2], scale_kind)  # stored [in, out]
                p[k] = p[k] - lr * wd * p[k] - lr * o
            else:
                lr = LOCAL["aux_lr"] * factor
                m[k] = b1 * m[k] + (1 - b1) * gk
                v2[k] = b2 * v2[k] + (1 - b2) * gk ** 2
                if k not in NO_DECAY_PATHS:
                    p[k] = p[k] * (1 - lr * wd)
                denom = np.sqrt(v2[k] / (1 - b2 ** (t + 1))) + eps
                p[k] = p[k] - lr * (m[k] / (1 - b1 ** (t + 1))) / denom
        history.append({k: x.copy() for k, x in p.items()})
    return history


# Each variant costs a compilation (seconds on a shared 2-core box): the default runs fast, the
# other scalings, a static factor on the same code path, run with -m slow.
@pytest.mark.parametrize("scale_kind", ["shape", pytest.param("rms", marks=pytest.mark.slow),
                                        pytest.param("none", marks=pytest.mark.slow)])
def test_local_muon_matches_numpy_reference(scale_kind):
    params = tiny_params()
    tx, info = build_optimizer(OptimConfig(**LOCAL, muon_scale=scale_kind), SPECS, TOTAL)
    ours = run_steps(tx, params)
    for step, (got, ref) in enumerate(zip(ours, numpy_muon_adamw(params, scale_kind))):
        for k in ref:
            # fp32 vs float64 after 5 Newton-Schulz iterations (a few fp32 matmuls each) on O(1)
            # updates: errors are ~1e-6; 1e-5 absolute still catches any change of the rule.
            np.testing.assert_allclose(got[k], ref[k], atol=1e-5, rtol=0, err_msg=f"step {step} {k}")
    # The comparison is not vacuous: Muon moved every matrix by O(lr) per step.
    assert np.abs(ours[-1]["layers/wq"] - flat(params)["layers/wq"]).max() > 0.1
    assert_adamw_leaves_match_optax_adamw(ours, info)


def test_newton_schulz_orthogonalises_each_layer_in_fp32_and_bf16():
    update = tiny_grads(0)["layers"]["w_down"]  # [L, 24, 16]: tall, so run transposed
    fp32 = orthogonalize_per_matrix(update, 5)
    bf16 = orthogonalize_per_matrix(update, 5, jnp.bfloat16)
    assert fp32.dtype == bf16.dtype == jnp.float32 and fp32.shape == update.shape
    for result in (fp32, bf16):
        for layer in range(L):
            singular = np.linalg.svd(np.asarray(result[layer]), compute_uv=False)
            # Keller Jordan's coefficients trade exactness for speed: singular values land in a band
            # around 1 (about 0.68..1.13), not on it; the input's 7x spread is gone.
            assert singular.min() > 0.6 and singular.max() < 1.2, singular
    # Within that band bf16 rounding moves singular values around (~5% relative here); a wrong
    # transpose or normalisation would be off by O(1).
    assert np.linalg.norm(bf16 - fp32) / np.linalg.norm(fp32) < 0.1


# ---------------------------------------------------------------------------------------------
# optax variant vs optax.contrib.muon used directly

@pytest.mark.parametrize("scale_kind", ["shape", pytest.param("rms", marks=pytest.mark.slow)])
def test_optax_muon_matches_optax_contrib_muon(scale_kind):
    params = tiny_params()
    cfg = OptimConfig(**{**LOCAL, "impl": "optax"}, muon_scale=scale_kind)
    tx, info = build_optimizer(cfg, SPECS, TOTAL)
    dims = jax.tree_util.tree_map_with_path(
        lambda path, _: (optax.contrib.MuonDimensionNumbers(reduction_axis=1, output_axis=2)
                         if "/".join(str(k.key) for k in path) in MUON_PATHS else None), params)
    direct = optax.chain(optax.clip_by_global_norm(CLIP), optax.contrib.muon(
        learning_rate=hf_linear_optax(cfg.lr), beta=0.95, ns_steps=5, weight_decay=cfg.weight_decay,
        muon_weight_dimension_numbers=dims, consistent_rms=0.2 if scale_kind == "rms" else None))
    ours = run_steps(tx, params)
    for got, ref in zip(ours, run_steps(direct, params)):
        for k in MUON_PATHS:
            # Same optax code on the same inputs; 1e-6 allows for the schedules' fp32 arithmetic.
            np.testing.assert_allclose(got[k], ref[k], atol=1e-6, rtol=0, err_msg=k)
    # optax.contrib.muon's own Adam is NAdam (it shares `nesterov`), so our AdamW leaves are
    # checked against optax.adamw instead.
    assert_adamw_leaves_match_optax_adamw(ours, info)


# ---------------------------------------------------------------------------------------------
# AdamW

ADAMW = {"name": "adamw", "lr": LOCAL["aux_lr"], "weight_decay": LOCAL["weight_decay"], "clip_norm": CLIP,
         "warmup_steps": 1}


@functools.cache
def our_adamw_history():
    tx, info = build_optimizer(OptimConfig(**ADAMW), SPECS, TOTAL)
    assert set(info.labels.values()) == {"adamw"}
    return run_steps(tx, tiny_params())


def test_adamw_equals_optax_adamw_with_clipping():
    for got, ref in zip(our_adamw_history(), optax_adamw_history()):
        for k in ref:
            np.testing.assert_allclose(got[k], ref[k], atol=1e-6, rtol=0, err_msg=k)  # as above


@pytest.mark.torch
def test_adamw_matches_torch_adamw_as_hf_trainer_runs_it():
    torch = pytest.importorskip("torch")
    params, ours = tiny_params(), our_adamw_history()
    tensors = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in flat(params).items()}
    groups = [{"params": [t for k, t in tensors.items() if k not in NO_DECAY_PATHS], "weight_decay": ADAMW["weight_decay"]},
              {"params": [t for k, t in tensors.items() if k in NO_DECAY_PATHS], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=ADAMW["lr"], betas=(0.9, 0.999), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: hf_linear(s, 1, TOTAL))
    for step in range(3):
        for k, g in flat(tiny_grads(step)).items():
            tensors[k].grad = torch.tensor(g, dtype=torch.float64)
        torch.nn.utils.clip_grad_norm_(list(tensors.values()), CLIP)
        opt.step()
        sched.step()
        for k, t in tensors.items():
            # fp32 (ours) vs float64 torch on O(1) values with lr 0.5; torch's clip adds 1e-6 to the
            # norm (optax does not), a relative 1e-8 difference: 1e-5 covers both.
            np.testing.assert_allclose(ours[step][k], t.detach().numpy(), atol=1e-5, rtol=0,
                                       err_msg=f"step {step} {k}")


def test_clipping_bounds_the_gradient_the_optimizer_sees():
    params = {k: tiny_params()[k] for k in ("embed", "final_norm")}  # small: eager ops compile each
    huge = {k: 1e6 * tiny_grads(1)[k] for k in params}
    tx, _ = build_optimizer(OptimConfig(name="adamw", clip_norm=1.0), SPECS, 10)
    _, state = tx.update(huge, tx.init(params), params)
    mu = optax.tree.get(state, "mu")
    # Adam's first moment after one step is (1 - b1) * clipped grad: its global norm is 0.1 * 1.0.
    assert float(optax.tree.norm(mu)) == pytest.approx(0.1, rel=1e-5)
    tx_off, _ = build_optimizer(OptimConfig(name="adamw", clip_norm=0.0), SPECS, 10)
    _, state = tx_off.update(huge, tx_off.init(params), params)
    assert float(optax.tree.norm(optax.tree.get(state, "mu"))) > 1e6


# ---------------------------------------------------------------------------------------------
# Info and errors

def test_info_counts_describe_and_learning_rates():
    params = tiny_params()
    _, info = build_optimizer(OptimConfig(name="muon", lr=3e-3, aux_lr=3e-4, warmup_steps=20), SPECS, 100)
    assert isinstance(info, OptimizerInfo)
    counts = info.group_counts()
    muon_params = sum(math.prod(SHAPES["layers"][p.split("/")[1]]) for p in MUON_PATHS)
    all_params = sum(v.size for v in flat(params).values())
    assert counts["muon"] == {"tensors": 7, "matrices": 7 * L, "params": muon_params}
    assert counts["adamw"] == {"tensors": 8, "matrices": 0, "params": all_params - muon_params}
    text = info.describe()
    assert "muon (optax)" in text and f"{muon_params:,} params" in text and "layers/w_down" in text
    assert {k: float(v) for k, v in info.learning_rates(0).items()} == {"muon": 0.0, "adamw": 0.0}
    lrs = info.learning_rates(20)
    assert float(lrs["muon"]) == pytest.approx(3e-3) and float(lrs["adamw"]) == pytest.approx(3e-4)
    _, adamw_info = build_optimizer(OptimConfig(name="adamw"), SPECS, 100)
    assert set(adamw_info.learning_rates(5)) == {"adamw"}


def test_user_mistakes_raise_config_errors():
    with pytest.raises(ConfigError, match="muon-scale none"):
        build_optimizer(OptimConfig(name="muon", impl="optax", muon_scale="none"), SPECS, 10)
    with pytest.raises(ConfigError, match="max-steps"):
        build_optimizer(OptimConfig(), SPECS, 0)
    with pytest.raises(ConfigError, match="no parameter is a Muon matrix"):
        build_optimizer(OptimConfig(name="muon"), {"embed": SPECS["embed"]}, 10)


# ---------------------------------------------------------------------------------------------
# Sharded arrays inside jit, donated state (8 fake CPU devices, in a subprocess)

SHARDED_SCRIPT = """
import sys, jax, numpy as np, optax
from test_optim import tiny_params, tiny_grads, flat, numpy_muon_adamw, TOTAL, LOCAL, SPECS
from sidrec.config import OptimConfig
from sidrec.optim import build_optimizer


def fsdp_mesh(n):
    return jax.make_mesh((n,), ("fsdp",), devices=jax.devices()[:n],
                         axis_types=(jax.sharding.AxisType.Auto,))  # as sidrec.parallel


def spec(x, mesh):  # shard the first axis that 8 divides, as FSDP would
    axes = [None] * x.ndim
    divisible = [i for i, n in enumerate(x.shape) if n % 8 == 0]
    if divisible:
        axes[divisible[0]] = "fsdp"
    return jax.NamedSharding(mesh, jax.P(*axes))


def final_params(tx, mesh):
    place = lambda tree: jax.tree.map(lambda x: jax.device_put(x, spec(x, mesh)), tree)

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    step = jax.jit(step, donate_argnums=(0, 1))
    params = place(tiny_params())
    state = tx.init(params)
    for i in range(3):
        params, state = step(params, state, place(tiny_grads(i)))
    for x in jax.tree.leaves(params):  # donated, and still sharded as given
        assert x.sharding.is_equivalent_to(spec(x, mesh), x.ndim), (x.shape, x.sharding)
    return flat(params)


tx, _ = build_optimizer(OptimConfig(**{**LOCAL, "impl": sys.argv[1]}), SPECS, TOTAL)
ours = final_params(tx, fsdp_mesh(8))
if sys.argv[1] == "local":
    want = numpy_muon_adamw(tiny_params(), "shape")[-1]
else:
    want = final_params(tx, fsdp_mesh(1))
print(max(float(np.abs(ours[k] - want[k]).max()) for k in ours))
"""


@pytest.mark.parametrize("impl", ["local", pytest.param("optax", marks=pytest.mark.slow)])
def test_sharded_jit_with_donation_matches_unsharded(impl):
    """FSDP-sharded params and state, jitted and donated: local Muon vs the NumPy reference,
    optax Muon vs itself on one device."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), str(Path(__file__).parents[1])])}
    out = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT, impl], check=False, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    # Sharded reductions (norms, matmuls) sum in another order: fp32 rounding of O(1) values (lr 1).
    assert float(out.stdout.split()[-1]) < 1e-5
