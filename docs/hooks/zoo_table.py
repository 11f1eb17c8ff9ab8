"""MkDocs hook: render the model-zoo tables from the zoo cards.

``docs/zoo.md`` holds the markers ``<!-- zoo-table -->`` and ``<!-- zoo-params -->``; this hook
replaces them with Markdown tables built from :func:`visorlib.list_models`,
:func:`visorlib.get_config` and :func:`visorlib.build` on the ``meta`` device (shapes only: no
memory, no download), so the page can never disagree with the cards. The ``base:`` a card
inherits from is read from its YAML; the VISOR plan column comes from ``model.plan``. A card that fails to parse
or build fails the docs build.

Registered in ``mkdocs.yml`` under ``hooks:``.
"""

from __future__ import annotations

import functools

ZOO_TABLE = "<!-- zoo-table -->"
ZOO_PARAMS = "<!-- zoo-params -->"


def _cell(text: object) -> str:
    """Make ``text`` safe inside a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _billions(count: int) -> str:
    return f"{count / 1e9:.2f} B"


def _millions(count: int) -> str:
    return _billions(count) if count >= 1e9 else f"{count / 1e6:,.1f} M"


def _count(module) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def _base(name: str) -> str | None:
    """The ``base:`` card a card inherits from, read from its YAML (None if it has none)."""
    import yaml

    from visorlib.zoo import zoo_dir

    data = yaml.safe_load((zoo_dir() / f"{name}.yaml").read_text())
    return data.get("base") if isinstance(data, dict) else None


def _input_size(vision) -> str:
    """How the tower sees an image: fixed tiles, or (Qwen2-VL) any size in steps of a unit."""
    if vision.kind == "qwen2_vl":
        return f"any resolution (multiples of {vision.image_size} px)"
    return f"{vision.image_size} px tiles"


def _plan(model) -> str:
    """One cell describing the card's VISOR layer plan ("dense" without one)."""
    plan = model.plan
    if plan.dense:
        return "dense"
    visor = model.cfg.visor
    parts = [
        f"{len(plan.ca_layers)} CA + {len(plan.sa_layers)} SA candidates",
        f"{len(plan.configurations)} configurations, default {plan.describe()}",
    ]
    if visor.router:
        parts.append(f"router after layer {plan.router_layer}")
    if visor.packing_ratio > 1:
        parts.append(f"VISOR-TR packing {visor.packing_ratio:g}×")
    return "<br>".join(parts)


@functools.lru_cache(maxsize=1)
def _rows() -> tuple[list[str], list[str]]:
    """(zoo table rows, parameter table rows), computed once per build."""
    import visorlib

    zoo, params = [], []
    for name in visorlib.list_models():
        cfg = visorlib.get_config(name)
        model = visorlib.build(name, device="meta")
        vision, decoder = cfg.vision, cfg.decoder
        backbones = (
            f"`{vision.kind}`: {_input_size(vision)}, {vision.patch_size} px patches, width "
            f"{vision.hidden_size}<br>`{decoder.kind}`: width {decoder.hidden_size}, {decoder.num_heads} heads "
            f"({decoder.num_kv_heads} KV), {'tied' if decoder.tie_word_embeddings else 'untied'} head"
        )
        hub = f"[`{cfg.hub_id}`](https://huggingface.co/{cfg.hub_id})" if cfg.hub_id else "–"
        if cfg.hub_id and cfg.visor is not None:
            hub += "<br>(dense weights; VISOR blocks untrained)"
        base = _base(name)
        title = f"`{name}`" + (f"<br>base: `{base}`" if base else "")
        zoo.append(
            f"| {title} | {_cell(cfg.description)} | {_cell(backbones)} | "
            f"{vision.num_layers} / {decoder.num_layers} | {_plan(model)} | {_billions(_count(model))} | {hub} |"
        )
        newline = 0 if getattr(model, "image_newline", None) is None else model.image_newline.numel()
        blocks = _count(getattr(model, "cross_attention", None)) + _count(getattr(model, "router", None))
        params.append(
            f"| `{name}` | {_millions(_count(model.vision_tower))} | {_millions(_count(model.projector))} | "
            f"{_millions(_count(model.decoder))} | {_millions(blocks) if blocks else '–'} | {newline:,} | "
            f"{_count(model):,} |"
        )
    return zoo, params


def _zoo_table() -> str:
    header = [
        "| Name | Description | Vision / decoder | Layers (vision / decoder) | VISOR plan | Parameters | Hub id |",
        "|---|---|---|---|---|---|---|",
    ]
    return "\n".join(header + _rows()[0])


def _params_table() -> str:
    header = [
        "| Name | Vision tower | Projector | Decoder (embeddings and head included) | VISOR blocks | `image_newline` | Total |",
        "|---|---|---|---|---|---|---|",
    ]
    return "\n".join(header + _rows()[1])


def on_startup(command, dirty):  # noqa: ARG001 - MkDocs hook signature
    """Drop cached rows when ``mkdocs serve`` rebuilds (cards may have changed)."""
    _rows.cache_clear()


def on_pre_build(config):  # noqa: ARG001 - MkDocs hook signature
    _rows.cache_clear()


def on_page_markdown(markdown, page, config, files):  # noqa: ARG001 - MkDocs hook signature
    """Replace the zoo markers with the generated tables."""
    if ZOO_TABLE in markdown:
        markdown = markdown.replace(ZOO_TABLE, _zoo_table())
    if ZOO_PARAMS in markdown:
        markdown = markdown.replace(ZOO_PARAMS, _params_table())
    return markdown
