"""A save that runs out of disk ends in one DiskFullError line and leaves the previous step resumable."""

import errno
import subprocess
import uuid

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sidrec import checkpoint
from sidrec.checkpoint import Checkpointer, DiskFullError


def state_of(n: int, value: float):
    """Random values: Orbax compresses, so constant arrays would fit any disk."""
    noise = np.random.default_rng(int(value)).standard_normal(n).astype(np.float32)
    return {"w": jnp.asarray(noise), "step": jnp.array(int(value), jnp.int32)}


def abstract_of(state):
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs (needs mount rights: root in a container); skipped where it cannot be made."""
    mount_point = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mount_point.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({made.stderr.strip() or made.returncode}); "
                    "test_disk_full_error_from_the_save_boundary covers the message")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


@pytest.mark.parametrize("checked_before_writing", [True, False], ids=["space-checked", "found-by-orbax-writer"])
def test_full_disk_is_one_line_and_the_previous_step_resumes(small_disk, monkeypatch, checked_before_writing):
    """The free-space check refuses a save that cannot fit; without it (remote paths, other writers filling
    the disk) Orbax's writer meets ENOSPC and the same one line comes from the failed background save."""
    if not checked_before_writing:
        monkeypatch.setattr(checkpoint, "_free_bytes", lambda directory: None)
    directory = small_disk / "checkpoints"
    small, big = state_of(1000, 1.0), state_of(1_000_000, 2.0)  # 4 KB, then 4 MB on a 2 MiB disk
    with Checkpointer(directory) as ckpt:
        ckpt.save(1, small, {"step": 1})
        ckpt.wait()
        with pytest.raises(DiskFullError) as error:
            ckpt.save(2, big, {"step": 2})
            ckpt.wait()
    message = str(error.value)
    assert message.startswith(f"{directory}: no space left on device while saving step 2 (its arrays need 3.8 MiB, ")
    monkeypatch.undo()
    assert "step 1 is intact" in message and "rerun the same command to resume" in message
    assert "\n" not in message
    with Checkpointer(directory) as ckpt:  # the rerun
        assert not list(directory.glob("2.orbax-checkpoint-tmp*"))
        step, state, meta = ckpt.restore_latest(abstract_of(small))
        assert (step, meta) == (1, {"step": 1})
        np.testing.assert_array_equal(np.asarray(state["w"]), np.asarray(small["w"]))


def test_disk_full_error_from_the_save_boundary(tmp_path, monkeypatch):
    """Where no small disk can be mounted: the OSError Orbax's writer raises, injected at the boundary."""
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state_of(10, 1.0), {"step": 1})
        ckpt.save(2, state_of(10, 2.0), {"step": 2})

        def full(*args, **kwargs):
            raise ValueError("write failed") from OSError(errno.ENOSPC, "No space left on device")

        with monkeypatch.context() as patch:
            patch.setattr(ckpt._manager, "wait_until_finished", full)
            with pytest.raises(DiskFullError, match=r"while saving step 2 \(its arrays need 44 B, .* free\); "
                                                    r"step 1 is intact"):
                ckpt.wait()
