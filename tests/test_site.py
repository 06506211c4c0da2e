"""The course website (`python3 course.py site`): built with the same function course.py uses, into a
temporary folder, with every warning an error (-W); then every page is there, every local link and
image resolves, no stored output is an error, the landing page lists the lessons in order, the search
works offline and nothing is loaded from the network."""

import re
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from course_tool import missing_site_tools

ROOT = Path(__file__).resolve().parents[1]
missing = missing_site_tools()
pytestmark = pytest.mark.skipif(
    bool(missing), reason=f"the website's tools are not installed ({', '.join(missing)}): `python3 course.py site` "
                          "installs them (the `site` extra: pip install -c requirements/constraints.txt -e '.[site]')")

LESSONS = sorted(p.stem for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
EXERCISES = sorted(p.stem for p in (ROOT / "exercises").glob("*.ipynb"))
DOCS = sorted(p.stem for p in (ROOT / "docs").glob("*.md"))


class _Refs(HTMLParser):
    """Every (tag, attribute, value) that points at another file, and every element's classes."""

    ATTRS = {"a": "href", "link": "href", "img": "src", "script": "src", "iframe": "src", "source": "src"}

    def __init__(self):
        super().__init__()
        self.refs, self.classes = [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if attrs.get(self.ATTRS.get(tag, "")):
            self.refs.append((tag, self.ATTRS[tag], attrs[self.ATTRS[tag]]))
        if attrs.get("class"):
            self.classes.append((tag, attrs["class"].split()))


def _parse(page: Path) -> _Refs:
    parser = _Refs()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser


def _pages(site):
    """The pages Sphinx wrote (not the theme's template fragments that it copies into _static/)."""
    return sorted(p for p in site.rglob("*.html") if p.relative_to(site).parts[0] not in ("_static", "_sources"))


def test_every_lesson_exercise_and_doc_has_its_page(site):
    assert len(LESSONS) == 10, LESSONS
    expected = ([f"notebooks/{n}.html" for n in LESSONS] + [f"exercises/{n}.html" for n in EXERCISES]
                + [f"docs/{n}.html" for n in DOCS] + ["index.html"])
    missing_pages = [page for page in expected if not (site / page).is_file()]
    assert not missing_pages, missing_pages


def test_every_local_link_and_image_resolves(site):
    broken = []
    for page in _pages(site):
        for tag, attr, value in _parse(page).refs:
            url = urlsplit(value)
            if url.scheme or url.netloc or not url.path:   # http(s), mailto, data: ...; "#anchor" in the page
                continue
            path = unquote(url.path)
            target = site / path.lstrip("/") if path.startswith("/") else page.parent / path
            if not target.exists():
                broken.append(f"{page.relative_to(site)}: <{tag} {attr}={value!r}>")
    assert not broken, "\n".join(broken[:50])


def test_nothing_is_loaded_from_the_network(site):
    """Scripts and style sheets are served from the site itself (MathJax from _static/mathjax), and
    no widget view is rendered (it would need ipywidgets' JavaScript from a CDN): the PNG is shown."""
    remote = []
    for page in _pages(site):
        assert "application/vnd.jupyter.widget-view+json" not in page.read_text(encoding="utf-8"), page
        for tag, attr, value in _parse(page).refs:
            if tag != "a" and (urlsplit(value).scheme in ("http", "https") or value.startswith("//")):
                remote.append(f"{page.relative_to(site)}: <{tag} {attr}={value!r}>")
    assert not remote, "\n".join(remote[:50])
    assert (site / "_static" / "mathjax" / "tex-chtml.js").is_file()
    lesson = (site / "notebooks" / f"{LESSONS[0]}.html").read_text(encoding="utf-8")
    assert "_static/mathjax/tex-chtml.js" in lesson


def test_no_stored_output_is_an_error(site):
    errors = []
    for page in _pages(site):
        parsed = _parse(page)
        for tag, classes in parsed.classes:
            if "traceback" in classes or ("output" in classes and "error" in classes):
                errors.append(f"{page.relative_to(site)}: <{tag} class={' '.join(classes)!r}>")
        if "Traceback (most recent call last)" in page.read_text(encoding="utf-8"):
            errors.append(f"{page.relative_to(site)}: a traceback")
    assert not errors, "\n".join(errors)


def test_the_landing_page_links_the_lessons_in_order(site):
    index = (site / "index.html").read_text(encoding="utf-8")
    article = re.search(r"<article.*?</article>", index, re.S)
    body = article.group(0) if article else index
    links = re.findall(r'href="(?:\./)?notebooks/([^"#/]+)\.html', body)
    first_seen = list(dict.fromkeys(links))
    assert first_seen == LESSONS, first_seen
    exercises = list(dict.fromkeys(re.findall(r'href="(?:\./)?exercises/([^"#/]+)\.html', body)))
    assert exercises == EXERCISES, exercises
    text = re.sub(r"<[^>]+>", "", body)              # code blocks are split into highlighted spans
    assert "python3 course.py lab" in text and "python3 course.py site" in text   # how to run the course


def test_the_navigation_lists_the_lessons_in_order(site):
    page = (site / "docs" / "instructors.html").read_text(encoding="utf-8")
    links = list(dict.fromkeys(re.findall(r'href="\.\./notebooks/([^"#/]+)\.html', page)))
    assert links == LESSONS, links


def test_search_works_offline(site):
    assert (site / "search.html").is_file()
    index = (site / "searchindex.js").read_text(encoding="utf-8")
    for name in LESSONS + EXERCISES + ["docs/instructors"]:
        assert name in index, name
