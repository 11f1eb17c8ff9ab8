"""The package's shape: no import cycle, no family branch outside a family folder, router training on every family.

The first two read visorlib's source with ``ast`` (comments and docstrings cannot trip them; each
is first shown to catch a planted violation). The last trains a tiny router for every family of
tests/visor_helpers.py ``CASES`` through ``visorlib.train.router.train_router``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from visor_helpers import CASES, build

import visorlib
from visorlib.data.conversations import collate
from visorlib.train.router import train_router

PACKAGE = Path(visorlib.__file__).resolve().parent


# -- imports: every import statement, module or function level ---------------------------------------------------


def import_graph(root: Path) -> dict[Path, set[Path]]:
    """``file -> files it imports`` within the package at ``root``.

    Every ``import`` / ``from ... import`` anywhere in a file counts (a function-level import is
    still a dependency, only a later one) and so does ``importlib.import_module("<package>...")``.
    ``from .pkg import name`` points at ``pkg/name.py`` when that file exists, else at
    ``pkg/__init__.py`` (the rule of /work/shared/tools/import_cycles.py).
    """
    files = {p.resolve() for p in root.rglob("*.py")}

    def module_file(parts: list[str]) -> Path | None:
        base = root.parent.joinpath(*parts)
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate in files:
                return candidate
        return None

    graph: dict[Path, set[Path]] = {f: set() for f in files}
    for file in files:
        package = list(file.relative_to(root.parent).parent.parts)
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            targets: list[Path | None] = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    module = package[: len(package) - node.level + 1] + (node.module.split(".") if node.module else [])
                elif (node.module or "").split(".")[0] == root.name:
                    module = node.module.split(".")
                else:
                    continue
                targets += [module_file(module + [alias.name]) or module_file(module) for alias in node.names]
            elif isinstance(node, ast.Import):
                targets += [module_file(a.name.split(".")) for a in node.names if a.name.split(".")[0] == root.name]
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module":
                name = node.args[0].value if node.args and isinstance(node.args[0], ast.Constant) else None
                if isinstance(name, str) and name.split(".")[0] == root.name:
                    targets.append(module_file(name.split(".")))
            graph[file] |= {t for t in targets if t is not None and t != file}
    return graph


def cycles(graph: dict[Path, set[Path]]) -> list[list[Path]]:
    """The strongly connected components of more than one file (Tarjan), each sorted."""
    index: dict[Path, int] = {}
    low: dict[Path, int] = {}
    stack: list[Path] = []
    found: list[list[Path]] = []

    def visit(v: Path) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_import_walker_finds_a_function_level_cycle(tmp_path):
    pkg = tmp_path / "visorlib"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .b import thing\n")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("def thing():\n    from ..a import b  # lazy, still a cycle\n")
    (pkg / "c.py").write_text("import visorlib.a\n")
    graph = import_graph(pkg)
    assert graph[(pkg / "c.py").resolve()] == {(pkg / "a.py").resolve()}
    assert [[p.name for p in c] for c in cycles(graph)] == [["a.py", "b.py"]]
    (pkg / "sub" / "b.py").write_text("def thing():\n    return 1\n")
    assert cycles(import_graph(pkg)) == []


def test_visorlib_has_no_import_cycle():
    found = cycles(import_graph(PACKAGE))
    assert not found, "import cycles:\n" + "\n".join(", ".join(str(p.relative_to(PACKAGE.parent)) for p in c) for c in found)


# -- family branches: only a family's own folder may name it ----------------------------------------------------

FAMILY_NAMES = {"llava_onevision", "qwen2_vl", "fast_vlm", "fastvit", "siglip", "qwen2_5_vl", "internvl", "internvit"}
BRANCH_FIELDS = {"kind", "family"}
ALLOWED = {"registry.py"}  # the registry maps names to the code registered under them


def _strings(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [s for element in node.elts for s in _strings(element)]
    return []


def _field(node: ast.AST) -> str | None:
    """``kind`` / ``family`` for a card's name fields (``cfg.vision.kind``, ``family``), else None.

    numpy's ``dtype.kind`` (a type code, ``"u"``, ``"f"``) is not one.
    """
    if isinstance(node, ast.Attribute) and not (isinstance(node.value, ast.Attribute) and node.value.attr == "dtype"):
        name = node.attr
    else:
        name = node.id if isinstance(node, ast.Name) else None
    return name if name in BRANCH_FIELDS else None


def family_branches(source: str, filename: str = "<source>") -> list[str]:
    """Comparisons in code (not comments or docstrings) that branch on a family, by line.

    That is: a comparison with a family or tower name (``x == "qwen2_vl"``, ``k in ("siglip", ...)``);
    a ``kind`` / ``family`` compared (``==``, ``!=``, ``in``, ``not in``) with a literal name or with
    another one (``cfg.decoder.kind == "qwen2"``); or a ``match`` on one.
    """
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            named = {s for o in operands for s in _strings(o)} & FAMILY_NAMES
            fields = [o for o in operands if _field(o)]
            others = [o for o in operands if not _field(o)]
            by_field = bool(fields) and (len(fields) > 1 or any(_strings(o) for o in others)) and any(
                isinstance(op, (ast.Eq, ast.NotEq, ast.In, ast.NotIn)) for op in node.ops)
            if named or by_field:
                found.append((node.lineno, f"{filename}:{node.lineno}: {ast.unparse(node)}"))
        elif isinstance(node, ast.Match) and _field(node.subject):
            found.append((node.lineno, f"{filename}:{node.lineno}: match {ast.unparse(node.subject)}"))
    return [text for _, text in sorted(found)]


def outside_family_folders(root: Path) -> list[Path]:
    """visorlib's files except ``models/<family>/`` and the allow-listed ones."""
    families = {p.parent for p in (root / "models").glob("*/__init__.py")}
    return sorted(p for p in root.rglob("*.py")
                  if not any(f in p.parents for f in families) and str(p.relative_to(root)) not in ALLOWED)


def test_the_branch_finder_sees_code_not_text():
    planted = '''
"""Docstrings may say cfg.family == "qwen2_vl"."""
# and so may comments: if kind == "siglip"
def f(cfg, kind):
    if cfg.family == "qwen2_vl":  # 5
        return 1
    if kind in ("siglip", "other"):  # 7
        return 2
    if cfg.vision.kind != "qwen2":  # 9
        return 3
    match cfg.family:  # 11
        case _:
            return 4
    return "fast_vlm"
'''
    assert [line.split(":")[1] for line in family_branches(planted)] == ["5", "7", "9", "11"]
    # Not family branches: identity and order tests, names that are not card fields, numpy type codes.
    unrelated = "cfg.family is None or cfg.kind > 2 or kind in TEXT_TYPES or image.dtype.kind not in 'uif'"
    assert family_branches(unrelated) == []


def test_no_family_branch_outside_a_family_folder():
    files = outside_family_folders(PACKAGE)
    assert PACKAGE / "visor" / "executor.py" in files and PACKAGE / "models" / "base.py" in files
    assert not any("llava_onevision" in p.parts for p in files)
    found = [hit for p in files for hit in family_branches(p.read_text(), str(p.relative_to(PACKAGE.parent)))]
    assert not found, "family branches outside visorlib/models/<family>/:\n" + "\n".join(found)


# -- router training on every family ------------------------------------------------------------------------------


class Samples(list):
    """The part of :class:`~visorlib.data.conversations.ConversationDataset` router training reads: a
    ``name`` and encoded samples (``input_ids``, ``labels`` and the family's vision tensors)."""

    def __init__(self, name, samples):
        super().__init__(samples)
        self.name = name


def encoded_samples(case, model, n=6):
    """``n`` single-sample encodings in the family's own input layout (variants 0-2, two seeds)."""
    out = []
    for k in range(n):
        inputs = case.batch(model, [case.sample(model, k % 3, seed=k)], seed=k)
        ids = inputs.pop("input_ids")[0]
        inputs.pop("attention_mask")
        out.append({"input_ids": ids, "labels": ids.clone(), **inputs})
    return out


def routing_loss(model, data, labels) -> float:
    """The router's cross-entropy on all of ``data`` through the public routing phase, ``model.route``."""
    batch = collate(list(data), pad_id=0)
    batch.pop("labels")
    with torch.no_grad():
        report = model.route(**batch)
    targets = torch.tensor([model.plan.configurations.index(labels[data.name, int(s)]) for s in report.routed_samples])
    return float(F.cross_entropy(report.router_logits, targets))


@pytest.fixture(scope="module")
def trained_router():
    """``case -> (state before, model, train_router's report, routing loss before, after)``, trained once."""
    done = {}

    def get(case):
        if case.name not in done:
            model = build(case.tiny_cfg())
            data = Samples("synthetic", encoded_samples(case, model))
            configurations = model.plan.configurations
            # A label per input shape (variant): what a router can tell apart after two random tiny layers.
            labels = {("synthetic", i): list(configurations[(0, 3, 1)[i % 3]]) for i in range(len(data))}
            before = {k: v.clone() for k, v in model.state_dict().items()}
            loss_before = routing_loss(model, data, labels)
            report = train_router(model, [data], labels, pad_id=0, steps=40, lr=3e-2, batch_size=4, eval_fraction=0.2)
            done[case.name] = before, model, report, loss_before, routing_loss(model, data, labels)
        return done[case.name]

    return get


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_router_training_lowers_its_loss_and_changes_only_the_router(request, trained_router, case):
    if case.name == "internvl":
        # Open (issue 23): the tiny InternVL's routing loss falls ~5 % in 40 steps, not the 10 % asked.
        request.applymarker(pytest.mark.xfail(reason="tiny InternVL router learns too slowly", strict=False))
    before, model, report, loss_before, loss_after = trained_router(case)
    assert report["train_loss_last"] < report["train_loss_first"], report
    assert report["eval_samples"] == 1 and report["flops_saving_vs_full"] >= 1.0
    assert loss_after < 0.9 * loss_before
    params = model.state_dict()  # checkpoint names, as ``before`` holds them
    changed = {k for k in params if not torch.equal(before[k], params[k])}
    # The MLP only: the routing token's embedding is an input of every later layer and stays.
    assert changed == {k for k in params if k.startswith("router.") and k != "router.token"}, sorted(changed)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_router_training_leaves_every_fixed_configuration_unchanged(trained_router, case):
    """Only the choice changes: under each fixed configuration the model answers as before."""
    before, model, _, _, _ = trained_router(case)
    untrained = build(case.tiny_cfg())
    untrained.load_state_dict(before)
    inputs = case.batch(model, [case.sample(model, v) for v in range(2)])
    with torch.no_grad():
        for config in model.plan.configurations:
            assert torch.equal(model(**inputs, sa_layers=config).logits, untrained(**inputs, sa_layers=config).logits)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_router_training_leaves_every_buffer_alone(trained_router, case):
    # FastViT's BatchNorm running statistics are buffers: a frozen tower must not update them.
    before, model, _, _, _ = trained_router(case)
    buffers = {k.removeprefix("language_model."): v for k, v in model.named_buffers()}  # checkpoint names
    assert not [k for k in buffers if k in before and not torch.equal(before[k], buffers[k])]
