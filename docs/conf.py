"""Sphinx configuration of pdepth's documentation site (docs/README.md says how it is built).

The pages are Markdown (myst-parser); the API reference is generated from the docstrings
(autodoc + autosummary + napoleon, api/*.rst list the names); examples/ is run by
sphinx-gallery during the build, so an example that fails fails the build.
"""

import json
import os
import shutil
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)  # the checkout's pdepth (with its built extension), not another one

import pdepth  # noqa: E402

project = "pdepth"
author = "pdepth authors"
copyright = "pdepth authors"
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

exclude_patterns += ["_generated"]  # included by report.md, not pages of their own

# examples/plot_run_folder.py keeps its tiny run here; _report_figures turns the run's
# figures, their captions (pdepth.figures) and its summary.json claims into a page section.
DOCS = os.path.dirname(os.path.abspath(__file__))
TINY_RUN = os.path.join(DOCS, "_build", "tiny-run")
GENERATED = os.path.join(DOCS, "_generated")
os.environ["PDEPTH_EXAMPLE_RUN"] = TINY_RUN


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


def _report_figures(app):
    """Writes _generated/report-figures.md (included by report.md): each figure of a run's
    report, what it shows, the claims of summary.json it illustrates and, where the gallery
    ran, the picture from examples/plot_run_folder.py's tiny run."""
    from pdepth.figures import FIGURE_CLAIMS, FIGURES

    run = os.path.join(TINY_RUN, "run")
    shutil.rmtree(GENERATED, ignore_errors=True)
    os.makedirs(os.path.join(GENERATED, "figures"))
    summary = os.path.join(run, "summary.json")
    claims = json.load(open(summary))["claims"] if os.path.exists(summary) else {}
    parts = []
    for name, caption in FIGURES.items():
        parts.append(f"### `{name}`\n\n{caption}\n")
        png = os.path.join(run, "figures", name)
        if os.path.exists(png):
            shutil.copy(png, os.path.join(GENERATED, "figures", name))
            parts.append(f"![{name}](_generated/figures/{name})\n")
        for key in FIGURE_CLAIMS.get(name, ()):
            c = claims.get(key)
            text = f": {c['claim']} (`{c['statistic']}`, paper: {c['paper_direction']})" if c else ""
            parts.append(f"- claim `{key}`{text}")
        parts.append("")
    with open(os.path.join(GENERATED, "report-figures.md"), "w") as f:
        f.write("\n".join(parts) + "\n")


def setup(app):
    # after sphinx-gallery's builder-inited (priority 500), which runs the examples
    app.connect("builder-inited", _report_figures, priority=900)
    app.connect("autodoc-skip-member", _skip_foreign)
    app.connect("autodoc-process-docstring", _no_type_docstring)
