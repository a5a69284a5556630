"""sidrec command line: parse, build the Config, call one function.

    python cli.py train      --preset NAME [--group.field value ...]
    python cli.py eval       --preset NAME [...]
    python cli.py train-eval --preset NAME [...]   (train, then evaluate the best checkpoint on test)
    python cli.py rl         --preset NAME [...]   (GRPO from --rl.sft-run-dir or --model.hf-path)
    python cli.py rl-eval    --preset NAME [...]   (rl, then test eval of the best vs the SFT start)
    python cli.py sids       --preset NAME [...]   (semantic IDs for a catalogue -> a new --data.root)
    python cli.py export     --run-dir DIR --out HF_DIR [--which best|last]
    python cli.py presets

The preset gives the default Config; every field stays overridable (`--help` lists them all).
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Literal

import tyro

COMMANDS = ("train", "eval", "train-eval", "rl", "rl-eval", "sids", "export", "presets")
DEFAULT_PRESET = "demo"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExportArgs:
    """Export a run's checkpoint to a Hugging Face directory (config.json + safetensors + tokenizer)."""

    run_dir: str
    """Run directory written by `cli.py train`."""
    out: str
    """Output directory (created; must not exist or be empty)."""
    which: Literal["best", "last"] = "best"
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Dtype of the exported weights."""


def split_preset(args: list[str]) -> tuple[str, list[str]]:
    """Take `--preset NAME` / `--preset=NAME` out of the argument list."""
    rest, name = [], DEFAULT_PRESET
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--preset":
            if i + 1 >= len(args):
                raise SystemExit("error: --preset needs a name (`python cli.py presets` lists them)")
            name = args[i + 1]
            i += 2
            continue
        if arg.startswith("--preset="):
            name = arg.split("=", 1)[1]
        else:
            rest.append(arg)
        i += 1
    return name, rest


def parse_config(command: str, args: list[str]):
    from presets import get_preset

    name, rest = split_preset(args)
    preset = get_preset(name)
    cfg = tyro.cli(type(preset), default=preset, args=rest,
                   prog=f"cli.py {command} --preset {name}", description=preset.description,
                   config=(tyro.conf.FlagConversionOff,))
    return cfg.validate()


def list_presets() -> None:
    from presets import all_presets

    presets = all_presets()
    width = max(map(len, presets))
    for name, preset in presets.items():
        print(f"{name:<{width}}  {preset.description}")


def main(argv: list[str] | None = None) -> int:
    from sidrec.errors import UserError

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            print(f"error: unknown command {argv[0]!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
            print(__doc__, file=sys.stderr)
            return 2
        print(__doc__)
        return 0
    command, args = argv[0], argv[1:]
    try:
        if command == "presets":
            list_presets()
            return 0
        if command == "export":
            from sidrec.export import export_run

            export_args = tyro.cli(ExportArgs, args=args, prog="cli.py export")
            export_run(export_args.run_dir, export_args.out, which=export_args.which,
                       dtype=export_args.dtype)
            return 0
        cfg = parse_config(command, args)
        if command == "train":
            from sidrec.train import run_train

            run_train(cfg)
        elif command in ("rl", "rl-eval"):
            from sidrec.rl.run import run_rl, run_rl_eval

            (run_rl if command == "rl" else run_rl_eval)(cfg)
        elif command == "sids":
            from sidrec.sids.run import run_sids

            run_sids(cfg)
        elif command == "eval":
            from sidrec.evaluate import run_eval

            run_eval(cfg)
        else:
            from sidrec.evaluate import run_eval
            from sidrec.train import run_train

            if run_train(cfg)["stop_reason"] == "preempted":
                print("training was preempted: rerun the same command to resume (evaluation skipped)")
                return 0
            run_eval(cfg, checkpoint="best")
        return 0
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    from sidrec import hugepages

    hugepages.reexec_with_huge_pages()
    sys.exit(main())
