"""Draw docs/img/crosskd.png: the CrossKD data flow (run: python docs/crosskd_diagram.py)."""

from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

STUDENT, TEACHER, LOSS, FROZEN = "#cfe2f3", "#f4cccc", "#fff2cc", "#ead1dc"


def box(ax, x: float, y: float, w: float, h: float, text: str, color: str, dashed: bool = False) -> None:
    """A rounded box with centred text; (x, y) is the lower-left corner."""
    style = "round,pad=0.02,rounding_size=0.08"
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle=style, fc=color, ec="#333333",
                                lw=1.2, ls="--" if dashed else "-"))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=9)


def arrow(ax, start: tuple, end: tuple, color: str = "#333333", ls: str = "-", rad: float = 0.0) -> None:
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=12, color=color, lw=1.4, ls=ls,
                                 connectionstyle=f"arc3,rad={rad}"))


def draw(path: Path) -> None:
    fig = Figure(figsize=(12, 5.6))
    ax = fig.subplots()
    ax.set_xlim(0, 12)
    ax.set_ylim(0, 5.6)
    ax.axis("off")
    # student row (top) and teacher row (bottom)
    box(ax, 0.2, 3.9, 1.2, 0.9, "image\n(same batch)", "#eeeeee")
    box(ax, 1.8, 4.1, 1.6, 0.7, "student\nbackbone + FPN", STUDENT)
    box(ax, 3.8, 4.1, 1.7, 0.7, "student head\nconvs 1..i", STUDENT)
    box(ax, 6.0, 4.1, 1.9, 0.7, "student head\nconvs i+1..n, predictors", STUDENT)
    box(ax, 8.5, 4.1, 1.4, 0.7, "student\npredictions", STUDENT)
    box(ax, 10.3, 4.1, 1.5, 0.7, "detection losses\n(ground truth)", LOSS)
    box(ax, 1.8, 0.5, 1.6, 0.7, "teacher\nbackbone + FPN", TEACHER)
    box(ax, 3.8, 0.5, 1.7, 0.7, "teacher head\nconvs 1..i", TEACHER)
    box(ax, 6.0, 0.5, 1.9, 0.7, "teacher head\nconvs i+1..n, predictors", TEACHER)
    box(ax, 8.5, 0.5, 1.4, 0.7, "teacher\npredictions", TEACHER)
    # cross-head branch (middle)
    box(ax, 3.8, 2.3, 1.7, 0.8, "1x1 adapter (if widths\ndiffer) + align_scale\nto teacher mean/std", "#d9ead3")
    box(ax, 6.0, 2.3, 1.9, 0.8, "ReLU, teacher convs\ni+1..n, predictors,\nScale (frozen, shared)", FROZEN, dashed=True)
    box(ax, 8.5, 2.3, 1.4, 0.8, "cross-head\npredictions", FROZEN)
    box(ax, 10.3, 2.3, 1.5, 0.8, "KD losses\nkd_cls, kd_reg,\nkd_ctr", LOSS)
    for start, end in [((1.4, 4.45), (1.8, 4.45)), ((3.4, 4.45), (3.8, 4.45)), ((5.5, 4.45), (6.0, 4.45)),
                       ((7.9, 4.45), (8.5, 4.45)), ((9.9, 4.45), (10.3, 4.45)), ((0.8, 3.9), (1.8, 0.85)),
                       ((3.4, 0.85), (3.8, 0.85)), ((5.5, 0.85), (6.0, 0.85)), ((7.9, 0.85), (8.5, 0.85)),
                       ((4.65, 4.1), (4.65, 3.1)), ((5.5, 2.7), (6.0, 2.7)), ((7.9, 2.7), (8.5, 2.7)),
                       ((9.9, 2.7), (10.3, 2.7)), ((9.2, 1.2), (10.6, 2.3))]:
        arrow(ax, start, end)
    arrow(ax, (4.65, 1.2), (4.65, 2.3), color="#999999", ls="--")
    ax.text(4.55, 3.6, "hold feature i\n(post-activation)", fontsize=8, va="center", ha="right")
    ax.text(4.55, 1.6, "teacher stats\n(detached)", fontsize=8, va="center", ha="right", color="#666666")
    arrow(ax, (11.05, 2.3), (4.2, 2.3), color="#cc0000", ls=":", rad=-0.2)
    ax.text(7.4, 1.75, "KD gradient flows back through the frozen teacher layers\ninto student convs 1..i, FPN and "
            "backbone only", fontsize=8, color="#cc0000", ha="center")
    ax.text(6.0, 5.35, "CrossKD: student hold features run through the rest of the teacher's head", fontsize=12,
            ha="center", weight="bold")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)


if __name__ == "__main__":
    draw(Path(__file__).parent / "img" / "crosskd.png")
