"""FSDP and data parallelism give the one-device numbers, for the SFT step and the RL update; grad
accumulation equals one big batch; the step compiles once per batch shape. Runs
tests/scripts/fsdp_equivalence.py in its own process (8 fake CPU devices must be requested before jax
is imported)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "scripts" / "fsdp_equivalence.py"


def run_script(slow: bool) -> dict:
    env = dict(os.environ, SIDREC_SLOW="1" if slow else "0")
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def measured():
    return run_script(slow=False)


def test_loss_and_gradients_match_one_device(measured):
    # fp32 with matmul precision "highest": only the reduction order differs (psum of per-device
    # sums, reduce-scattered gradients), so differences are rounding-level; the bound is 1e-5.
    for layout in ("fsdp8", "data2_fsdp4"):
        assert measured[f"{layout}_loss_diff"] <= 1e-5
        assert measured[f"{layout}_grad_diff"] <= 1e-5


def test_gradients_come_back_sharded_like_the_parameters(measured):
    assert measured["embed_grad_sharding"] == "P('fsdp', None)"
    assert measured["wq_grad_sharding"] == "P(None, 'fsdp')"


def test_adamw_steps_match_one_device(measured):
    assert measured["adamw_param_change"] > 1e-3  # the steps really moved the parameters
    for layout in ("fsdp8",):
        assert measured[f"adamw_{layout}_steps_loss_diff"] <= 1e-5
        assert measured[f"adamw_{layout}_steps_param_diff"] <= 1e-5
        # Hardware-independent form (see fsdp_equivalence.py): a sharding bug moves params by O(lr).
        assert measured[f"adamw_{layout}_steps_param_diff"] <= 1e-3 * measured["adamw_param_change"]


def test_step_compiles_once_per_batch_shape(measured):
    for layout in ("fsdp8",):
        assert measured[f"adamw_{layout}_compiles"] == 1


def test_grad_accumulation_equals_one_big_batch(measured):
    # SGD step of 4 micro-batches x 2 rows vs 1 x 8 rows: same gradient up to fp32 summation order.
    assert measured["accum_step_global_rel_diff"] <= 1e-6
    assert measured["accum_step_worst_leaf_rel_diff"] <= 1e-5


def test_rl_update_matches_one_device(measured):
    # The same fp32 rounding-level bound as the SFT gradients; the KL term is live (reference moved away).
    assert measured["rl_kl"] > 1e-4 and measured["rl_grad_max"] > 1e-3
    assert measured["rl_data2_fsdp4_loss_diff"] <= 1e-5
    assert measured["rl_data2_fsdp4_kl_diff"] <= 1e-5
    assert measured["rl_data2_fsdp4_grad_diff"] <= 1e-5


@pytest.mark.slow
def test_muon_steps_match_one_device():
    measured = run_script(slow=True)
    # Newton-Schulz amplifies reduction-order rounding of the sharded matmuls (5 quintic iterations),
    # so Muon's parameters agree to ~1e-4 of a 1e-2 learning-rate step, not to rounding level.
    for layout in ("fsdp8", "data2_fsdp4"):
        assert measured[f"muon_{layout}_steps_loss_diff"] <= 1e-5
        assert measured[f"muon_{layout}_steps_param_diff"] <= 3e-4
        assert measured[f"muon_{layout}_compiles"] == 1
