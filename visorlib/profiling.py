"""Measured and analytic cost of a model on one input: the engine of ``visorlib profile``.

The vision tower runs once; the language model is then timed under every configuration of the
model's layer plan (and under the dense plan, on the same weights), next to the analytic FLOPs
and KV-cache bytes of :mod:`visorlib.flops`. Timings are wall-clock seconds on whatever device
the model is on (CUDA is synchronised), best of ``repeats``.

Token-reduction rows (``reductions``; :data:`PAPER_REDUCTIONS` holds each method at the paper's
settings) run the vision path under their spec (a pre-LLM method changes the visual tokens, and
its ``vision_seconds`` include the scoring) and the language model with the spec's in-LLM pruning,
against the same dense row.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .flops import flops
from .utils import best_time, human  # noqa: F401  (human: profile tables; both importable from here)
from .visor.plan import LayerPlan

#: Each token-reduction method at the paper's settings for LLaVA-OneVision (appendix L; FastV at
#: its own defaults): ``(label, spec)``.
PAPER_REDUCTIONS: tuple[tuple[str, dict], ...] = (
    ("visionzip 128/tile (104+24)", {"method": "visionzip"}),
    ("vispruner 128/tile (96+32)", {"method": "vispruner"}),
    ("hired 20%", {"method": "hired"}),
    ("pooling 8x", {"method": "pooling"}),
    ("fastv K=2 R=50%", {"method": "fastv"}),
    ("pyramiddrop easy", {"method": "pyramiddrop"}),
)


def paper_reduction_rows(
    plan: LayerPlan, pre_llm: bool = True, tile_tokens: int = 729
) -> list[tuple[str, object, list[int] | None]]:
    """``(label, spec, sa_layers)`` rows: every method at the paper's settings on the dense plan and,
    for a VISOR plan, its 2-SA configuration (8CA-2SA for the 0.5B card) with VisionZip (paper §4.4).

    Args:
        plan: The model's layer plan.
        pre_llm: Include the pre-LLM methods (False for a family without a pre-LLM path: Qwen2-VL).
        tile_tokens: Tokens per tile. Tiles smaller than the paper's 128-token budget (tiny test
            cards) get the same share of a tile instead, 128/729.
    """
    def scaled(spec: dict) -> dict:
        if spec["method"] in ("visionzip", "vispruner") and tile_tokens < 128:
            return {**spec, "keep": 128 / 729}
        return spec

    rows: list[tuple[str, object, list[int] | None]] = [
        (label, scaled(spec), None) for label, spec in PAPER_REDUCTIONS
        if pre_llm or spec["method"] in ("fastv", "pyramiddrop")
    ]
    if pre_llm and not plan.dense and plan.configurations:
        config = min(plan.configurations, key=len)
        rows.append((f"{plan.describe(config)} {list(config)} + visionzip", scaled({"method": "visionzip"}),
                     list(config)))
    return rows


def spec_rows(plan: LayerPlan, spec: object) -> list[tuple[str, object, list[int] | None]]:
    """Rows for one user spec (``visorlib profile --token-reduction``): the dense plan and, for a VISOR
    plan, its smallest configuration."""
    text = json.dumps(spec, separators=(",", ":"))
    rows: list[tuple[str, object, list[int] | None]] = [(f"dense + {text}", spec, None)]
    if not plan.dense and plan.configurations:
        config = min(plan.configurations, key=len)
        rows.append((f"{plan.describe(config)} {list(config)} + {text}", spec, list(config)))
    return rows


@torch.inference_mode()
def profile_configurations(
    model,
    input_ids: torch.Tensor,
    vision_inputs: dict,
    tiles: int,
    repeats: int = 1,
    configurations: Sequence[Sequence[int]] | None = None,
    log: Callable[[str], None] = lambda _: None,
    reductions: Sequence[tuple[str, object, Sequence[int] | None]] = (),
    prompt_for: Callable[[object], torch.Tensor] | None = None,
) -> dict:
    """Vision time once, then language-model time and cost for dense and each configuration.

    Args:
        model: A visorlib model.
        input_ids: ``[1, L]`` prompt with expanded visual placeholders.
        vision_inputs: ``pixel_values``, ``image_sizes`` ... for :meth:`embed`.
        tiles: Tiles through the vision tower (for the FLOP count).
        repeats: Timed runs per row (the best is kept).
        configurations: Rows to measure; default: every configuration of the plan.
        log: Progress callback.
        reductions: Token-reduction rows ``(label, spec, sa_layers)`` (``sa_layers`` None: the dense
            plan), after the configuration rows.
        prompt_for: ``spec -> input_ids`` with the placeholders expanded under ``spec`` (the
            processor's count); needed when a row's spec has a pre-LLM method.

    Returns:
        ``{"vision_seconds", "visual_tokens", "text_tokens", "rows": [...]}``; each row holds the
        configuration, analytic language-model FLOPs, KV-cache bytes (bf16), decode-step FLOPs,
        measured seconds and the ratios to the dense row; token-reduction rows add their spec,
        visual tokens and ``vision_seconds``.
    """
    device = input_ids.device
    log("vision tower + projector ...")
    vision_seconds = best_time(lambda: model.embed(input_ids, **vision_inputs), repeats, device)
    embeds, visual_mask, segments = model.embed(input_ids, **vision_inputs)
    n_visual = int(visual_mask.sum())
    n_text = input_ids.shape[1] - n_visual
    plan = model.plan
    rows = [("dense", LayerPlan(plan.num_layers), None)]
    if not plan.dense:
        for config in configurations or plan.configurations:
            rows.append((plan.describe(config) + " " + str(list(config)), plan, list(config)))
    results = []
    warmed = False
    jobs = [(label, row_plan, config, None, False) for label, row_plan, config in rows]
    for label, spec, config in reductions:
        jobs.append((label, plan if config is not None else LayerPlan(plan.num_layers),
                     None if config is None else list(config), spec, True))
    for label, row_plan, config, spec, reduced in jobs:
        row_ids, row_embeds, row_visual, row_segments, row_visual_n = input_ids, embeds, visual_mask, segments, n_visual
        extra = {}
        if reduced:
            pre_llm = model.reducers(spec)[0]
            if pre_llm:
                if prompt_for is None:
                    raise ValueError(f"row {label!r}: a pre-LLM token reduction needs prompt_for (the reduced prompt)")
                row_ids = prompt_for(spec).to(device)
            # Only families with a pre-LLM path (LLaVA-OneVision, FastVLM) take token_reduction in embed.
            options = {"token_reduction": spec} if pre_llm else {}
            log(f"vision tower + projector, {label} ...")
            extra["vision_seconds"] = best_time(lambda ids=row_ids, o=options: model.embed(ids, **vision_inputs, **o),
                                                repeats, device)
            row_embeds, row_visual, row_segments = model.embed(row_ids, **vision_inputs, **options)
            row_visual_n = int(row_visual.sum())
            extra.update(token_reduction=spec, visual_tokens=row_visual_n)
        executes = torch.zeros(1, plan.num_layers, dtype=torch.bool, device=device)
        executes[0, config if config is not None else list(range(plan.num_layers))] = True
        # The model's own executor (its decoder, blocks and attention backend), under the row's plan.
        executor = model.language_model.executor(model.reducers(spec)[1] if reduced else (), plan=row_plan)
        row_positions = torch.arange(row_ids.shape[1], device=device)[None]
        row_mask = torch.ones_like(row_ids)

        def run(executor=executor, executes=executes, e=row_embeds, p=row_positions, m=row_mask, v=row_visual,
                g=row_segments):
            hidden = executor.run(e, p, m, v, g, executes)
            return model.decoder.logits(hidden[:, -1:])

        if not warmed:  # first calls pay for allocator growth and kernel selection
            run()
            warmed = True
        log(f"language model, {label} ...")
        seconds = best_time(run, repeats, device)
        # Under a pre-LLM spec, flops derives the visual tokens from the tiles (the same count as row_visual_n).
        report = flops(model.cfg if config is not None else _dense_cfg(model.cfg), row_visual_n, n_text, tiles,
                       sa_layers=config, token_reduction=spec)
        results.append({
            "configuration": label,
            "sa_layers": config,
            **extra,
            "llm_flops": report.language_model,
            "kv_cache_bytes_bf16": report.kv_cache_bytes,
            "decode_step_flops": report.decode_step,
            "llm_seconds": seconds,
        })
    dense = results[0]
    for row in results:
        row["flop_saving"] = dense["llm_flops"] / row["llm_flops"]
        row["kv_saving"] = dense["kv_cache_bytes_bf16"] / row["kv_cache_bytes_bf16"]
        row["speedup"] = dense["llm_seconds"] / row["llm_seconds"]
    return {"vision_seconds": vision_seconds, "visual_tokens": n_visual, "text_tokens": n_text, "rows": results}


def _dense_cfg(cfg):
    import dataclasses

    return dataclasses.replace(cfg, visor=None)


def format_table(profile: dict) -> str:
    """The rows of :func:`profile_configurations` as an aligned text table."""
    head = f"{'configuration':40s} {'visual':>7s} {'LLM FLOPs':>12s} {'saving':>7s} {'KV (bf16)':>10s} {'KV saving':>9s} " \
           f"{'LLM time':>9s} {'speedup':>8s}"
    lines = [head, "-" * len(head)]
    for row in profile["rows"]:
        lines.append(
            f"{row['configuration'][:40]:40s} {row.get('visual_tokens', profile['visual_tokens']):7d} "
            f"{human(row['llm_flops'], 'FLOP'):>12s} {row['flop_saving']:6.2f}x "
            f"{human(row['kv_cache_bytes_bf16'], 'B'):>10s} {row['kv_saving']:8.2f}x "
            f"{row['llm_seconds']:8.3f}s {row['speedup']:7.2f}x"
        )
    return "\n".join(lines)


def plot_flops_vs_visual_tokens(
    cfg,
    path: str | Path,
    configurations: Sequence[Sequence[int]] | None = None,
    n_text: int = 64,
    lengths: Sequence[int] = tuple(range(500, 10001, 500)),
) -> Path:
    """Language-model FLOPs against visual sequence length (paper Fig. 10), saved as an image.

    Needs matplotlib (``pip install visorlib[plot]``).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise RuntimeError("plotting needs matplotlib: pip install 'visorlib[plot]'") from err
    plan = LayerPlan(cfg.decoder.num_layers, cfg.visor)
    if configurations is None and not plan.dense:
        ordered = sorted(plan.configurations, key=len)
        configurations = [ordered[0], ordered[len(ordered) // 2], ordered[-1]]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    dense_cfg = _dense_cfg(cfg)
    ax.plot(lengths, [flops(dense_cfg, n, n_text).language_model / 1e12 for n in lengths], "k-", lw=2, label="dense")
    for config in configurations or []:
        values = [flops(cfg, n, n_text, sa_layers=list(config)).language_model / 1e12 for n in lengths]
        ax.plot(lengths, values, lw=1.5, label=f"{plan.describe(config)} {list(config)}")
    ax.set_xlabel("visual tokens")
    ax.set_ylabel("language-model prefill TFLOPs")
    ax.set_title(f"{cfg.name}: FLOPs vs visual sequence length ({n_text} text tokens)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
