"""Sphinx configuration of the flask-orderhooks documentation.

Build it with ``./scripts/docs`` (HTML into ``docs/_build/html``); ``./scripts/test``
builds it too, with warnings as errors, and runs every example through the
``doctest`` builder.
"""

from __future__ import annotations

import importlib
import inspect
import os
from typing import Any

from pallets_sphinx_themes import ProjectLink, get_version
from sphinx.pycode import ModuleAnalyzer
from sphinx.util import logging

project = "flask-orderhooks"
copyright = "flask-orderhooks contributors"
author = "flask-orderhooks contributors"
release, version = get_version("flask-orderhooks")

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.doctest",
    "sphinx.ext.viewcode",
    "myst_parser",  # CHANGELOG.md is included as it is (docs/changes.rst)
    "pallets_sphinx_themes",
]

# No network at build time: no intersphinx, no remote images.
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_preserve_defaults = True
autoclass_content = "class"
myst_heading_anchors = 2

doctest_test_doctest_blocks = ""
#: Every doctest group starts in a temporary directory of its own (the apps'
#: SQLite files and instance folders go there), with DOCS naming this folder.
doctest_global_setup = f"""
import logging
import os
import tempfile
# The examples' refusals are logged at WARNING: kept out of the build's output.
logging.getLogger("flask_orderhooks").addHandler(logging.NullHandler())
DOCS = {os.path.dirname(os.path.abspath(__file__))!r}
__name__ = "shop"
_tmp = tempfile.TemporaryDirectory()
_cwd = os.getcwd()
os.chdir(_tmp.name)
"""
doctest_global_cleanup = """
os.chdir(_cwd)
_tmp.cleanup()
"""

exclude_patterns = ["_build"]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"

html_theme = "flask"
html_theme_options = {"index_sidebar_logo": False}
html_context = {
    "project_links": [
        ProjectLink("Changes", "changes.html"),
    ]
}
html_sidebars = {
    "index": ["project.html", "localtoc.html", "searchbox.html"],
    "**": ["localtoc.html", "relations.html", "searchbox.html"],
}
html_static_path = ["_static"]
html_title = f"flask-orderhooks Documentation ({version})"
html_show_sourcelink = False


# -- Every public name has an entry in the API reference -----------------------

#: Modules whose public names the API page must document: the package's
#: ``__all__`` and, for the others, what each defines without a leading ``_``.
PUBLIC_MODULES = (
    "flask_orderhooks",
    "flask_orderhooks.events",
    "flask_orderhooks.exc",
    "flask_orderhooks.signals",
    "flask_orderhooks.testing",
    "flask_orderhooks.pytest_plugin",
    "flask_orderhooks.celery",
    # The helpers a host's provider verifies and parses with.
    "flask_orderhooks.provider",
)


def _public_names(modname: str) -> dict[str, Any]:
    module = importlib.import_module(modname)
    names = getattr(module, "__all__", None)
    if names is None:
        # Without __all__: the classes and functions the module defines, and
        # the data it documents with a "#:" comment (imports are not its own).
        commented = {name for _, name in ModuleAnalyzer.for_module(modname).find_attr_docs()}
        names = [
            name
            for name, value in vars(module).items()
            if not name.startswith("_")
            and (
                name in commented
                or (
                    (inspect.isclass(value) or inspect.isfunction(value))
                    and value.__module__ == modname
                )
            )
        ]
    return {f"{modname}.{name}": getattr(module, name) for name in names}


def _resolve(fullname: str) -> Any:
    parts = fullname.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        return obj
    return None


def check_public_api(app: Any, env: Any) -> None:
    """Warn (an error under ``-W``) about each public name the docs do not describe."""
    documented = env.domains["py"].objects
    ids = {id(_resolve(name)) for name in documented}
    log = logging.getLogger("orderhooks.api")
    for modname in PUBLIC_MODULES:
        for fullname, value in _public_names(modname).items():
            if fullname in documented:
                continue
            # A constant must be documented under its own name (equal ints
            # and strings share one object); anything else may be documented
            # where it is defined (flask_orderhooks.OrderHooks is
            # flask_orderhooks.extension.OrderHooks).
            constant = isinstance(value, (str, int, float, tuple, type(None)))
            if constant or id(value) not in ids:
                log.warning(
                    "%s is public but not in the API reference: add it to docs/api.rst.",
                    fullname,
                    type="orderhooks",
                    subtype="api",
                )


# -- Pages written by others --------------------------------------------------

#: Pages other writers add; until the lead places each one in a visible
#: toctree, one that exists is put in a hidden toctree of the index, so the
#: build passes under -W whether or not it exists yet.
LATER_PAGES: tuple[str, ...] = ()
HERE = os.path.dirname(os.path.abspath(__file__))


def _mentioned(docname: str) -> bool:
    for toc in ("index.rst", "platforms/index.rst"):
        with open(os.path.join(HERE, toc), encoding="utf-8") as f:
            text = f.read()
        if docname in text or docname.removeprefix("platforms/") in text:
            return True
    return False


def add_later_pages(app: Any, docname: str, source: list[str]) -> None:
    if docname != "index":
        return
    present = [
        page
        for page in LATER_PAGES
        if os.path.exists(os.path.join(HERE, page + ".rst")) and not _mentioned(page)
    ]
    if present:
        lines = "".join(f"    {page}\n" for page in present)
        source[0] += f"\n\n.. toctree::\n    :hidden:\n\n{lines}"


def setup(app: Any) -> None:
    app.connect("env-check-consistency", check_public_api)
    app.connect("source-read", add_later_pages)
