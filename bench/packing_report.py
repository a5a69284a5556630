"""Token utilisation and the number of distinct step shapes (compilations) of a training mixture,
for a grid of row lengths, device counts and rows per device:

    python -m bench.packing_report --root ../shared/data --category Industrial_and_Scientific
"""

from __future__ import annotations

import time

from sidrec.config import ALL_TASKS, DataConfig
from sidrec.data import batching, minionerec
from sidrec.tokenizer import add_sid_tokens, load_tokenizer


def report(root: str = "../shared/data", category: str = "Industrial_and_Scientific",
           tokenizer: str = "../shared/tokenizers/qwen2.5", tasks: tuple[str, ...] = ALL_TASKS,
           global_batch_size: int = 1024, seq_lens: tuple[int, ...] = (512, 1024, 2048),
           devices: tuple[int, ...] = (1, 8), rows_per_device: tuple[int, ...] = (1, 2, 4),
           epochs: int = 3, cache_dir: str | None = None) -> None:
    """Print token utilisation and the step-shape (compile) bound of a training mixture."""
    started = time.perf_counter()
    info = add_sid_tokens(load_tokenizer(tokenizer), minionerec.load_catalogue(root, category).sid_tokens)
    cfg = DataConfig(root=root, category=category, tasks=tasks)
    data = batching.load_training_data(cfg, info, cache_dir or batching.default_cache_dir())
    print(f"{category}: {len(data)} examples ({', '.join(tasks)}), {len(data.tokens)} tokens "
          f"(mean {data.lengths.mean():.1f}, max {data.lengths.max()}); loaded in "
          f"{time.perf_counter() - started:.1f}s")
    print(f"global batch {global_batch_size}; over {epochs} epochs: util = real tokens / slots, "
          "A = micro-batches per step, N = loss targets a row may hold, M = loss slots per device micro-batch, "
          "target util = targets / slots; each (A, M) seen is one compilation")
    print(f"{'seq_len':>7} {'devices':>7} {'rows/dev':>8} {'N':>4} {'steps/ep':>8} {'util':>6} {'target util':>11}  "
          f"{'A seen':<16} {'M seen':<28} A bound")
    for seq_len in seq_lens:
        for device_count in devices:
            for rows in rows_per_device:
                layout = batching.Layout(seq_len=seq_len, rows_per_device=rows, local_device_count=device_count)
                loader = batching.Loader(data, global_batch_size=global_batch_size, layout=layout, seed=42)
                plans = [p for e in range(epochs) for p in loader.epoch_plans(e)]
                seen = sorted({p.num_micro_batches for p in plans})
                slots_seen = sorted({p.target_slots for p in plans})
                target_util = sum(p.n_targets for p in plans) / sum(
                    p.num_micro_batches * device_count * p.target_slots for p in plans)
                bound = loader.micro_batch_bound()
                print(f"{seq_len:>7} {device_count:>7} {rows:>8} {loader.targets_per_row:>4} "
                      f"{loader.steps_per_epoch:>8} {batching.utilisation(plans, layout):>6.1%} {target_util:>11.1%}  "
                      f"{seen!s:<16} {slots_seen!s:<28} {len(bound)} values in {bound[0]}..{bound[-1]}")


if __name__ == "__main__":
    import tyro

    tyro.cli(report)
