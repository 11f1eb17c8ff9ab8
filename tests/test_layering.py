"""Layers that point one way, and one ``sa_layers`` grammar (issue 20).

The import checks read visorlib's source with the walker of ``test_architecture`` (every import
statement, module or function level): nothing under ``visorlib/train/`` imports ``visorlib/eval/``
or the reverse, the cost model (``flops.py``) sits below the zoo, and shared helpers come from
``visorlib.utils`` rather than private names of ``profiling``. The grammar checks run the one
parser, and show that every text entry point reaches it rather than a copy.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from test_architecture import PACKAGE, import_graph

from visorlib.visor.request import (
    SA_LAYERS_GRAMMAR,
    SaLayersSyntaxError,
    parse_configuration,
    parse_sa_layers,
)


def _under(path: Path, folder: str) -> bool:
    return path.is_relative_to(PACKAGE / folder)


def _edges(graph, source: str, target: str) -> list[str]:
    return sorted(f"{a.relative_to(PACKAGE)} -> {b.relative_to(PACKAGE)}"
                  for a, targets in graph.items() if _under(a, source) for b in targets if _under(b, target))


@pytest.fixture(scope="module")
def graph():
    return import_graph(PACKAGE)


def test_the_edge_finder_sees_a_planted_train_to_eval_import(tmp_path):
    root = tmp_path / "visorlib"
    for folder in ("train", "eval"):
        (root / folder).mkdir(parents=True)
        (root / folder / "__init__.py").write_text("")
    (root / "__init__.py").write_text("")
    (root / "eval" / "runner.py").write_text("X = 1\n")
    (root / "train" / "router.py").write_text("def f():\n    from ..eval.runner import X\n    return X\n")
    planted = import_graph(root)
    edges = [(a.relative_to(root), b.relative_to(root)) for a, t in planted.items() for b in t]
    assert (Path("train/router.py"), Path("eval/runner.py")) in edges


def test_train_and_eval_do_not_import_each_other(graph):
    assert _edges(graph, "train", "eval") == []
    assert _edges(graph, "eval", "train") == []


def test_the_cost_model_sits_below_the_zoo(graph):
    assert PACKAGE / "zoo.py" not in graph[PACKAGE / "flops.py"]


def test_nothing_imports_private_names_of_profiling():
    offenders = []
    for file in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").endswith("profiling"):
                offenders += [f"{file.relative_to(PACKAGE)}: {a.name}" for a in node.names
                              if a.name.startswith("_") or a.name in ("human",)]
    assert offenders == []


# -- the sa_layers grammar ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("1,4", [[1, 4]]),
    ("[1, 4]", [[1, 4]]),
    ("1-4-7", [[1, 4, 7]]),
    ("router;1,4;none", ["router", [1, 4], []]),
    ("default;all;", ["default", "all"]),
    (None, ["default"]),
    ([[1, 4], "router"], [[1, 4], "router"]),
])
def test_the_grammar_reads_words_and_layer_lists(text, expected):
    assert parse_sa_layers(text) == expected


@pytest.mark.parametrize("text", ["ALL", "abc", "1.5", ";", "1,,4", "-1", ""])
def test_text_outside_the_grammar_is_an_error_quoting_it(text):
    with pytest.raises(SaLayersSyntaxError) as err:
        parse_sa_layers(text, "--configs")
    assert "--configs" in str(err.value) and SA_LAYERS_GRAMMAR in str(err.value)
    assert isinstance(err.value, ValueError)


def test_one_configuration_where_one_is_expected():
    assert parse_configuration("default") is None
    assert parse_configuration("1-4") == [1, 4]
    assert parse_configuration([1, 4]) == [1, 4]
    assert parse_configuration("none") == []
    with pytest.raises(SaLayersSyntaxError, match="names 3 configurations"):
        parse_configuration("1;4;7")  # lmms-eval's old spelling of one configuration


def test_every_text_entry_point_uses_the_one_parser(graph):
    """eval's --configs, the lmms-eval plugin and analyze's --sa-layers read text through visor/request.py,
    and no other module splits sa_layers text itself."""
    request = PACKAGE / "visor" / "request.py"
    for user in ("eval/configs.py", "eval/lmms.py", "analysis/cli.py"):
        assert request in graph[PACKAGE / user], user
    parsers = []
    for file in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.FunctionDef) and "sa_layers" in node.name and "parse" in node.name:
                calls = {getattr(c.func, "id", getattr(c.func, "attr", "")) for c in ast.walk(node)
                         if isinstance(c, ast.Call)}
                if file != request and not calls & {"parse_sa_layers", "parse_configuration"}:
                    parsers.append(f"{file.relative_to(PACKAGE)}:{node.name}")
    assert parsers == []


def test_the_plugin_and_the_cli_refuse_a_mistyped_configuration():
    from visorlib.analysis.cli import parse_sa_layers as analyze_sa_layers
    from visorlib.cli_args import UsageError

    assert analyze_sa_layers("1,3") == [1, 3] and analyze_sa_layers(None) is None
    with pytest.raises(UsageError, match="not a layer number.*comma-separated"):
        analyze_sa_layers("1,x")
