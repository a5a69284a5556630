"""sidrec: generative recommendation with semantic IDs on Qwen2, in JAX."""

import os

CPU_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler"


def _sequential_cpu_schedule() -> None:
    """Turn off XLA:CPU's concurrency-optimized scheduler unless XLA_FLAGS already sets it.

    That scheduler runs independent ops side by side on the host's threads, each op also splitting
    itself over those threads. On the 2-core bench machine the bench model's train step took 2.2-2.4 s
    with it and 1.7 s without (the second configuration 2.9-3.4 -> 2.7-2.8 s, beam search unchanged),
    measured in separate processes, alternated. XLA reads XLA_FLAGS when its first backend starts, so
    this has to run before any JAX computation, which is why it sits here at import time. Other
    backends ignore xla_cpu_* flags.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if CPU_SCHEDULER_FLAG not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {CPU_SCHEDULER_FLAG}=false".strip()


_sequential_cpu_schedule()
