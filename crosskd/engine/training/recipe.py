"""A run's recipe settings (augmentation and optimisation): the model's recipe under the keys the user gave, the
per-image multi-scale sizes and the per-batch input size of `multi_scale`."""

from pathlib import Path
from typing import Any

import torch

from crosskd.config import Args
from crosskd.data.loader import mixed_seed
from crosskd.data.recipes import DEFAULT_RECIPE, RECIPES
from crosskd.engine.deployment.checkpoint import load_checkpoint
from crosskd.errors import ConfigError
from crosskd.models.build import load_model_yaml
from crosskd.utils import LOGGER

STEP_STREAM = 1  # tells the step draws' seeds apart from the samples' (loader.sample_seed)


def apply_recipe(args: Args, model_yaml: dict[str, Any]) -> Args:
    """`args` with the model's recipe (its YAML's `recipe:`, else the paper's) for every augmentation and optimisation
    key not given."""
    name = model_yaml.get("recipe") or DEFAULT_RECIPE
    if name not in RECIPES:
        raise ConfigError(f"model recipe: {name!r} is not a training recipe; use one of {', '.join(RECIPES)}")
    given = {key for key in RECIPES[name] if args.typed(key)}
    resolved = args.with_values(**{key: value for key, value in RECIPES[name].items() if key not in given})
    typed = f", with {', '.join(sorted(given))} as given" if given else ""
    LOGGER.info(f"recipe: {name} (augmentation and optimisation){typed}")
    return resolved


def model_yaml_of(model: str | None) -> dict[str, Any]:
    """The model YAML dict of a model= value: a YAML file or shipped name, or a crosskd checkpoint's `model_yaml`;
    {} when there is none (no model=, a foreign checkpoint)."""
    if not model:
        return {}
    if str(model).endswith((".yaml", ".yml")):
        return load_model_yaml(model)[0]
    if Path(model).is_file():
        return dict(load_checkpoint(model).get("model_yaml") or {})
    return {}


def resolved_help_values(args: Args) -> dict[str, Any]:
    """The recipe keys as a run of `args` would use them (the model's recipe under the keys given), for
    `crosskd train model=... --help`."""
    resolved = apply_recipe(args, model_yaml_of(args.model or args.student))
    return {key: getattr(resolved, key) for key in RECIPES[DEFAULT_RECIPE]}


def multiscale_sizes(args: Args, head_mstrain: tuple[tuple[int, ...], str], imgsz: int) -> tuple[tuple[int, ...], str]:
    """The long sides one is drawn from per image, and how (range or choice): from `ms_scales` (`head`: the head's
    MMDetection mstrain sizes, given at 800, scaled to imgsz); () when ms_scales is empty (always imgsz)."""
    if args.ms_scales is None:
        return (), args.ms_mode
    if args.ms_scales == "head":
        sizes, mode = head_mstrain
        return tuple(round(size * imgsz / 800) for size in sizes), mode
    return tuple(args.ms_scales), args.ms_mode


def multiscale_size(imgsz: int, multi_scale: float, stride: int, generator: torch.Generator) -> int:
    """Ultralytics' multi_scale: an input long side drawn uniformly from imgsz × (1 ± multi_scale), a multiple of
    `stride` (at least one stride)."""
    low, high = int(imgsz * (1 - multi_scale)), int(imgsz * (1 + multi_scale)) + stride
    size = int(torch.randint(low, high, (1,), generator=generator)) // stride * stride
    return max(size, stride)


def step_generator(seed: int, rank: int, iteration: int) -> torch.Generator:
    """The generator of one training step's batch-level draws (multi_scale): a function of seed, rank and iteration,
    so a resumed run draws the same sizes."""
    return torch.Generator().manual_seed(mixed_seed(seed, rank, iteration, STEP_STREAM))
