"""Regenerate the documentation's figures from visorlib's own output (never drawn by hand).

    python docs/figures/make_figures.py            # every figure below, into docs/figures/

* ``layer-plan.png`` — the layer plan of the ``visor-llava-ov-0.5b`` card as
  :class:`visorlib.visor.plan.LayerPlan` reads it: each decoder layer's role (text-only,
  cross-attention, self-attention candidate), which tokens that role touches, and which layers
  one configuration executes.
* ``flops-vs-visual-tokens.png`` — :func:`visorlib.profiling.plot_flops_vs_visual_tokens` for the
  same card (what ``visorlib profile --plot`` draws): language-model FLOPs of the dense model and
  of three VISOR configurations against the number of visual tokens.

These two come from the cards and the FLOP counter alone. Two more come from the shipped synthdoc
weights and change when they do (rerun this script after shipping new ones):

* ``demo-pages.png`` — the first two held-out pages ``visorlib demo`` shows, with one question of
  each kind and its answer;
* ``synthdoc-accuracy-vs-flops.png`` — ``visorlib eval --plot`` of ``visor-synthdoc-tiny`` on 30
  held-out pages: accuracy against language-model FLOPs for every configuration and the router.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

import visorlib  # noqa: E402
from visorlib.profiling import plot_flops_vs_visual_tokens  # noqa: E402
from visorlib.visor.plan import CROSS, SELF, LayerPlan  # noqa: E402

CARD = "visor-llava-ov-0.5b"
COLOURS = {"text": "#d9d9d9", CROSS: "#4c9be8", SELF: "#f08a4b"}
TOUCHES = {"text": "text tokens only (visual stream passes through)",
           CROSS: "text queries attend to the visual tokens (cross-attention), then text-only",
           SELF: "candidate: when executed, full layer over [visual; text]; else text-only"}


def layer_plan(path: Path) -> Path:
    cfg = visorlib.get_config(CARD)
    plan = LayerPlan(cfg.decoder.num_layers, cfg.visor)
    configuration = sorted(min(plan.configurations, key=len))
    fig, ax = plt.subplots(figsize=(10, 2.6))
    for layer, role in enumerate(plan.roles):
        ax.add_patch(plt.Rectangle((layer, 0.35), 0.9, 0.5, color=COLOURS[role]))
        ax.text(layer + 0.45, 0.6, str(layer), ha="center", va="center", fontsize=8)
        if layer in configuration:
            ax.text(layer + 0.45, 0.15, "runs", ha="center", va="center", fontsize=7, color="#b04a10")
    ax.set_xlim(-0.2, plan.num_layers + 0.2)
    ax.set_ylim(0, 1.1)
    ax.axis("off")
    ax.set_title(f"{CARD}: layer plan ({plan.describe(configuration)} configuration {configuration} marked 'runs')",
                 fontsize=10)
    ax.legend(handles=[Patch(color=COLOURS[r], label=f"{r}: {TOUCHES[r]}") for r in ("text", CROSS, SELF)],
              loc="upper center", bbox_to_anchor=(0.5, -0.02), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def demo_pages(path: Path) -> Path:
    """Two held-out pages of the shipped model's task, enlarged, with one question of each kind."""
    import random

    from visorlib.demo import HELD_OUT_SEED
    from visorlib.train.synthdoc import DEFAULT_TASK, pages

    tile = visorlib.get_config("visor-synthdoc-tiny").vision.image_size
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    for number, (ax, (image, facts, _)) in enumerate(zip(axes, pages(HELD_OUT_SEED, 2, tile, DEFAULT_TASK), strict=True), 1):
        ax.imshow(image.resize((8 * image.width, 8 * image.height), 0))  # nearest: every pixel stays sharp
        ax.axhline(8 * tile, color="white", lw=0.6, ls="--")  # where the processor cuts the tiles
        ax.axvline(8 * tile, color="white", lw=0.6, ls="--")
        qa = {c: (q, a) for c, q, a in DEFAULT_TASK.questions(facts, random.Random(f"demo-{number}"))}
        ax.set_title(f"page {number} (held-out seed {HELD_OUT_SEED})", fontsize=9)
        ax.set_xlabel("\n".join(f"[{c}] {q}  ->  {a}" for c, (q, a) in qa.items()), fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("visorlib demo's pages: 2 x 2 tiles of 32 px (dashed), one stamp each", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def shipped_accuracy_vs_flops(path: Path) -> Path:
    """``visorlib eval --plot`` of the shipped ``visor-synthdoc-tiny`` on 30 held-out pages."""
    import tempfile

    import torch

    from visorlib.demo import HELD_OUT_SEED
    from visorlib.eval import evaluate
    from visorlib.train.synthdoc import DEFAULT_TASK, make_synthdoc_dataset

    torch.set_num_threads(1)
    model = visorlib.build("visor-synthdoc-tiny", pretrained=True)
    with tempfile.TemporaryDirectory() as tmp:
        data = make_synthdoc_dataset(Path(tmp) / "held-out", model.cfg, 30, seed=HELD_OUT_SEED, task=DEFAULT_TASK)
        files = [str(data.parent / f"{kind}.jsonl") for kind in DEFAULT_TASK.categories]
        report = evaluate(model, files, configs="all", max_new_tokens=4)
        report.plot(path)
    return path


def main() -> None:
    made = [layer_plan(HERE / "layer-plan.png"),
            plot_flops_vs_visual_tokens(visorlib.get_config(CARD), HERE / "flops-vs-visual-tokens.png"),
            demo_pages(HERE / "demo-pages.png"),
            shipped_accuracy_vs_flops(HERE / "synthdoc-accuracy-vs-flops.png")]
    for path in made:
        print(path)


if __name__ == "__main__":
    main()
