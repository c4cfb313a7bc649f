"""The docs site's API reference (docs/api/*.rst, built by ``make docs``): every public name
has an entry, so a new name in ``pdepth.__all__`` or a documented module's ``__all__``
without one fails here. Parses the .rst sources; Sphinx is not needed."""

from __future__ import annotations

import importlib
import re
import types
from pathlib import Path

import pytest

import pdepth

ROOT = Path(__file__).resolve().parents[1]
API = ROOT / "docs" / "api"
# The public submodules the reference must cover (issue 27), besides the modules in __all__.
REQUIRED_MODULES = ["ops", "topk", "reference", "depth", "stream", "probes", "families",
                    "builders", "model_score", "hf_data", "protocol", "metrics", "categories",
                    "label_errors", "improve", "scores", "prune", "data", "models",
                    "distributed", "compat", "compat.sklearn", "compat.difficulty",
                    "compat.knndnn"]
DIRECTIVE = re.compile(r"^\.\. (autosummary|toctree)::")
OPTION = re.compile(r"^\s+:[\w-]+:")


def _entries(text: str) -> dict[str, list[str]]:
    """The lines listed under each ``autosummary`` / ``toctree`` directive of an .rst text."""
    found: dict[str, list[str]] = {"autosummary": [], "toctree": []}
    kind = None
    for line in text.splitlines():
        match = DIRECTIVE.match(line)
        if match:
            kind = match.group(1)
        elif kind and line.strip() and not line.startswith(" "):
            kind = None
        elif kind and line.strip() and not OPTION.match(line):
            found[kind].append(line.strip())
    return found


def _page(module: str) -> tuple[str, dict[str, list[str]]]:
    """The page documenting ``pdepth.<module>``: its text and entries."""
    path = API / f"{module}.rst"
    assert path.exists(), f"pdepth.{module} has no API page {path.relative_to(ROOT)}"
    text = path.read_text()
    assert f".. automodule:: pdepth.{module}\n" in text, f"{path.name} does not document it"
    return text, _entries(text)


def _resolve(entry: str, current: types.ModuleType):
    """The object an autosummary entry names (``~`` and the current module handled)."""
    name = entry.lstrip("~")
    if name.startswith("pdepth."):
        module, _, attr = name.rpartition(".")
        return getattr(importlib.import_module(module), attr)
    return getattr(current, name)


def _undocumented(module: types.ModuleType, entries: dict[str, list[str]]) -> list[str]:
    """The names of ``module.__all__`` with no entry: listed in an autosummary (by name, or
    as another documented name of the same object) or, for a submodule, in a toctree."""
    listed = {e.lstrip("~").rsplit(".", 1)[-1] for e in entries["autosummary"]}
    same = {id(_resolve(e, module)) for e in entries["autosummary"]}
    pages = set(entries["toctree"])
    missing = []
    for name in module.__all__:
        obj = getattr(module, name)
        if isinstance(obj, types.ModuleType):
            if obj.__name__.removeprefix("pdepth.") not in pages:
                missing.append(name)
        elif name not in listed or (isinstance(obj, type) and id(obj) not in same):
            missing.append(name)
    return missing


def test_every_top_level_name_has_an_entry():
    text = (API / "index.rst").read_text()
    assert ".. currentmodule:: pdepth\n" in text
    entries = _entries(text)
    assert _undocumented(pdepth, entries) == []
    for entry in entries["autosummary"]:  # and every entry names a real object
        _resolve(entry, pdepth)


@pytest.mark.parametrize("module", REQUIRED_MODULES)
def test_every_public_name_of_a_submodule_has_an_entry(module):
    mod = importlib.import_module(f"pdepth.{module}")
    text, entries = _page(module)
    assert _undocumented(mod, entries) == [], f"docs/api/{module}.rst"
    for entry in entries["autosummary"]:
        _resolve(entry, mod)


def test_every_api_page_is_reachable():
    pages = {p.stem for p in API.glob("*.rst")} - {"index"}
    linked = set(_entries((API / "index.rst").read_text())["toctree"])
    linked |= set(_entries((API / "compat.rst").read_text())["toctree"])
    assert pages <= linked, sorted(pages - linked)
    assert set(REQUIRED_MODULES) <= pages


def test_a_new_public_name_without_an_entry_is_caught():
    fake = types.ModuleType("pdepth.fake")
    fake.knn, fake.new_function, fake.__all__ = pdepth.knn, lambda: None, ["knn", "new_function"]
    entries = {"autosummary": ["knn"], "toctree": []}
    assert _undocumented(fake, entries) == ["new_function"]
    # a class listed under its name but as another object does not count
    fake.Vote, fake.__all__ = type("Vote", (), {}), ["Vote"]
    assert _undocumented(fake, {"autosummary": ["~pdepth.Vote"], "toctree": []}) == ["Vote"]


def test_every_page_is_in_the_navigation():
    index = (ROOT / "docs" / "index.md").read_text()
    pages = {p.stem for p in (ROOT / "docs").glob("*.md")} - {"index", "README"}
    missing = [p for p in sorted(pages) if not re.search(rf"^{re.escape(p)}$", index, re.M)]
    assert missing == []


def test_readme_links_every_docs_page():
    readme = (ROOT / "README.md").read_text()
    pages = {p.name for p in (ROOT / "docs").glob("*.md")} - {"index.md", "README.md"}
    assert [p for p in sorted(pages) if f"(docs/{p})" not in readme] == []
