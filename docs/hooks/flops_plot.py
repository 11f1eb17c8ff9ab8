"""MkDocs hook: the VISOR cost table and the FLOPs-vs-visual-tokens plot, computed at build time.

``docs/visor.md`` holds two markers that this hook replaces, so the numbers on the page always
come from the code (:func:`visorlib.flops`) rather than from a copy that can go stale:

* ``<!-- flops-table -->`` -- a Markdown table: language-model prefill FLOPs, saving against the
  dense model, KV-cache bytes (bf16) and decode-step FLOPs of the dense ``llava-ov-0.5b`` and of
  ``visor-llava-ov-0.5b`` under a few configurations, at two image sizes;
* ``<!-- flops-plot -->`` -- the image ``assets/flops-vs-visual-tokens.png`` (the analogue of the
  VISOR paper's Fig. 10): language-model FLOPs against the number of visual tokens (500 to
  10,000, 64 text tokens) for the same models and configurations.

The PNG is drawn with matplotlib's Agg canvas (no display needed) and added to the build as a
generated file in ``on_files``, so MkDocs' link validation sees it, ``--strict`` passes, and it
lands in whatever ``--site-dir`` is used; nothing is written into ``docs/``. Without matplotlib
the image is skipped (an INFO message, not a warning, so ``--strict`` still passes) and the marker
becomes a short note.

Registered in ``mkdocs.yml`` under ``hooks:``.
"""

from __future__ import annotations

import io
import logging

log = logging.getLogger("mkdocs.hooks.flops_plot")

TABLE_MARKER = "<!-- flops-table -->"
PLOT_MARKER = "<!-- flops-plot -->"
IMAGE = "assets/flops-vs-visual-tokens.png"

DENSE = "llava-ov-0.5b"
VISOR = "visor-llava-ov-0.5b"
TABLE_CONFIGS = ([1, 4], [1, 4, 7, 16], [1, 4, 7, 10, 16, 19, 22])
PLOT_CONFIGS = ([1, 4], [1, 4, 7, 16], [1, 4, 7, 10, 16, 19, 22])
TABLE_LENGTHS = (1485, 7371)  # a 384x384 image; a 1000x1000 image (LLaVA-OV anyres_max_9)
PLOT_LENGTHS = range(500, 10001, 250)
N_TEXT = 64

_state: dict[str, object] = {"image": False, "reason": ""}


def _fmt(value: float, unit: str) -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {prefix}{unit}"
    return f"{value:.0f} {unit}"


def _configs():
    """(dense config, VISOR config, plan) from the zoo cards."""
    import visorlib
    from visorlib.visor import LayerPlan

    dense, visor = visorlib.get_config(DENSE), visorlib.get_config(VISOR)
    return dense, visor, LayerPlan(visor.decoder.num_layers, visor.visor)


def _table() -> str:
    import visorlib

    dense, visor, plan = _configs()
    lines = [
        "| Visual tokens | Model | Configuration | LM prefill FLOPs | Saving vs dense | KV cache (bf16) | Decode-step FLOPs |",
        "|---:|---|---|---:|---:|---:|---:|",
    ]
    for n_visual in TABLE_LENGTHS:
        base = visorlib.flops(dense, n_visual, N_TEXT)
        rows = [(f"`{DENSE}`", "dense (24 SA)", base)]
        rows += [(f"`{VISOR}`", f"{plan.describe(c)} `{c}`", visorlib.flops(visor, n_visual, N_TEXT, sa_layers=c))
                 for c in TABLE_CONFIGS]
        for model, config, report in rows:
            lines.append(
                f"| {n_visual:,} | {model} | {config} | {_fmt(report.language_model, 'FLOP')} | "
                f"{base.language_model / report.language_model:.1f}× | {report.kv_cache_bytes / 1e6:.1f} MB | "
                f"{_fmt(report.decode_step, 'FLOP')} |"
            )
    return "\n".join(lines)


def _plot_png() -> bytes:
    """The PNG bytes of the plot (raises ImportError without matplotlib)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    import visorlib

    dense, visor, plan = _configs()
    lengths = list(PLOT_LENGTHS)
    base = [visorlib.flops(dense, n, N_TEXT).language_model for n in lengths]
    fig = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(fig)
    cost, saving = fig.subplots(1, 2)
    cost.plot(lengths, [b / 1e12 for b in base], "k-", lw=2, label=f"{DENSE} (dense)")
    for config in PLOT_CONFIGS:
        values = [visorlib.flops(visor, n, N_TEXT, sa_layers=config).language_model for n in lengths]
        label = f"{plan.describe(config)} {config}"
        cost.plot(lengths, [v / 1e12 for v in values], lw=1.5, label=label)
        saving.plot(lengths, [b / v for b, v in zip(base, values, strict=True)], lw=1.5, label=label)
    cost.set(xlabel="visual tokens", ylabel="language-model prefill TFLOPs",
             title=f"FLOPs vs visual sequence length ({N_TEXT} text tokens)")
    saving.set(xlabel="visual tokens", ylabel="saving vs dense (×)", title=f"{VISOR}: saving vs dense")
    for ax in (cost, saving):
        ax.grid(alpha=0.3)
        ax.set_xlim(lengths[0], lengths[-1])
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    buffer = io.BytesIO()
    # No "Software" metadata: the bytes do not change with the matplotlib version.
    fig.savefig(buffer, format="png", dpi=120, metadata={"Software": None})
    return buffer.getvalue()


def on_files(files, config):
    """Add the generated PNG to the build (or note why it is skipped)."""
    from mkdocs.structure.files import File

    _state.update(image=False, reason="")
    try:
        png = _plot_png()
    except ImportError as err:
        _state["reason"] = f"matplotlib is not installed ({err})"
        log.info("flops_plot: skipping %s: %s", IMAGE, _state["reason"])
        return files
    existing = files.get_file_from_path(IMAGE)
    if existing is not None:
        files.remove(existing)
    files.append(File.generated(config, IMAGE, content=png))
    _state["image"] = True
    return files


def on_page_markdown(markdown, page, config, files):  # noqa: ARG001 - MkDocs hook signature
    """Replace the markers with the table and the image (or a note)."""
    if TABLE_MARKER in markdown:
        markdown = markdown.replace(TABLE_MARKER, _table())
    if PLOT_MARKER in markdown:
        if _state["image"]:
            depth = page.file.src_uri.count("/")
            image = f"![Language-model FLOPs against visual tokens, dense and VISOR]({'../' * depth}{IMAGE})"
        else:
            image = (
                '!!! note "Plot not built"\n'
                f"    The FLOPs-vs-visual-tokens plot needs matplotlib, which this documentation build did not "
                f"have ({_state['reason'] or 'unknown reason'}). `pip install matplotlib` and rebuild, or run "
                "`visorlib profile visor-llava-ov-0.5b --plot flops.png`."
            )
        markdown = markdown.replace(PLOT_MARKER, image)
    return markdown
