"""The recipes that ship with the package, and their configs.

A recipe is a module with a ``cli(**kwargs)`` (its LightningCLI) and a ``main()``; a config is a YAML in ``configs/`` that
names its recipe (``recipe: dlrm``). ``lightning-dembed recipes`` lists them, ``lightning-dembed cp``
copies a config to edit, and ``lightning-dembed run`` runs a shipped config by name or any YAML
that names its recipe, from any directory.
"""

from __future__ import annotations

import importlib
from importlib import resources
from pathlib import Path
from typing import Optional, Union

import yaml

__all__ = ["RECIPES", "check_config", "config_path", "recipe_of", "shipped_configs"]

# Recipe name -> what it trains (the module is lightning_dembed.recipes.<name>).
RECIPES = {
    "dlrm": "DLRM / DLRM-DCN on sharded embeddings: synthetic, Criteo or task data",
    "meta_dlrm": "meta-DLRM: MAML-family meta-learning over tasks with sharded embeddings (G-Meta style)",
}


def shipped_configs() -> dict[str, Path]:
    """The configs that ship with the package, by name (file name without ``.yaml``).

    Files whose name starts with ``_`` (``_base.yaml``) are bases other configs build on, not configs.
    """
    directory = resources.files(__name__) / "configs"
    return {
        Path(entry.name).stem: Path(str(entry))
        for entry in directory.iterdir()
        if entry.name.endswith(".yaml") and not entry.name.startswith("_")
    }


def config_path(name_or_path: Union[str, Path]) -> Path:
    """A shipped config by name (``dlrm_synthetic_tiny``), or a YAML file anywhere."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = shipped_configs()
    if str(name_or_path) in shipped:
        return shipped[str(name_or_path)]
    raise FileNotFoundError(
        f"{name_or_path!r} is neither a YAML file nor a shipped config; shipped configs: {sorted(shipped)} "
        "(`lightning-dembed recipes` lists them)"
    )


def recipe_of(config: Path, recipe: Optional[str] = None) -> str:
    """The recipe a config runs with: ``recipe`` when given, else the config's own ``recipe:`` key."""
    named = recipe or (yaml.safe_load(config.read_text()) or {}).get("recipe")
    if named is None:
        raise ValueError(
            f"{config} names no recipe: add `recipe: dlrm` (or another of {sorted(RECIPES)}) to it, or pass "
            "--recipe"
        )
    if named not in RECIPES:
        raise ValueError(f"{config}: unknown recipe {named!r}; recipes: {sorted(RECIPES)}")
    return named


def check_config(recipe: str, args: list[str]) -> None:
    """Parse a recipe's command line (``fit --config ...``) as every rank will, building nothing.

    Raises:
        jsonargparse.ArgumentError: the first unknown key, wrong type, unknown class or unreadable
            config file, as jsonargparse words it.
    """
    module = importlib.import_module(f"{__name__}.{recipe}")
    module.cli(args=args, parse_only=True, parser_kwargs={"exit_on_error": False})
