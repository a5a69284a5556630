# sidrec tasks. `just --list` shows them.

set positional-arguments

# End to end on CPU: synthetic data, tiny model, train -> best checkpoint -> constrained eval vs most-popular.
demo *ARGS:
    python cli.py train-eval --preset demo "$@"

# Train with a preset, e.g. `just train industrial-cpu --train.epochs 1`.
train PRESET *ARGS:
    python cli.py train --preset "$@"

# Evaluate (default: the official MiniOneRec Industrial checkpoint), e.g. `just eval eval-official-office`.
eval PRESET="eval-official-industrial" *ARGS:
    python cli.py eval --preset "$@"

# The test suite CI runs (fast; `just test -m slow` for the long ones).
test *ARGS:
    python -m pytest -q "$@"

# All benchmarks; writes bench/results/*.json and the README performance table.
bench *ARGS:
    python -m bench.run_all "$@"

# Lint with ruff when it is installed (pip install ruff).
lint:
    python -m ruff check sidrec presets bench tests cli.py

# GRPO on the demo's SFT run (run `just demo` first): test metrics next to the SFT start's.
demo-rl *ARGS:
    python cli.py rl-eval --preset demo-rl "$@"

# Semantic IDs for a catalogue, e.g. `just sids industrial-cpu-sids`; then train with --data.root runs/<preset>.
sids PRESET="demo-sids" *ARGS:
    python cli.py sids --preset "$@"
