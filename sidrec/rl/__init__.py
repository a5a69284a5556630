"""GRPO on top of the SFT engine: RL datasets (data.py) and rewards computed on device (rewards.py)."""
