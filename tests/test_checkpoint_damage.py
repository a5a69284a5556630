"""Damaged checkpoints: a committed step whose files were cut, removed or altered is never trusted;
`restore_latest` falls back to the newest intact step and names the damaged one."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sidrec.checkpoint import Checkpointer, DamagedCheckpointError, fingerprints


def state_of(step: int):
    rng = np.random.default_rng(step)
    return {"params": {"w": jnp.asarray(rng.standard_normal((64, 32), np.float32)),
                       "b": jnp.asarray(rng.standard_normal(32, np.float32))},
            "rng": jax.random.key_data(jax.random.key(step)), "step": jnp.array(step, jnp.int32)}


def abstract_of(state):
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)


def save_steps(directory, steps=(1, 2, 3)):
    with Checkpointer(directory, keep_last=len(steps)) as ckpt:
        for step in steps:
            ckpt.save(step, state_of(step), {"step": step})
        ckpt.wait()


def largest_file(directory):
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def truncate(step_dir):
    path = largest_file(step_dir / "state")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def remove_metadata(step_dir):
    (step_dir / "state" / "_METADATA").unlink()


def garble_meta(step_dir):
    (step_dir / "meta" / "metadata").write_bytes(b"{\"step\": 3, \"_finger")


def flip_bytes(step_dir):
    path = largest_file(step_dir / "state")
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 8] = bytes(b ^ 0xFF for b in data[middle:middle + 8])
    path.write_bytes(bytes(data))


def replace_with_other_step(step_dir):
    """Well-formed Orbax files holding other values: only the content check can tell."""
    shutil.rmtree(step_dir / "state")
    shutil.copytree(step_dir.parent / "2" / "state", step_dir / "state")


@pytest.mark.parametrize("damage", [truncate, remove_metadata, garble_meta, flip_bytes, replace_with_other_step])
def test_latest_damaged_step_falls_back_to_the_newest_intact_one(tmp_path, damage):
    save_steps(tmp_path)
    damage(tmp_path / "3")
    warnings = []
    with Checkpointer(tmp_path) as ckpt:
        step, state, meta = ckpt.restore_latest(abstract_of(state_of(0)), say=warnings.append)
        assert (step, meta) == (2, {"step": 2})
        for got, want in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(state_of(2)["params"])):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        assert ckpt.all_steps() == [1, 2]
        assert ckpt.save(3, state_of(3), {"step": 3})  # the run can save that step again
        ckpt.wait()
    assert len(warnings) == 1 and "step 3 is damaged" in warnings[0] and "resuming from step 2" in warnings[0]
    assert (tmp_path / "3.damaged").is_dir()


def test_no_intact_step_is_one_error_naming_the_directory(tmp_path):
    save_steps(tmp_path, steps=(1, 2))
    truncate(tmp_path / "1")
    remove_metadata(tmp_path / "2")
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(DamagedCheckpointError) as error:
            ckpt.restore_latest(abstract_of(state_of(0)))
        assert ckpt.all_steps() == [1, 2]  # nothing renamed: the user decides
    message = str(error.value)
    assert message.startswith(f"{tmp_path}: no intact checkpoint (")
    assert f"{tmp_path}/1: " in message and f"{tmp_path}/2: unreadable" in message
    assert "\n" not in message


def test_restore_of_an_altered_step_names_the_arrays(tmp_path):
    save_steps(tmp_path)
    replace_with_other_step(tmp_path / "3")
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(DamagedCheckpointError, match=r"/3: 4 array\(s\) read back differ from what was saved"):
            ckpt.restore(3, abstract_of(state_of(0)))
        assert ckpt.restore_latest(abstract_of(state_of(0)), say=lambda _: None)[0] == 2


def test_empty_directory_has_nothing_to_restore(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.restore_latest(abstract_of(state_of(0))) is None


def test_fingerprint_sees_one_ulp_and_swapped_elements():
    w = np.random.default_rng(0).standard_normal((8, 5)).astype(np.float32)
    base = fingerprints({"w": w})
    nudged = w.copy()
    nudged[3, 4] = np.nextafter(nudged[3, 4], np.float32(9))
    swapped = w.copy()
    swapped[[0, 1]] = swapped[[1, 0]]
    assert fingerprints({"w": nudged}) != base and fingerprints({"w": swapped}) != base
    assert fingerprints({"w": w.copy()}) == base
    bf16 = fingerprints({"w": jnp.asarray(w, jnp.bfloat16), "k": jax.random.key(1), "flag": jnp.array(True)})
    assert set(bf16) == {"w", "k", "flag"}
