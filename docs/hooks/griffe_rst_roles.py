"""Griffe extension: turn Sphinx roles in visorlib's docstrings into mkdocstrings cross-references.

The docstrings are Google style but refer to other objects with Sphinx roles
(``:class:`ModelConfig```, ``:func:`.chat.apply_chat_template```, ``:meth:`generate```), which
Markdown would print literally. Each role is resolved the way Sphinx would (relative to the
object's class, module and package) and becomes an autorefs link such as
``[`ModelConfig`][visorlib.config.ModelConfig]`` when the target is rendered in ``docs/api.md``;
otherwise it becomes plain inline code, so an unresolved name can never break
``mkdocs build --strict``.

Loaded by the mkdocstrings Python handler (``extensions:`` in ``mkdocs.yml``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import griffe

PACKAGE = "visorlib"
ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj):`(?P<short>~)?(?P<target>[^`]+)`")
API_PAGE = Path(__file__).resolve().parents[1] / "api.md"
# Members of documented objects that the mkdocstrings `filters` option still renders.
_HIDDEN = re.compile(r"^_(?!_call__$)")


def documented_modules() -> set[str]:
    """Modules rendered with ``::: module`` in the API page."""
    if not API_PAGE.exists():
        return set()
    return {line[4:].strip() for line in API_PAGE.read_text().splitlines() if line.startswith("::: ")}


class SphinxRolesToAutorefs(griffe.Extension):
    """Rewrite ``:role:`target``` in every docstring of the visorlib package."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        if pkg.name != PACKAGE:
            return
        self.pkg = pkg
        self.documented = documented_modules()
        for obj in self._walk(pkg):
            if obj.docstring is not None:
                obj.docstring.value = ROLE.sub(lambda match, obj=obj: self._replace(match, obj), obj.docstring.value)

    def _walk(self, obj: griffe.Object):
        yield obj
        for member in obj.members.values():
            if not member.is_alias:
                yield from self._walk(member)

    def _get(self, path: str) -> griffe.Object | None:
        """The object at dotted ``path`` (aliases followed), or None."""
        parts = path.split(".")
        if parts[0] != PACKAGE:
            return None
        obj: Any = self.pkg
        try:
            # An alias on the way may point outside the package (``:func:`re.sub``` tried as
            # ``visorlib.modules.convert.re.sub``): it cannot be followed, so the path is not ours.
            for part in parts[1:]:
                members = obj.members if not obj.is_alias else obj.final_target.members
                obj = members.get(part)
                if obj is None:
                    return None
            return obj.final_target if obj.is_alias else obj
        except (griffe.AliasResolutionError, griffe.CyclicAliasError):
            return None

    def _candidates(self, target: str, obj: griffe.Object) -> list[str]:
        module = obj if obj.is_module else obj.module
        package = module.parent.path if module.parent is not None else module.path
        if target.startswith("."):
            return [package + target, module.path + target]
        scopes = []
        if obj.is_class:
            scopes.append(obj.path)
        if obj.parent is not None and obj.parent.is_class:
            scopes.append(obj.parent.path)
        scopes += [module.path, package, PACKAGE]
        return [target] + [f"{scope}.{target}" for scope in scopes]

    def _rendered(self, obj: griffe.Object) -> bool:
        """Whether mkdocstrings renders ``obj`` (so an anchor exists for it)."""
        if not obj.docstring:
            return False
        module = obj if obj.is_module else obj.module
        if module.path not in self.documented:
            return False
        inner = obj.path[len(module.path) :].strip(".")
        return not any(_HIDDEN.match(part) for part in inner.split(".") if part)

    def _replace(self, match: re.Match, obj: griffe.Object) -> str:
        target = match["target"]
        label = target.lstrip(".").rsplit(".", 1)[-1] if match["short"] else target.lstrip(".")
        for candidate in self._candidates(target, obj):
            found = self._get(candidate)
            if found is not None and self._rendered(found):
                return f"[`{label}`][{found.path}]"
        return f"`{label}`"
