"""Muon overhead: training-step time with Muon (optax.contrib.muon and our local chain) relative to
AdamW, on the train benchmark's model and batch; and the optimizer update alone (same parameters,
gradients of the same shapes), where the difference is not diluted by the forward/backward pass.

    python -m bench.muon_overhead
"""

from __future__ import annotations

import jax
import optax

from bench import common
from bench.train_speed import OurStep, bench_config
from sidrec import optim
from sidrec.model import qwen2

OPTIMIZERS = {"adamw": ("adamw", "optax"), "muon (optax)": ("muon", "optax"), "muon (local)": ("muon", "local")}


def update_only(step: OurStep):
    """A blocking callable running just the optimizer update + apply on the step's parameters."""
    trainer = step.trainer
    tx, _ = optim.build_optimizer(trainer.cfg.optim, qwen2.flat_specs(trainer.model_cfg), trainer.total_steps)
    params = step.state.params
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(0), p.shape, p.dtype) * 1e-3, params)
    opt_state = tx.init(params)

    @jax.jit
    def update(params, grads, opt_state):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    jax.block_until_ready(update(params, grads, opt_state))
    return lambda: jax.block_until_ready(update(params, grads, opt_state))


def main(seq_len: int = 1024, examples: int = 8, repeats: int = 2) -> None:
    steps = {name: OurStep.build(bench_config(seq_len, examples, *choice)) for name, choice in OPTIMIZERS.items()}
    first_s = {name: common.seconds(step) for name, step in steps.items()}
    step_times = common.alternate(steps, repeats)
    updates = {name: update_only(step) for name, step in steps.items()}
    update_times = common.alternate(updates, 5)
    rows = []
    for name in OPTIMIZERS:
        step_s, update_s = common.median(step_times[name]), common.median(update_times[name])
        rows.append({"optimizer": name, "step_s": step_s, "first_step_s": first_s[name], "update_s": update_s,
                     "step_ratio": step_s / common.median(step_times["adamw"]),
                     "update_ratio": update_s / common.median(update_times["adamw"])})
    stats = steps["adamw"].stats
    common.write_result("muon_overhead", {"seq_len": seq_len, "examples": examples, "repeats": repeats,
                                          "rows": stats["rows"], "model": "as train_speed"},
                        {"optimizers": rows, "step_times_s": step_times, "update_times_s": update_times})
    print(common.table(rows, [("optimizer", "optimizer", ""), ("step_s", "step s", ".2f"),
                              ("step_ratio", "step / AdamW", ".2f"), ("update_s", "update s", ".3f"),
                              ("update_ratio", "update / AdamW", ".2f")]))


if __name__ == "__main__":
    import tyro

    tyro.cli(main)
