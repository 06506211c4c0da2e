"""Sphinx configuration of the course website: `python3 course.py site` builds it into _build/site/.

The sources are not copied: course.py lays out a source folder in _build/site-src of hard links
to this folder's pages (index.md) and to the repository's README.md, notebooks/, exercises/,
docs/ and the folders their links point into (labkit/, configs/, requirements/), and runs
``python -m sphinx -b html -q -W -c site _build/site-src _build/site``. Nothing is executed: the
notebooks are shown with the outputs stored in them, and the built site needs no network
(MathJax is served from _static/mathjax, no widget JavaScript is loaded).
"""

project = "Distributed training of large models, from scratch"
author = "the course's authors"

extensions = [
    "myst_nb",                 # Markdown (MyST) and notebooks
    "sphinx-mathjax-offline",  # MathJax 3 copied into _static/mathjax: math renders offline
]

root_doc = "index"
# Only these become pages; everything else in the source folder is there for links (downloads).
include_patterns = ["index.md", "notebooks/*.ipynb", "exercises/*.ipynb", "docs/*.md"]
exclude_patterns = ["**/.ipynb_checkpoints/**"]

# --- notebooks (myst-nb) ---------------------------------------------------------------------------
nb_execution_mode = "off"          # never run a notebook: show the outputs stored in it
# Widget outputs also carry a PNG of their figure (labkit.widgets): show that, never the widget
# view, which would need ipywidgets' JavaScript from a CDN.
nb_mime_priority_overrides = [("html", "application/vnd.jupyter.widget-view+json", None)]
nb_ipywidgets_js = {}              # and do not load require.js / the widget manager from CDNs
nb_merge_streams = True            # one block per cell for stdout, as Jupyter shows it

# --- Markdown (MyST) -------------------------------------------------------------------------------
myst_enable_extensions = ["dollarmath", "amsmath"]   # $...$ and $$...$$ as in Jupyter
myst_heading_anchors = 3                             # [text](page.md#a-heading) links work

# --- HTML ------------------------------------------------------------------------------------------
html_theme = "sphinx_book_theme"
html_title = "Distributed training, from scratch"
html_theme_options = {
    "home_page_in_toc": True,
    "show_toc_level": 2,
    "use_download_button": True,      # the page's .ipynb / .md source (copied into _sources/)
    "use_fullscreen_button": False,
    "navigation_with_keys": False,
}
html_last_updated_fmt = None
