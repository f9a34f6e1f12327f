"""Typed run configuration: schema dataclasses, named recipes, and strict dotted overrides."""

from prism_mcore.config.overrides import ConfigError, apply_dict, apply_overrides, save_config, to_dict
from prism_mcore.config.recipes import RECIPES, load_recipe
from prism_mcore.config.schema import STAGES, Config

__all__ = [
    "RECIPES",
    "STAGES",
    "Config",
    "ConfigError",
    "apply_dict",
    "apply_overrides",
    "load_recipe",
    "save_config",
    "to_dict",
]
