"""Sphinx configuration: MyST pages, the pydata theme, mermaid diagrams, and
pages generated from the code (_ext/gpushare_docs.py)."""

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS / "_ext"))
sys.path.insert(0, str(DOCS.parent))  # document the checkout, not an installed copy

from jupyterhub_gpushare._version import __version__  # noqa: E402

project = "jupyterhub-gpushare"
author = "jupyterhub-gpushare contributors"
copyright = "jupyterhub-gpushare contributors"
release = __version__
version = ".".join(__version__.split(".")[:2])

extensions = ["myst_parser", "sphinxcontrib.mermaid", "gpushare_docs"]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_generated"]

myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

html_theme = "pydata_sphinx_theme"
html_title = "jupyterhub-gpushare"
html_static_path = ["_static"]
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "secondary_sidebar_items": ["page-toc"],
}
html_sidebars = {"**": ["sidebar-nav-bs"]}
