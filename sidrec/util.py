"""The few arithmetic helpers every layer shares (kept here so data never imports model code)."""


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is >= n."""
    return -(-n // multiple) * multiple
