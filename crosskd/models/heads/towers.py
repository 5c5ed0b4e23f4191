"""Head towers: conv-norm-act blocks and the two halves of a tower pass that the CrossKD seam splits at a step."""

from torch import Tensor, nn

from crosskd.errors import ConfigError

NORMS = ("gn", "bn", "none")
ACTS = {"relu": nn.ReLU, "silu": nn.SiLU}


class ConvBlock(nn.Module):
    """3×3 conv → GroupNorm, BatchNorm or nothing (`norm` 'gn', 'bn', 'none') → ReLU or SiLU (`act`).

    The conv has a bias only without a norm unless `bias` says otherwise (MMDet ConvModule `bias='auto'`).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        norm: str = "gn",
        num_groups: int = 32,
        bias: bool | None = None,
        act: str = "relu",
    ) -> None:
        super().__init__()
        bias = norm == "none" if bias is None else bias
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=bias)
        self.norm = _norm_layer(norm, out_channels, num_groups)
        self.act = ACTS[act]()

    def forward(self, x: Tensor, activate: bool = True) -> Tensor:
        """[B, C_in, H, W] → [B, C_out, H, W]; `activate=False` returns the pre-activation (after the norm)."""
        x = self.norm(self.conv(x))
        return self.act(x) if activate else x


def _norm_layer(norm: str, channels: int, num_groups: int) -> nn.Module:
    if norm == "gn":
        return nn.GroupNorm(num_groups, channels)
    return nn.BatchNorm2d(channels) if norm == "bn" else nn.Identity()


def run_tower(tower: nn.ModuleList, x: Tensor, stop: int) -> Tensor:
    """Steps 0..stop−1 of `tower` (`stop` clamped to its depth), the last one without its activation."""
    stop = min(stop, len(tower))
    for i in range(stop):
        x = tower[i](x, activate=i < stop - 1)
    return x


def activate_step(tower: nn.ModuleList, x: Tensor, step: int) -> Tensor:
    """The activation of step step−1 (clamped to the depth) on its pre-activation `x`; `x` itself at step 0."""
    step = min(step, len(tower))
    return tower[step - 1].act(x) if step > 0 else x


def finish_tower(tower: nn.ModuleList, x: Tensor, start: int, activated: bool = False) -> Tensor:
    """The activation of step start−1 (unless `x` is `activated` already), then the steps from `start` on (clamped
    to the depth)."""
    x = x if activated else activate_step(tower, x, start)
    for block in tower[min(start, len(tower)):]:
        x = block(x)
    return x


def check_towers(norm: str, act: str, num_groups: int, widths: dict[str, int], depths: dict[str, int]) -> None:
    """One-line ConfigErrors for the tower settings; `widths` and `depths` map the YAML key that set each value."""
    if norm not in NORMS:
        raise ConfigError(f"head.norm '{norm}' is not one of {', '.join(NORMS)}")
    if act not in ACTS:
        raise ConfigError(f"head.act '{act}' is not one of {', '.join(ACTS)}")
    for key, value in {**widths, **depths}.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"head.{key} {value!r} must be int")
    for key, width in widths.items():
        if width < 1:
            raise ConfigError(f"head.{key} {width} must be >= 1")
        if norm == "gn" and (num_groups < 1 or width % num_groups):
            raise ConfigError(f"head.num_groups {num_groups} must divide head.{key} {width}")
    for key, depth in depths.items():
        if depth < 0:
            raise ConfigError(f"head.{key} {depth} must be >= 0")
