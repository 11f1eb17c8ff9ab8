"""What the docs' code examples say they print is what the code prints.

Docs drift silently: a card is added and the ``list_models()`` output in the getting-started page
still shows the old six; a count changes and ``visorlib info`` in the docs still shows the old
total. This module reads every fenced code block under ``docs/`` and checks each printed claim that
can be computed offline (no weights, meta-device builds only):

* ``list_models(...)`` outputs (``# [...]`` on the same or the next line; ``...`` in the list stands
  for the names left out in the middle or at the end);
* parameter tables of ``visorlib info`` / ``visorlib profile`` reports, per component;
* the profile report's input line (tiles, visual tokens) and its analytic FLOPs and KV-cache lines;
* ``sum(p.numel() ...) / 1e9  # 8.03`` after a ``build(..., device="meta")``;
* ``cfg.<field>  # value`` after ``cfg = visorlib.get_config(...)``.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import pytest

import visorlib
from visorlib.cli import default_profile_image, parameter_breakdown
from visorlib.models import family_of
from visorlib.utils import human

DOCS = Path(__file__).resolve().parents[1] / "docs"
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)


def code_blocks() -> list[tuple[str, str, str]]:
    """``(page, language, text)`` of every top-level fenced block of the docs."""
    blocks = []
    for page in sorted(DOCS.glob("*.md")):
        for match in FENCE.finditer(page.read_text()):
            blocks.append((page.name, match.group(1), match.group(2)))
    return blocks


@cache
def meta_model(name: str):
    return visorlib.build(name, device="meta")


def _list_claims():
    claims = []
    for page, _, text in code_blocks():
        lines = text.splitlines()
        for i, line in enumerate(lines):
            call = re.search(r"list_models\(([^)]*)\)", line)
            if not call:
                continue
            comment = line.split("#", 1)[1] if "#" in line else ""
            if "[" not in comment and i + 1 < len(lines) and lines[i + 1].lstrip().startswith("#"):
                comment = lines[i + 1].lstrip()[1:]
            listed = re.search(r"\[.*\]", comment)
            if listed:
                args = ast.literal_eval(f"({call.group(1)},)") if call.group(1).strip() else ()
                claims.append(pytest.param(args, ast.literal_eval(listed.group(0)), id=f"{page}:{i}"))
    return claims


LIST_CLAIMS = _list_claims()


def test_the_docs_hold_list_models_claims():
    assert len(LIST_CLAIMS) >= 4  # getting-started, index and zoo (two): the checks below really run


@pytest.mark.parametrize("args, shown", LIST_CLAIMS)
def test_list_models_output(args, shown):
    actual = visorlib.list_models(*args)
    if Ellipsis not in shown:
        assert shown == actual
        return
    cut = shown.index(Ellipsis)
    head, tail = shown[:cut], shown[cut + 1:]
    assert actual[: len(head)] == head and len(actual) > len(head) + len(tail)
    assert not tail or actual[-len(tail):] == tail


def _report_blocks():
    """Text blocks that are a ``visorlib info`` or ``visorlib profile`` report, with their model."""
    found = []
    for page, _, text in code_blocks():
        name = re.search(r"^\$ visorlib (?:info|profile) (\S+)|^(\S+) -- random", text, re.MULTILINE)
        if name and re.search(r"^\s*parameters\s*$", text, re.MULTILINE):
            found.append(pytest.param(name.group(1) or name.group(2), text, id=f"{page}:{name.group(1) or name.group(2)}"))
    return found


REPORTS = _report_blocks()


def test_the_docs_hold_reports():
    assert {p.values[0] for p in REPORTS} >= {"llava-ov-0.5b", "visor-llava-ov-0.5b"}


@pytest.mark.parametrize("name, text", REPORTS)
def test_parameter_tables(name, text):
    shown = {part: int(count.replace(",", "")) for part, count in
             re.findall(r"^\s+(\w+)\s+(\d[\d,]*)\s+\(", text, re.MULTILINE)}
    actual = parameter_breakdown(meta_model(name))
    assert shown and "total" in shown
    assert shown == {part: actual[part] for part in shown}
    assert set(shown) == set(actual), "a component is missing from the docs' table"


@pytest.mark.parametrize("name, text", [p for p in REPORTS if "analytic prefill FLOPs" in p.values[1]])
def test_profile_report_tokens_and_flops(name, text):
    cfg = visorlib.get_config(name)
    tiles, n_visual, n_text = map(int, re.search(r"-> (\d+) tiles\S*, (\d+) visual tokens \+ (\d+) text tokens", text).groups())
    ids, _, real_tiles = family_of(cfg).processor(cfg, None).profile_inputs(default_profile_image(), n_text)
    assert (tiles, n_visual) == (real_tiles, int((ids == cfg.tokens.image_token_id).sum()))
    report = visorlib.flops(cfg, n_visual=n_visual, n_text=n_text, tiles=tiles)
    values = {**report.components, "total": report.total}
    shown = dict(re.findall(r"^\s+(\w+)\s+(\d[\d.]* \w?FLOP)\s+[\d.]+ %", text, re.MULTILINE))
    assert shown and shown == {part: human(values[part], "FLOP") for part in shown}
    kv = re.search(r"KV cache after prefill \(bf16\): (.+)$", text, re.MULTILINE).group(1).strip()
    assert kv == human(report.kv_cache_bytes, "B")


def _python_claims():
    """``(model, shown)`` for parameter totals in billions, ``(card, attribute path, shown)`` for card fields."""
    totals, fields = [], []
    for page, language, text in code_blocks():
        if language != "python":
            continue
        built = dict((var, name) for var, name in re.findall(r'(\w+) = visorlib\.build\("([^"]+)", device="meta"\)', text))
        for var, shown in re.findall(r"sum\(p\.numel\(\) for p in (\w+)\.parameters\(\)\) / 1e9\)\s*#\s*([\d.]+)", text):
            totals.append(pytest.param(built[var], shown, id=f"{page}:{built[var]}"))
        cards = dict(re.findall(r'(\w+) = visorlib\.get_config\("([^"]+)"\)', text))
        for var, path, shown in re.findall(r"^(\w+)((?:\.\w+)+)\s+#\s*([\d.]+)\b", text, re.MULTILINE):
            if var in cards:
                fields.append(pytest.param(cards[var], path[1:], shown, id=f"{page}:{var}{path}"))
    return totals, fields


TOTALS, FIELDS = _python_claims()


@pytest.mark.parametrize("name, shown", TOTALS)
def test_parameter_totals_in_billions(name, shown):
    decimals = len(shown.split(".")[1]) if "." in shown else 0
    assert f"{sum(p.numel() for p in meta_model(name).parameters()) / 1e9:.{decimals}f}" == shown


@pytest.mark.parametrize("name, path, shown", FIELDS)
def test_card_fields(name, path, shown):
    value = visorlib.get_config(name)
    for attr in path.split("."):
        value = getattr(value, attr)
    assert str(value) == shown


def test_the_docs_hold_python_claims():
    assert TOTALS and len(FIELDS) >= 2
