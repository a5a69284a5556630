"""Checkpointer (Orbax): sharded round trip, retention, crash leftovers, errors; PreemptionGuard."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sidrec.checkpoint import (
    Checkpointer,
    CheckpointError,
    CheckpointMismatchError,
    NoCheckpointError,
    PreemptionGuard,
)

REPO = Path(__file__).parents[1]

# Runs in its own process: the 8 fake CPU devices must be requested before jax is imported, and
# other test modules import jax first in this process.
SHARDED_ROUND_TRIP = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    from sidrec.checkpoint import Checkpointer

    mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(AxisType.Explicit,) * 2)
    fsdp_rows = NamedSharding(mesh, P("fsdp", None))
    params = {"embed": jax.device_put(jnp.arange(64.0).reshape(16, 4), fsdp_rows),
              "norm": jax.device_put(jnp.linspace(0.0, 1.0, 4), NamedSharding(mesh, P()))}
    opt_state = optax.adam(1e-3).init(params)
    state = {"params": params, "opt_state": opt_state, "step": jnp.array(7, jnp.int32)}

    # The target puts the matrix on a different layout than it was saved with (columns over fsdp,
    # rows over data) and replicates everything else: Orbax must reshard while reading.
    def target_sharding(leaf):
        spec = P("data", "fsdp") if leaf.ndim == 2 else P()
        return NamedSharding(mesh, spec)
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=target_sharding(x)), state)

    with Checkpointer(sys.argv[1]) as ckpt:
        ckpt.save(7, state, {"epoch": 1, "step_in_epoch": 3, "rng": [0, 42]})
        ckpt.wait()
    with Checkpointer(sys.argv[1]) as ckpt:  # a fresh process would see exactly this
        restored, meta = ckpt.restore(7, abstract)
        params_only, _ = ckpt.restore(7, {"params": abstract["params"]}, partial=True)

    assert meta == {"epoch": 1, "step_in_epoch": 3, "rng": [0, 42]}, meta
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for got, want, spec in zip(jax.tree.leaves(restored), jax.tree.leaves(state),
                               jax.tree.leaves(abstract)):
        assert got.sharding == spec.sharding, (got.sharding, spec.sharding)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert restored["params"]["embed"].sharding.spec == P("data", "fsdp")
    assert set(params_only) == {"params"}
    assert params_only["params"]["embed"].sharding == abstract["params"]["embed"].sharding
    np.testing.assert_array_equal(np.asarray(params_only["params"]["embed"]),
                                  np.arange(64.0).reshape(16, 4))
    print("OK", len(jax.devices()))
""")


def test_sharded_round_trip_restores_into_target_shardings(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", SHARDED_ROUND_TRIP, str(tmp_path / "ckpt")],
                            check=False, capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-2:] == ["OK", "8"]


def small_state(value: float):
    params = {"w": jnp.full((4, 3), value, jnp.float32), "b": jnp.zeros(3)}
    return {"params": params, "opt_state": optax.adam(1e-3).init(params), "step": jnp.array(0)}


def abstract_of(state):
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)


def test_keeps_last_k_and_the_best_even_when_older(tmp_path):
    losses = {1: 3.0, 2: 1.0, 3: None, 4: 2.0, 5: None, 6: 5.0}
    with Checkpointer(tmp_path, keep_last=2) as ckpt:
        for step, loss in losses.items():
            assert ckpt.save(step, small_state(step), {"step": step}, metric=loss)
        ckpt.wait()
        assert ckpt.all_steps() == [2, 5, 6]
        assert (ckpt.best_step(), ckpt.latest_step()) == (2, 6)
        assert (ckpt.step_for("best"), ckpt.step_for("last")) == (2, 6)
        assert not ckpt.save(6, small_state(0.0), {})  # already saved: skipped, not overwritten
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["2", "5", "6"]
    with Checkpointer(tmp_path, keep_last=2) as reopened:  # ranking survives a restart
        assert (reopened.best_step(), reopened.latest_step()) == (2, 6)
        state, meta = reopened.restore(2, abstract_of(small_state(0.0)))
    assert meta == {"step": 2}
    np.testing.assert_array_equal(np.asarray(state["params"]["w"]), np.full((4, 3), 2.0))


def test_mode_max_keeps_the_largest(tmp_path):
    with Checkpointer(tmp_path, keep_last=1, best_metric="hr@10", mode="max") as ckpt:
        for step, hr in [(1, 0.1), (2, 0.4), (3, 0.2), (4, 0.3)]:
            ckpt.save(step, small_state(step), {}, metric=hr)
        ckpt.wait()
        assert ckpt.all_steps() == [2, 4]
        assert ckpt.best_step() == 2


@pytest.mark.parametrize("mode, metrics", [("max", [0.3, 0.1, 0.3, 0.3]), ("min", [0.3, 0.5, 0.3, 0.3])])
def test_of_equal_metrics_the_earliest_step_is_best(tmp_path, mode, metrics):
    """A training loop keeps its best with a strict `metric > best` (RL: the start, step 0, stays best
    when no step beats it); "best" must name the same step, not the latest of the ties."""
    with Checkpointer(tmp_path, keep_last=1, best_metric="m", mode=mode) as ckpt:
        for step, value in enumerate(metrics):
            ckpt.save(step, small_state(step), {}, metric=value)
        ckpt.wait()
        assert ckpt.best_step() == 0 and ckpt.all_steps() == [0, 3]


def test_async_save_survives_donation_and_is_committed_by_wait(tmp_path):
    state = small_state(1.5)
    expected = jax.tree.map(np.asarray, state)
    abstract = abstract_of(state)
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.save(10, state, {"epoch": 0})
        for leaf in jax.tree.leaves(state):  # what donating the state to the next step does
            leaf.delete()
        ckpt.wait()
        assert not any("tmp" in p.name for p in tmp_path.iterdir())
        restored, meta = ckpt.restore(10, abstract)
    assert meta == {"epoch": 0}
    assert jax.tree.structure(restored) == jax.tree.structure(state)  # optax namedtuples kept
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(got), want)


def test_step_that_crashed_mid_save_is_ignored(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(3, small_state(3.0), {"step": 3})
    # What a process killed during Orbax's write leaves behind: a temporary step directory.
    leftover = tmp_path / "5.orbax-checkpoint-tmp-1700000000000000"
    (leftover / "state").mkdir(parents=True)
    (leftover / "state" / "garbage").write_bytes(b"\x00" * 16)
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.all_steps() == [3]
        assert ckpt.step_for("last") == 3
        assert ckpt.restore_meta(3) == {"step": 3}
        assert ckpt.save(5, small_state(5.0), {"step": 5})  # the step can be saved again
        ckpt.wait()
        assert ckpt.all_steps() == [3, 5]
    assert not leftover.exists()


def test_restore_into_different_tree_lists_every_mismatch(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, {"w": jnp.ones((4, 3)), "b": jnp.zeros(3), "old": jnp.zeros(2)}, {})
        ckpt.wait()
        target = abstract_of({"w": jnp.ones((3, 4)), "b": jnp.zeros(3, jnp.int32), "new": jnp.zeros(2)})
        with pytest.raises(CheckpointMismatchError) as error:
            ckpt.restore(1, target)
    message = str(error.value)
    assert "4 difference(s)" in message
    assert "w: shape (4, 3) in the checkpoint, (3, 4) in the target" in message
    assert "b: dtype float32 in the checkpoint, int32 in the target" in message
    assert "new: in the target, not in the checkpoint" in message
    assert "old: in the checkpoint, not in the target" in message


def test_restore_target_without_sharding_is_refused(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, {"w": jnp.ones(2)}, {})
        ckpt.wait()
        with pytest.raises(CheckpointError, match="without a sharding: \\['w'\\]"):
            ckpt.restore(1, {"w": jax.ShapeDtypeStruct((2,), jnp.float32)})


def test_user_errors_are_clear(tmp_path):
    with Checkpointer(tmp_path / "empty") as ckpt:
        with pytest.raises(NoCheckpointError, match="empty: no checkpoints"):
            ckpt.step_for("best")
        with pytest.raises(CheckpointError, match="which='first'"):
            ckpt.step_for("first")
        with pytest.raises(CheckpointError, match="valid_loss=nan is not finite"):
            ckpt.save(1, {"w": jnp.ones(2)}, {}, metric=float("nan"))
        with pytest.raises(CheckpointError, match="meta is not JSON-serializable"):
            ckpt.save(1, {"w": jnp.ones(2)}, {"rng": np.zeros(2)})
        assert ckpt.all_steps() == []
        ckpt.save(1, {"w": jnp.ones(2)}, {})
        with pytest.raises(NoCheckpointError, match="no checkpoint for step 9; available: \\[1\\]"):
            ckpt.restore_meta(9)
    with pytest.raises(CheckpointError, match="keep_last=0"):
        Checkpointer(tmp_path / "x", keep_last=0)


def test_preemption_guard_sets_flag_and_restores_handlers():
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    with PreemptionGuard() as guard:
        assert not guard.requested and not guard.should_stop(0)
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.requested and guard.should_stop(1)
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_second_interrupt_is_not_swallowed():
    with pytest.raises(KeyboardInterrupt), PreemptionGuard() as guard:
        signal.raise_signal(signal.SIGINT)
        assert guard.requested
        signal.raise_signal(signal.SIGINT)  # the user insists: interrupt as without a guard
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
