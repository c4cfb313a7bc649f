"""Sphinx configuration of pdepth's documentation site (docs/README.md says how it is built).

The pages are Markdown (myst-parser); the API reference is generated from the docstrings
(autodoc + autosummary + napoleon, api/*.rst list the names); examples/ is run by
sphinx-gallery during the build, so an example that fails fails the build.
"""

import os
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)  # the checkout's pdepth (with its built extension), not another one

import pdepth  # noqa: E402

project = "pdepth"
author = "pdepth authors"
release = version = pdepth.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinx_gallery.gen_gallery",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
# README.md is the docs' own README (how the site is built), not a page of the site.
exclude_patterns = ["_build", "README.md", "auto_examples/*.ipynb", "auto_examples/*.py",
                    "auto_examples/*.zip", "auto_examples/*.json", "auto_examples/*.md5"]

myst_enable_extensions = ["colon_fence", "dollarmath"]
myst_heading_anchors = 3

autosummary_generate = True
autosummary_imported_members = True
autodoc_default_options = {"members": True, "show-inheritance": False}
autodoc_typehints = "signature"
autodoc_member_order = "bysource"
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "furo"
html_title = f"pdepth {release}"

sphinx_gallery_conf = {
    "examples_dirs": os.path.join(ROOT, "examples"),
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"/",           # run every example, not only plot_*.py
    "abort_on_example_error": True,
    "download_all_examples": False,
    "remove_config_comments": True,
    "within_subsection_order": "FileNameSortKey",
    "show_memory": False,
    "plot_gallery": "True",
}

templates_path = ["_templates"]


def _skip_foreign(app, what, name, obj, skip, options):
    """Leave out members a pdepth class inherits from scikit-learn (its metadata-routing
    ``set_*_request`` methods): their docstrings cite scikit-learn's own site."""
    if (getattr(obj, "__module__", None) or "").startswith("sklearn"):
        return True
    return None


def _no_type_docstring(app, what, name, obj, options, lines):
    """A constant without a ``#:`` comment would show its type's docstring (``tuple``'s,
    ``dict``'s); show its value alone instead."""
    own = type(obj).__doc__
    if what in ("data", "attribute") and isinstance(own, str) and \
            "\n".join(lines).strip() == own.strip():
        lines[:] = []


def setup(app):
    app.connect("autodoc-skip-member", _skip_foreign)
    app.connect("autodoc-process-docstring", _no_type_docstring)
