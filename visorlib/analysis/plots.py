"""Figures of an analysis report, in the layout of the paper's Figs. 2-4 (matplotlib is optional).

* ``attention.png`` — one panel per group: query→image, answer→image and answer→query share per
  layer (Fig. 2); cross-attention layers of a VISOR model are shaded, and their CA update ratio (answer
  tokens) is drawn as black diamonds on a second axis.
* ``cka.png`` — one heat map per group: CKA between the visual tokens at every pair of layer
  boundaries (Fig. 3), on one colour scale.
* ``layer_drop.png`` — left, each group's accuracy under every layer-drop subset (dots; the
  unmodified model as a bar); right, the groups' correlation matrix with the easy / hard labels
  (Fig. 4).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

FIGURES = ("attention.png", "cka.png", "layer_drop.png")


def have_matplotlib() -> bool:
    """Whether figures can be drawn."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def plot_report(report: dict[str, Any], folder: Path) -> list[Path]:
    """Write the figures of ``report`` into ``folder``; returns the files written."""
    plt = _pyplot()
    written = [_attention(plt, report, folder / "attention.png")]
    if report["cka"]["matrices"]:
        written.append(_cka(plt, report, folder / "cka.png"))
    if report.get("layer_drop", {}).get("accuracy"):
        written.append(_layer_drop(plt, report, folder / "layer_drop.png"))
    return written


def _none_to_nan(values):
    return [float("nan") if v is None else v for v in values]


def _attention(plt, report, path: Path) -> Path:
    groups = list(report["attention"])
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.2), squeeze=False, sharey=True)
    layers = list(range(report["num_layers"]))
    for ax, g in zip(axes[0], groups, strict=True):
        att = report["attention"][g]
        for key, label, style in (("query_to_image", "query→image", "-o"), ("answer_to_image", "answer→image", "-s"),
                                  ("answer_to_query", "answer→query", "-^")):
            ax.plot(layers, _none_to_nan(att[key]), style, ms=3, label=label)
        for layer in report["ca_layers"]:
            ax.axvspan(layer - 0.4, layer + 0.4, color="0.9", zorder=0)
        if report["ca_layers"]:
            twin = ax.twinx()
            twin.plot(layers, _none_to_nan(att["ca_update_ratio"]["answer"]), "kD", ms=4, label="CA update (answer)")
            twin.set_ylabel("CA update ratio", fontsize=8)
        ax.set_title(g, fontsize=9)
        ax.set_xlabel("layer")
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("attention share")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{report['model']}: attention by interaction type", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _cka(plt, report, path: Path) -> Path:
    matrices = report["cka"]["matrices"]
    groups = list(matrices)
    fig, axes = plt.subplots(1, len(groups), figsize=(3.6 * len(groups) + 0.8, 3.4), squeeze=False)
    low = min([v for m in matrices.values() for row in m for v in row if v is not None] + [1.0])
    image = None
    for ax, g in zip(axes[0], groups, strict=True):
        image = ax.imshow([_none_to_nan(row) for row in matrices[g]], vmin=min(low, 0.5), vmax=1, cmap="viridis",
                          origin="lower")
        ax.set_title(g, fontsize=9)
        ax.set_xlabel("layer boundary")
    axes[0][0].set_ylabel("layer boundary")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label=f"CKA ({report['cka']['estimator']})")
    fig.suptitle(f"{report['model']}: visual-token CKA across layers", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _layer_drop(plt, report, path: Path) -> Path:
    drop = report["layer_drop"]
    groups = drop["groups"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(4 + 1.2 * len(groups), 3.4))
    for i, g in enumerate(groups):
        acc = drop["accuracy"][g]
        left.bar(i, acc[0], color="0.85", width=0.6)
        spread = [i + 0.25 * ((k % 5) - 2) / 2 for k in range(len(acc) - 1)]  # fixed jitter: equal scores stay visible
        left.scatter(spread, acc[1:], s=12, zorder=3)
    left.set_xticks(range(len(groups)), [f"{g}\ncluster: {drop['cluster'].get(g, '-')}" for g in groups], fontsize=8)
    left.set_ylabel("accuracy")
    left.set_ylim(0, 1.05)
    left.set_title("bar: full model, dots: vision dropped", fontsize=9)
    corr = [_none_to_nan(row) for row in drop["correlation"]]
    image = right.imshow(corr, vmin=-1, vmax=1, cmap="RdBu_r")
    right.set_xticks(range(len(groups)), groups, fontsize=8, rotation=30)
    right.set_yticks(range(len(groups)), groups, fontsize=8)
    for i in range(len(groups)):
        for j in range(len(groups)):
            if corr[i][j] == corr[i][j]:
                right.text(j, i, f"{corr[i][j]:.2f}", ha="center", va="center", fontsize=8,
                           color="white" if abs(corr[i][j]) > 0.6 else "black")
    right.set_title("accuracy correlation across subsets", fontsize=9)
    fig.colorbar(image, ax=right, shrink=0.8)
    fig.suptitle(f"{report['model']}: layer-drop sensitivity ({len(drop['subsets']) - 1} subsets)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
