"""The building blocks of YOLOv8 and YOLO11, with Ultralytics 8.4's submodule names so its weights load by name.

Every conv is `Conv` (conv → BatchNorm → SiLU, no conv bias); channel counts follow Ultralytics' arithmetic
(hidden widths `int(c_out * e)`), so a block built here has exactly the parameters of its Ultralytics namesake.
"""

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

BN_EPS, BN_MOMENTUM = 1e-3, 0.03  # Ultralytics' initialize_weights sets these on every BatchNorm


class Conv(nn.Module):
    """Conv2d (no bias, 'same' padding) → BatchNorm2d → SiLU (`act=False`: no activation)."""

    def __init__(
        self, c_in: int, c_out: int, kernel: int = 1, stride: int = 1, groups: int = 1, act: bool = True
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.act = nn.SiLU() if act else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


class DWConv(Conv):
    """Depth-wise Conv: groups = gcd(c_in, c_out)."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 1, stride: int = 1, act: bool = True) -> None:
        super().__init__(c_in, c_out, kernel, stride, groups=math.gcd(c_in, c_out), act=act)


class Bottleneck(nn.Module):
    """cv1 (k[0], c_out·e channels) → cv2 (k[1]), plus the input when `shortcut` and the widths match."""

    def __init__(
        self, c_in: int, c_out: int, shortcut: bool = True, kernels: tuple[int, int] = (3, 3), e: float = 0.5
    ) -> None:
        super().__init__()
        hidden = int(c_out * e)
        self.cv1 = Conv(c_in, hidden, kernels[0])
        self.cv2 = Conv(hidden, c_out, kernels[1])
        self.add = shortcut and c_in == c_out

    def forward(self, x: Tensor) -> Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class SplitChain(nn.Module):
    """The C2f pattern: cv1 to 2·c channels split in halves, `n` blocks chained on the second half, cv2 over the
    concatenation of both halves and every block output ((2 + n)·c channels). C2f and C3k2 differ only in the block."""

    def __init__(self, c_in: int, c_out: int, n: int, e: float, make_block: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.c = int(c_out * e)
        self.cv1 = Conv(c_in, 2 * self.c)
        self.cv2 = Conv((2 + n) * self.c, c_out)
        self.m = nn.ModuleList(make_block(self.c) for _ in range(n))

    def forward(self, x: Tensor) -> Tensor:
        parts = list(self.cv1(x).chunk(2, 1))  # 2 × [B, c, H, W]
        for block in self.m:
            parts.append(block(parts[-1]))
        return self.cv2(torch.cat(parts, 1))  # [B, (2 + n)·c, H, W] → [B, c_out, H, W]


class C2f(SplitChain):
    """YOLOv8's CSP block: Bottlenecks of width c (3×3 convs, expansion 1)."""

    def __init__(self, c_in: int, c_out: int, n: int = 1, shortcut: bool = False, e: float = 0.5) -> None:
        super().__init__(c_in, c_out, n, e, lambda c: Bottleneck(c, c, shortcut, (3, 3), e=1.0))


class C3k(nn.Module):
    """A C3 block with k×k Bottlenecks: cv1 → blocks and cv2 side by side, cv3 over both (c_out·e each)."""

    def __init__(
        self, c_in: int, c_out: int, n: int = 1, shortcut: bool = True, e: float = 0.5, kernel: int = 3
    ) -> None:
        super().__init__()
        hidden = int(c_out * e)
        self.cv1 = Conv(c_in, hidden)
        self.cv2 = Conv(c_in, hidden)
        self.cv3 = Conv(2 * hidden, c_out)
        self.m = nn.Sequential(*(Bottleneck(hidden, hidden, shortcut, (kernel, kernel), e=1.0) for _ in range(n)))

    def forward(self, x: Tensor) -> Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class C3k2(SplitChain):
    """YOLO11's CSP block: the C2f pattern with C3k blocks (two Bottlenecks) when `c3k`, else Bottlenecks of
    expansion 0.5."""

    def __init__(
        self, c_in: int, c_out: int, n: int = 1, c3k: bool = False, e: float = 0.5, shortcut: bool = True
    ) -> None:
        def make_block(c: int) -> nn.Module:
            return C3k(c, c, 2, shortcut) if c3k else Bottleneck(c, c, shortcut)

        super().__init__(c_in, c_out, n, e, make_block)


class SPPF(nn.Module):
    """Spatial pyramid pooling, fast: cv1 halves the channels, three chained k×k max pools, cv2 over all four maps."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 5) -> None:
        super().__init__()
        hidden = c_in // 2
        self.cv1 = Conv(c_in, hidden)
        self.cv2 = Conv(4 * hidden, c_out)
        self.m = nn.MaxPool2d(kernel, stride=1, padding=kernel // 2)

    def forward(self, x: Tensor) -> Tensor:
        maps = [self.cv1(x)]
        for _ in range(3):
            maps.append(self.m(maps[-1]))
        return self.cv2(torch.cat(maps, 1))


class Attention(nn.Module):
    """Multi-head self-attention over all positions, with a depth-wise 3×3 positional encoding (`pe`) of the values.

    Each head has `key_dim = int(dim / num_heads · attn_ratio)` query/key channels and `dim / num_heads` value channels;
    `qkv` is a 1×1 Conv to dim + 2·num_heads·key_dim channels, `proj` a 1×1 Conv; neither has an activation.
    """

    def __init__(self, dim: int, num_heads: int = 8, attn_ratio: float = 0.5) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.key_dim = int(self.head_dim * attn_ratio)
        self.scale = self.key_dim**-0.5
        self.qkv = Conv(dim, dim + 2 * self.key_dim * num_heads, act=False)
        self.proj = Conv(dim, dim, act=False)
        self.pe = Conv(dim, dim, 3, groups=dim, act=False)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        per_head = self.qkv(x).view(b, self.num_heads, 2 * self.key_dim + self.head_dim, h * w)
        q, k, v = per_head.split([self.key_dim, self.key_dim, self.head_dim], dim=2)  # [B, heads, d, HW] each
        weights = ((q * self.scale).transpose(-2, -1) @ k).softmax(dim=-1)  # [B, heads, HW, HW]
        attended = (v @ weights.transpose(-2, -1)).view(b, c, h, w)
        return self.proj(attended + self.pe(v.reshape(b, c, h, w)))


class PSABlock(nn.Module):
    """Attention then a 1×1 feed-forward (c → 2c → c, no activation on the last), each added to its input."""

    def __init__(self, c: int, attn_ratio: float = 0.5, num_heads: int = 4, shortcut: bool = True) -> None:
        super().__init__()
        self.attn = Attention(c, num_heads, attn_ratio)
        self.ffn = nn.Sequential(Conv(c, 2 * c), Conv(2 * c, c, act=False))
        self.add = shortcut

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(x) if self.add else self.attn(x)
        return x + self.ffn(x) if self.add else self.ffn(x)


class C2PSA(nn.Module):
    """YOLO11's attention block: cv1 to two halves of c_in·e, PSABlocks (c/64 heads) on the second, cv2 fuses."""

    def __init__(self, c_in: int, c_out: int, n: int = 1, e: float = 0.5) -> None:
        super().__init__()
        if c_in != c_out:
            raise ValueError(f"C2PSA keeps its width: c_in {c_in} != c_out {c_out}")
        self.c = int(c_in * e)
        self.cv1 = Conv(c_in, 2 * self.c)
        self.cv2 = Conv(2 * self.c, c_in)
        self.m = nn.Sequential(*(PSABlock(self.c, 0.5, num_heads=max(self.c // 64, 1)) for _ in range(n)))

    def forward(self, x: Tensor) -> Tensor:
        kept, attended = self.cv1(x).split((self.c, self.c), dim=1)
        return self.cv2(torch.cat((kept, self.m(attended)), 1))
