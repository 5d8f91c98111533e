"""The documentation site builds with ``mkdocs build --strict`` and its generated pages read as
their sources mean: docstrings' cross-references are links (no Sphinx role left as text), the
settings page shows placeholders such as ``<name>`` as text, the hooks are not published, and the
home page shows code and links the guides. Needs the docs extras (``pip install -e ".[docs]"``,
which ``.[dev]`` includes)."""

import re
import subprocess
import sys

import pytest
from conftest import REPO

pytest.importorskip("mkdocs", reason='the docs extras are not installed: pip install -e ".[docs]"')
pytest.importorskip("mkdocstrings_handlers.python", reason='pip install -e ".[docs]"')

ROLE = re.compile(r":(?:py:)?(?:func|meth|class|mod|attr|data|exc|obj|const):`")


def article(page) -> str:
    text = page.read_text()
    return text[text.index("<article") : text.index("</article>")]


def test_the_site_builds_strictly_and_its_pages_read_as_their_sources_mean(tmp_path):
    # one test, so that pytest -n builds the site once
    site = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    roles_are_links(site)
    settings_show_placeholders_as_text(site)
    hooks_unpublished_and_home_page_shows_code_and_guides(site)


def roles_are_links(site):
    pages = sorted(site.rglob("*.html"))
    assert len(pages) > 20
    shown = {str(p.relative_to(site)): ROLE.findall(p.read_text()) for p in pages}
    assert {page: roles for page, roles in shown.items() if roles} == {}
    api = article(site / "reference" / "api" / "index.html")
    assert api.count('class="autorefs autorefs-internal"') > 200
    sections = re.findall(r'<h2 id="[^"]*">([^<]+)<', api)
    assert sections[:3] == ["Runs", "Hugging Face", "Masks"] and sections[-1] == "Internals"


def settings_show_placeholders_as_text(site):
    page = article(site / "reference" / "config" / "index.html")
    escaped = ["outputs/&lt;name&gt;/", "(task=&lt;name&gt;)", "&lt;code&gt;/&lt;split&gt;.", "|dL/dgate|"]
    assert [text for text in escaped if text not in page] == []
    allowed = {"article", "h1", "h2", "h3", "p", "a", "code", "table", "thead", "tbody", "tr", "th", "td"}
    assert set(re.findall(r"</?([a-zA-Z][\w-]*)", page)) <= allowed  # no placeholder taken for a tag
    assert "type: ignore" not in page  # a type checker's pragma is no description


def hooks_unpublished_and_home_page_shows_code_and_guides(site):
    assert not (site / "hooks").exists()
    home = article(site / "index.html")
    assert 'href="guides/huggingface/"' in home and 'href="getting-started/"' in home
    code = " ".join(re.sub(r"<[^>]+>", "", block) for block in re.findall(r"<code>(.*?)</code>", home, re.S))
    assert "python -m subnets.train" in code and "with_subnetworks(" in code
