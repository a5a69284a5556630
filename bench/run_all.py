"""Run every benchmark (each in its own process), then regenerate the README's performance section.

    just bench                 # = python -m bench.run_all (about 15-20 min on an idle 2-core CPU)
    just bench --quick         # smaller settings: a smoke run of every bench (a few minutes)
    just bench --only eval_speed train_speed
"""

from __future__ import annotations

import subprocess
import sys
import time

from bench import common, render_readme

# name -> (full arguments, quick arguments)
BENCHES = {
    "scale_estimate": ((), ()),
    # The whole test split (4533 prompts x 50 beams) alone takes ~17 min on 2 cores: the default run
    # measures the first 1024 prompts; `python -m bench.eval_speed` measures all of them.
    "eval_speed": (("--full-max-prompts", "1024"), ("--side-by-side-prompts", "8", "--repeats", "1", "--full-max-prompts", "64")),
    "train_speed": ((), ("--repeats", "1", "--sweep-repeats", "1", "--examples-sweep", "8",
                         "--seq-len-sweep", "512")),
    "muon_overhead": ((), ("--repeats", "1")),
    "rl_speed": ((), ("--repeats", "1")),
    "sids_speed": ((), ("--constrained-n-init", "1", "--iterations", "10")),
}


def main(only: tuple[str, ...] = (), quick: bool = False) -> None:
    """only: names of benches to run (default: all of them); quick: smaller settings (smoke run)."""
    unknown = [name for name in only if name not in BENCHES]
    if unknown:
        raise SystemExit(f"unknown bench(es) {unknown}; choose from {list(BENCHES)}")
    failed, started = [], time.perf_counter()
    for name, (full_args, quick_args) in BENCHES.items():
        if only and name not in only:
            continue
        print(f"\n== {name} ==", flush=True)
        bench_started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", f"bench.{name}", *(quick_args if quick else full_args)],
                              cwd=common.ROOT)
        print(f"({name}: {time.perf_counter() - bench_started:.0f} s)", flush=True)
        if done.returncode != 0:
            failed.append(name)
    print(f"\nall benches: {time.perf_counter() - started:.0f} s")
    render_readme.main()
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    import tyro

    tyro.cli(main)
