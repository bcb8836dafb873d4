"""The course website (peft_lab.site): built once per session from the committed notebooks, then checked —
every notebook and solution has a page with its Colab button and .ipynb download, every figure of a notebook is
on its page, nothing is loaded from outside the site (HTML and CSS parsed), no raw $…$ math is left, internal
links resolve. The last test breaks a copy of a page in each of those ways and shows each check catches it."""
from __future__ import annotations

import base64
import functools
import hashlib
import html as html_lib
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

pytest.importorskip("sphinx", reason="the site extra (pip install -e '.[site]') builds the course website")

from peft_lab import site as course_site  # noqa: E402
from peft_lab.colab import BRANCH, REPO_URL  # noqa: E402

pytestmark = [pytest.mark.site,   # Sphinx's notices about its next major release, raised inside the theme
              pytest.mark.filterwarnings("ignore:.*is deprecated. Check CHANGES for Sphinx API")]
NOTEBOOKS = course_site.NOTEBOOKS
LOADING = {  # tag -> attributes whose URL the browser fetches when the page opens
    "script": ("src",), "img": ("src", "srcset"), "source": ("src", "srcset"), "iframe": ("src",),
    "embed": ("src",), "object": ("data",), "video": ("src", "poster"), "audio": ("src",), "input": ("src",),
    "image": ("href", "xlink:href"), "use": ("href", "xlink:href"),
}
LINK_LOADS = {"stylesheet", "preload", "modulepreload", "prefetch", "icon", "shortcut", "apple-touch-icon",
              "manifest", "mask-icon"}
SKIP_TEXT = {"script", "style", "pre", "code", "svg", "math", "textarea"}
CSS_URL = re.compile(r"""@import\s+(?:url\()?\s*['"]?([^'")\s;]+)|url\(\s*['"]?([^'")]+?)['"]?\s*\)""")
RAW_MATH = re.compile(r"\$\$.+?\$\$|(?<![\\$\w])\$(?=\S)[^$\n]{1,200}?(?<=\S)\$(?![\w$])", re.S)


def parse(path: Path) -> "Page":
    """:class:`Page` of ``path``, parsed once per version of the file."""
    stat = path.stat()
    return _parse(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=256)
def _parse(path: Path, mtime_ns: int, size: int) -> "Page":
    return Page(path)


class Page(HTMLParser):
    """What the checks need from one HTML page: the URLs it loads, the links it has, its ids, its prose."""

    def __init__(self, path: Path):
        super().__init__(convert_charrefs=True)
        self.path, self.loads, self.links, self.ids, self.text = path, [], [], set(), []
        self.styles, self.imgs, self._skip, self._in_style = [], [], [], False
        self.feed(path.read_text(encoding="utf-8"))

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "a" and a.get("name"):
            self.ids.add(a["name"])
        for attr in LOADING.get(tag, ()):
            if a.get(attr):
                urls = [u.strip().split()[0] for u in a[attr].split(",") if u.strip()] if attr == "srcset" \
                    else [a[attr]]
                self.loads += [(tag, u) for u in urls]
        if tag == "img" and a.get("src"):
            self.imgs.append(a["src"])
        if tag == "link" and a.get("href"):
            rels = set((a.get("rel") or "").lower().split())
            (self.loads if rels & LINK_LOADS else self.links).append(("link", a["href"]))
        if tag == "a" and a.get("href"):
            self.links.append(("a", a["href"]))
        if a.get("style"):
            self.styles.append(a["style"])
        classes = set((a.get("class") or "").split())
        if tag in SKIP_TEXT or "math" in classes:
            self._skip.append(tag)
        elif self._skip and tag == self._skip[-1]:
            self._skip.append(tag)
        self._in_style = tag == "style"

    def handle_endtag(self, tag):
        if self._skip and tag == self._skip[-1]:
            self._skip.pop()
        self._in_style = False

    def handle_data(self, data):
        if self._in_style:
            self.styles.append(data)
        if not self._skip:
            self.text.append(data)

    def prose(self) -> str:
        return "".join(self.text)


def is_external(url: str) -> bool:
    return bool(urlsplit(url).scheme) and not url.startswith("data:") or url.startswith("//")


def local_target(base: Path, url: str) -> Path:
    return (base.parent / unquote(urlsplit(url).path)).resolve()


def html_pages(out: Path) -> list[Path]:
    return sorted(p for p in out.rglob("*.html") if "_static" not in p.parts)


def page_of(out: Path, nb: course_site.Notebook) -> Path:
    return out / "notebooks" / nb.path.with_suffix(".html")


# ------------------------------------------------------------------------------------------------- checks
def external_loads(out: Path) -> list[str]:
    """Every script, style sheet, font, image … that a page or a style sheet would fetch from outside the site,
    and every local one that is missing."""
    problems = []
    for path in html_pages(out):
        page = parse(path)
        for tag, url in page.loads:
            if is_external(url):
                problems.append(f"{path.relative_to(out)}: <{tag}> loads {url}")
            elif not url.startswith("data:") and not local_target(path, url).is_file():
                problems.append(f"{path.relative_to(out)}: <{tag}> loads a missing file {url}")
        for css in page.styles:
            problems += [f"{path.relative_to(out)}: inline style loads {u}" for u in css_urls(css) if is_external(u)]
    for css_file in sorted(out.rglob("*.css")):
        for url in css_urls(css_file.read_text(encoding="utf-8", errors="replace")):
            if is_external(url):
                problems.append(f"{css_file.relative_to(out)}: loads {url}")
            elif not url.startswith(("data:", "#")) and not local_target(css_file, url).is_file():
                problems.append(f"{css_file.relative_to(out)}: loads a missing file {url}")
    return problems


def css_urls(css: str) -> list[str]:
    css = re.sub(r"/\*.*?\*/", "", css, flags=re.S)
    return [a or b for a, b in CSS_URL.findall(css)]


def raw_math(out: Path) -> list[str]:
    """Text outside code, outputs and rendered math that still looks like $…$ or $$…$$ LaTeX."""
    problems = []
    for path in html_pages(out):
        for m in RAW_MATH.finditer(parse(path).prose()):
            problems.append(f"{path.relative_to(out)}: {m.group(0)[:80]!r}")
    return problems


def broken_links(out: Path) -> list[str]:
    """Internal links (and their #anchors) that lead nowhere."""
    problems, ids = [], {}
    for path in html_pages(out):
        page = parse(path)
        for tag, url in page.links:
            if is_external(url) or url.startswith(("mailto:", "javascript:")):
                continue
            parts = urlsplit(url)
            target = local_target(path, url) if parts.path else path
            if not target.exists():
                problems.append(f"{path.relative_to(out)}: {url} (no such file)")
            elif parts.fragment and target.suffix == ".html":
                if target not in ids:
                    ids[target] = parse(target).ids
                if unquote(parts.fragment) not in ids[target]:
                    problems.append(f"{path.relative_to(out)}: {url} (no such anchor)")
    return problems


def figure_digests(nb_path: Path) -> list[tuple[int, str]]:
    """(cell index, sha256) of every image output of a notebook."""
    nb = json.loads(nb_path.read_text(encoding="utf-8"))
    found = []
    for i, cell in enumerate(nb["cells"]):
        for out in cell.get("outputs", []):
            for mime, data in out.get("data", {}).items():
                if mime in ("image/png", "image/jpeg", "image/gif"):
                    raw = base64.b64decode("".join(data) if isinstance(data, list) else data)
                    found.append((i, hashlib.sha256(raw).hexdigest()))
                elif mime == "image/svg+xml":
                    svg = "".join(data) if isinstance(data, list) else data
                    found.append((i, hashlib.sha256(svg.encode()).hexdigest()))
    return found


def missing_figures(out: Path, notebooks: list[course_site.Notebook]) -> list[str]:
    """Figures of a notebook that its page does not show (compared by content, byte for byte)."""
    problems = []
    for nb in notebooks:
        path = page_of(out, nb)
        if not path.is_file():
            problems.append(f"{nb.path}: no page")
            continue
        page = parse(path)
        shown = {hashlib.sha256(local_target(path, src).read_bytes()).hexdigest()
                 for src in page.imgs if not is_external(src) and local_target(path, src).is_file()}
        html = path.read_text(encoding="utf-8")
        for cell, digest in figure_digests(NOTEBOOKS / nb.path):
            if digest not in shown and digest not in {hashlib.sha256(s.encode()).hexdigest()
                                                      for s in re.findall(r"<svg.*?</svg>", html, re.S)}:
                problems.append(f"{nb.path}: the figure of cell {cell} is not on its page")
    return problems


TYPESET_JS = r"""
// Typeset each TeX expression (a JSON list on stdin) with the MathJax build the site ships, configured as the
// site configures it; print the ones that fail, with MathJax's message. Undefined macros count as failures
// (noundefined off: in a browser they would show in red); bussproofs needs a browser's layout, so it is off here.
const [dir, config] = [process.argv[1], JSON.parse(process.argv[2])];
const exprs = JSON.parse(require('fs').readFileSync(0, 'utf8'));
config.tex.packages['[-]'] = [...(config.tex.packages['[-]'] || []), 'bussproofs', 'noundefined'];
require(require('path').join(dir, 'node-main.js')).init({
  loader: {paths: {mathjax: dir}, load: ['input/tex-full', 'adaptors/liteDOM']}, ...config,
}).then((MathJax) => {
  const bad = [];
  for (const e of exprs) {
    let mml;
    try { mml = MathJax.tex2mml(e, {display: true}); }
    catch (err) { bad.push([e, String(err.message || err)]); continue; }
    const m = mml.match(/data-mjx-error="([^"]*)"/) || (mml.includes('<merror') ? [null, 'error'] : null);
    if (m) bad.push([e, m[1]]);
  }
  console.log(JSON.stringify(bad));
}).catch((err) => { console.error(err); process.exit(2); });
"""


def page_math(out: Path) -> list[tuple[str, str]]:
    """(page, TeX) of every math node of every page, without its \\( \\) or \\[ \\] delimiters."""
    found = []
    for path in html_pages(out):
        for m in re.finditer(r'<(span|div) class="math notranslate nohighlight"[^>]*>(.*?)</\1>',
                             path.read_text(encoding="utf-8"), re.S):
            tex = html_lib.unescape(m.group(2)).strip()
            if tex[:2] in ("\\(", "\\[") and tex[-2:] in ("\\)", "\\]"):
                tex = tex[2:-2]
            found.append((path.relative_to(out).as_posix(), tex))
    return found


def typeset_failures(expressions: list[str]) -> list[tuple[str, str]]:
    """Expressions the site's MathJax cannot typeset, with its message (runs MathJax's node build)."""
    es5 = course_site.mathjax_dir() / "es5"
    run = subprocess.run(["node", "-e", TYPESET_JS, str(es5), json.dumps(course_site.MATHJAX_CONFIG)],
                         input=json.dumps(expressions), capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return [tuple(x) for x in json.loads(run.stdout.strip().splitlines()[-1])]


# -------------------------------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def notebooks():
    return course_site.discover(NOTEBOOKS)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("course-site") / "site"
    info = course_site.build(out)
    return out, info


def test_discovers_every_notebook_and_solution(notebooks):
    on_disk = sorted(p.relative_to(NOTEBOOKS).as_posix() for p in NOTEBOOKS.rglob("*.ipynb")
                     if ".ipynb_checkpoints" not in p.parts)
    assert sorted(n.path.as_posix() for n in notebooks) == on_disk
    assert any(n.section == "solutions" for n in notebooks) and any(n.section == "" for n in notebooks)
    for n in notebooks:
        assert n.title != n.path.stem, f"{n.path}: no '# title' heading found"


def test_executed_copies_replace_committed_ones(notebooks, tmp_path):
    """--executed: a fresh executed copy replaces the committed notebook; an older one (left from an earlier
    build) and one whose name the course no longer has do not."""
    executed = tmp_path / "executed"
    (executed / "solutions").mkdir(parents=True)
    fresh, stale = notebooks[0].path, next(n.path for n in notebooks if n.section == "solutions")
    (executed / fresh).write_text('{"fresh": 1}')
    (executed / stale).write_text('{"stale": 1}')
    (executed / "99_renamed.ipynb").write_text('{"gone": 1}')
    old = (NOTEBOOKS / stale).stat().st_mtime - 3600
    os.utime(executed / stale, (old, old))
    staged = course_site.stage(tmp_path / "staged", executed)
    assert (staged / fresh).read_text() == '{"fresh": 1}'
    assert (staged / stale).read_bytes() == (NOTEBOOKS / stale).read_bytes()
    assert not (staged / "99_renamed.ipynb").exists()


def test_build_refuses_to_replace_a_folder_that_is_not_a_site(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="other than a site"):
        course_site.build(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_every_notebook_has_a_page_with_colab_and_download(site, notebooks):
    out, info = site
    for nb in notebooks:
        path = page_of(out, nb)
        assert path.is_file(), f"no page for {nb.path}"
        page = parse(path)
        hrefs = [url for _, url in page.links]
        colab = (f"https://colab.research.google.com/github/{REPO_URL.removeprefix('https://github.com/')}"
                 f"/blob/{BRANCH}/notebooks/{nb.path.as_posix()}")
        assert colab in hrefs, f"{nb.path}: no Colab button"
        downloads = [u for u in hrefs if u.endswith(".ipynb") and not is_external(u)]
        assert downloads, f"{nb.path}: no .ipynb download"
        assert local_target(path, downloads[0]).read_bytes() == (NOTEBOOKS / nb.path).read_bytes(), \
            f"{nb.path}: the download is not the notebook"
        assert nb.title.split("·")[-1].strip()[:30] in page.prose(), f"{nb.path}: its title is not on its page"


def test_landing_page_sidebar_and_navigation(site, notebooks):
    out, _ = site
    index = parse(out / "index.html")
    text = index.prose()
    for heading in ("What the course teaches", "The notebooks", "Learning objectives", "Run it yourself",
                    "In Colab", "On a GPU", "Solutions"):
        assert heading in text, heading
    linked = {local_target(out / "index.html", u) for _, u in index.links if not is_external(u)}
    for nb in notebooks:
        assert page_of(out, nb).resolve() in linked, f"the landing page does not link {nb.path}"
    pages = [page_of(out, nb) for nb in notebooks]
    for i, path in enumerate(pages):   # previous/next walk the notebooks, then the solutions, in order
        rels = re.findall(r'<link rel="(prev|next)"[^>]*href="([^"]+)"', path.read_text(encoding="utf-8"))
        nav = {rel: local_target(path, href) for rel, href in rels}
        if i + 1 < len(pages):
            assert nav.get("next") == pages[i + 1].resolve(), f"{path.name}: next"
        assert nav.get("prev") == (pages[i - 1] if i else out / "index.html").resolve(), f"{path.name}: prev"
    assert (out / "search.html").is_file()
    index_js = (out / "searchindex.js").read_text(encoding="utf-8")
    assert "lora" in index_js.lower()
    for nb in notebooks:
        assert f'"notebooks/{nb.path.with_suffix("").as_posix()}"' in index_js, f"{nb.path} is not searchable"


def test_every_figure_is_on_its_page(site, notebooks):
    out, _ = site
    assert sum(len(figure_digests(NOTEBOOKS / n.path)) for n in notebooks) > 0
    assert missing_figures(out, notebooks) == []


def test_nothing_is_loaded_from_outside_the_site(site):
    out, _ = site
    assert external_loads(out) == []
    mathjax = [u for p in html_pages(out) for tag, u in parse(p).loads if "mathjax" in u]
    assert mathjax, "MathJax is not on the pages"


def test_no_raw_math_left(site, notebooks):
    out, _ = site
    assert raw_math(out) == []
    for nb in notebooks:   # and math was typeset where a notebook has some
        source = (NOTEBOOKS / nb.path).read_text(encoding="utf-8")
        if re.search(r"\$[^$\s][^$]*\$", source):
            assert 'class="math' in page_of(out, nb).read_text(encoding="utf-8"), f"{nb.path}: no math nodes"


@pytest.mark.skipif(shutil.which("node") is None, reason="typesetting outside a browser needs Node.js")
def test_math_typesets_with_the_shipped_mathjax(site):
    """Every equation of every page typesets without an error in the MathJax the site ships (a browser would
    show a failing one as red source text); a broken and an unknown-macro expression show the check can fail."""
    out, _ = site
    math = page_math(out)
    assert len(math) > 100
    broken = ["\\frac{a}{", "\\nosuchmacro x"]
    failures = typeset_failures([tex for _, tex in math] + broken)
    assert [tex for tex, _ in failures] == broken, [(page, tex, msg) for page, tex in math
                                                    for t, msg in failures if t == tex]


def test_internal_links_resolve(site):
    out, _ = site
    assert broken_links(out) == []


def test_site_names_no_build_folder(site):
    out, info = site
    for path in [*html_pages(out), out / "searchindex.js"]:
        text = path.read_text(encoding="utf-8")
        assert "peft-lab-site-" not in text and str(course_site.ROOT) not in text, path


def test_checks_catch_a_broken_page(site, notebooks, tmp_path):
    """Each check fails on a page broken in its way (so a passing check means something)."""
    out, _ = site
    broken = tmp_path / "site"
    shutil.copytree(out, broken)
    victim = next(n for n in notebooks if figure_digests(NOTEBOOKS / n.path))
    path = page_of(broken, victim)
    html = path.read_text(encoding="utf-8")
    first = figure_digests(NOTEBOOKS / victim.path)[0][1]
    for tag in re.findall(r"<img[^>]*>", html):   # drop the <img> that shows the notebook's first figure
        src = re.search(r'src="([^"]+)"', tag).group(1)
        target = local_target(path, src)
        if target.is_file() and hashlib.sha256(target.read_bytes()).hexdigest() == first:
            html = html.replace(tag, "")
    html = html.replace("</head>", '<script src="https://cdn.example.org/x.js"></script>'
                        '<link rel="stylesheet" href="//cdn.example.org/x.css"></head>', 1)
    html = html.replace("</article>", '<p>raw $\\alpha/r$ math and $$W_0 + BA$$ too, <a href="nowhere.html">'
                        'a dead link</a>, <a href="#no-such-anchor">and one</a></p></article>', 1)
    path.write_text(html, encoding="utf-8")
    with (broken / "_static" / "site.css").open("a", encoding="utf-8") as f:
        f.write('\n@import url("https://fonts.example.org/css?family=X");\n'
                '@font-face { font-family: X; src: url(https://fonts.example.org/x.woff2); }\n')
    name = path.relative_to(broken).as_posix()
    loads = external_loads(broken)
    assert any(name in p and "cdn.example.org/x.js" in p for p in loads)
    assert any(name in p and "cdn.example.org/x.css" in p for p in loads)
    assert sum("site.css" in p and "fonts.example.org" in p for p in loads) == 2
    assert {m.split(": ", 1)[1] for m in raw_math(broken)} >= {"'$\\\\alpha/r$'", "'$$W_0 + BA$$'"}
    assert {p.split(": ", 1)[1] for p in broken_links(broken) if name in p} == \
        {"nowhere.html (no such file)", "#no-such-anchor (no such anchor)"}
    missing = missing_figures(broken, [victim])
    assert len(missing) == 1 and missing[0].startswith(f"{victim.path}: the figure of cell"), missing
