"""Preset registry: every module in this package may define `PRESETS = {"name": Config(...)}`.

Adding a module with a new dict is all it takes; names must be unique across modules.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil

from sidrec.config import Config, ConfigError


def all_presets() -> dict[str, Config]:
    found: dict[str, Config] = {}
    for module_info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{module_info.name}")
        for name, preset in getattr(module, "PRESETS", {}).items():
            if name in found:
                raise ConfigError(f"preset {name!r} is defined twice (second time in presets/{module_info.name}.py)")
            if not isinstance(preset, Config):
                raise ConfigError(f"presets/{module_info.name}.py: PRESETS[{name!r}] is not a sidrec.config.Config")
            found[name] = preset
    return found


def get_preset(name: str) -> Config:
    presets = all_presets()
    if name not in presets:
        close = difflib.get_close_matches(name, presets, n=3, cutoff=0.4)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown preset {name!r}{hint} (`python cli.py presets` lists them all)")
    return presets[name]
