"""The course as a static website that works with no network.

    python -m peft_lab.site --out build/site                         # from the committed executed notebooks
    python -m peft_lab.site --out build/site --executed build/notebooks    # with freshly executed copies

Sphinx with MyST-NB and the book theme turns the executed notebooks into one page each (outputs and figures
as saved, nothing re-executed), under a landing page made here from the notebooks' own headers: their titles,
"You will learn" paragraphs, prerequisites, learning objectives and estimated times. The worked solutions get
their own section of the sidebar. Everything a page loads ships with the site: the theme's CSS, JS and icon
font come from its pip package, and MathJax 3 (SVG output, which needs no web font) from the
``django-static-mathjax`` wheel, copied under ``_static/mathjax``. Search is Sphinx's static index.
The Colab badge each notebook carries is replaced by a local copy; widget outputs, which need a live kernel,
by a sentence saying so (each explorer also draws a static figure, which the page shows).
"""
from __future__ import annotations

import json
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..colab import BRANCH, REPO_URL

ROOT = Path(__file__).resolve().parent.parent.parent
NOTEBOOKS = ROOT / "notebooks"
ASSETS = Path(__file__).resolve().parent / "assets"
COLAB = "https://colab.research.google.com"
BADGE_URL = "https://colab.research.google.com/assets/colab-badge.svg"
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
WIDGET_NOTE = ("(An interactive widget appears here when the notebook runs in Jupyter or Colab; "
               "this cell's printed or plotted result is shown on the page as well.)")
SECTIONS = {"": "Notebooks", "solutions": "Solutions"}   # sub-folder of notebooks/ -> sidebar caption
MATHJAX_PARTS = ["tex-svg-full.js", "a11y", "ui", "sre", "LICENSE"]   # what the page may load lazily, too
# MathJax's TeX input as the notebooks are written for (Jupyter's): \text{...} is plain text, so `_` may appear in
# it; the "full" build would otherwise turn on textmacros, under which `\text{use_rslora}` is an error.
MATHJAX_CONFIG = {"tex": {"packages": {"[-]": ["textmacros"]}}}


@dataclass
class Notebook:
    """One notebook of the course and what the landing page says about it (read from its first cells)."""

    path: Path          # relative to the notebooks folder, e.g. solutions/02_lora_solutions.ipynb
    title: str
    learn: str = ""     # the "You will learn" paragraph, without its bold lead
    prerequisites: str = ""
    objectives: list[str] = field(default_factory=list)
    time: str = ""      # the estimated-time line, if the notebook has one

    @property
    def section(self) -> str:
        return self.path.parent.as_posix() if self.path.parent != Path(".") else ""

    @property
    def number(self) -> str:
        m = re.match(r"(\d+)", self.path.name)
        return m.group(1) if m else ""


def discover(folder: Path = NOTEBOOKS) -> list[Notebook]:
    """Every notebook under ``folder`` (sorted by section, then name), with its header read."""
    paths = [p for p in folder.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts]
    order = list(SECTIONS)
    paths.sort(key=lambda p: (order.index(_section(p, folder)) if _section(p, folder) in order else len(order),
                              p.relative_to(folder).as_posix()))
    return [read_header(p, folder) for p in paths]


def _section(path: Path, folder: Path) -> str:
    parent = path.relative_to(folder).parent
    return "" if parent == Path(".") else parent.as_posix()


def _markdown(nb: dict) -> list[str]:
    return ["".join(c["source"]) if isinstance(c["source"], list) else c["source"]
            for c in nb["cells"] if c["cell_type"] == "markdown"]


def read_header(path: Path, folder: Path = NOTEBOOKS) -> Notebook:
    """Title (first ``#`` heading), "You will learn", prerequisites, objectives and time of one notebook."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    cells = _markdown(nb)
    text = "\n\n".join(cells[:6])   # the header lives in the first few markdown cells
    title = next((m.group(1).strip() for c in cells for m in [re.search(r"^# (.+)$", c, re.M)] if m),
                 path.stem)
    info = Notebook(path=path.relative_to(folder), title=title)
    for para in re.split(r"\n\s*\n", text):
        flat = " ".join(line.strip() for line in para.splitlines())
        if m := re.match(r"\*\*You will learn\*\*\s*(.+)", flat):
            info.learn = info.learn or m.group(1)
        elif m := re.match(r"[*_]{1,2}Prerequisites:?[*_]{1,2}:?\s*(.+)", flat):
            info.prerequisites = info.prerequisites or m.group(1)
        elif m := re.match(r"(?:[*_]{1,2})?(?:Estimated time|Time)(?::[*_]{0,2}|[*_]{0,2}:)\s*(.+)", flat, re.I):
            info.time = info.time or m.group(1).strip("*_ ")
    for cell in cells[:8]:   # "Learning objectives" heading or bold lead, then a list
        lines = cell.splitlines()
        for i, line in enumerate(lines):
            if re.search(r"learning objectives", line, re.I) and not info.objectives:
                items, current = [], None
                for nxt in lines[i + 1:]:
                    if m := re.match(r"\s*(?:[-*]|\d+\.)\s+(.+)", nxt):
                        current = m.group(1).strip()
                        items.append(current)
                    elif nxt.strip() and current is not None and nxt.startswith(" "):
                        items[-1] += " " + nxt.strip()
                    elif items and (not nxt.strip() or not nxt.startswith(" ")):
                        break
                info.objectives = items
    return info


# ---------------------------------------------------------------------------------------------- source tree
def _page_source(nb: dict, rel: Path) -> dict:
    """The notebook as the site shows it: the Colab badge local, widget outputs replaced by a note,
    links that leave the notebooks folder pointed at the repository."""
    depth = len(rel.parts) - 1
    badge = "../" * depth + "_static/colab-badge.svg"
    for cell in nb["cells"]:
        if cell["cell_type"] == "markdown":
            src = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
            src = re.sub(r"\]\((\.\./[^)\s]+)\)", lambda m: f"]({_repo_link(rel, m.group(1))})", src)
            src = src.replace(BADGE_URL, badge)
            # an HTML anchor (<a id="x"></a>) that [text](#x) links to becomes a MyST target
            src = re.sub(r'^<a (?:id|name)="([\w-]+)"></a>\s*$', r"(\1)=", src, flags=re.M)
            cell["source"] = src
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if WIDGET_MIME in data:
                out["data"] = {"text/html": f'<p class="peft-lab-widget-note">{WIDGET_NOTE}</p>'}
    nb.get("metadata", {}).pop("widgets", None)
    return nb


def _repo_link(rel: Path, target: str) -> str:
    """A link like ``../README.md#tests`` in the notebook at ``rel`` (a path from the repository's root),
    as a URL into the repository."""
    path, _, frag = target.partition("#")
    parts = list(rel.parent.parts)
    for piece in path.split("/"):
        if piece == "..":
            parts = parts[:-1]
        elif piece not in ("", "."):
            parts.append(piece)
    return f"{REPO_URL}/blob/{BRANCH}/{'/'.join(parts)}" + (f"#{frag}" if frag else "")


def _link(nb: Notebook, base: str = "") -> str:
    return f"{base}notebooks/{nb.path.as_posix()}"


def landing_page(notebooks: list[Notebook]) -> str:
    """``index.md``: what the course teaches, the notebook map, learning objectives, how to run it."""
    course = [n for n in notebooks if n.section == ""]
    solutions = {n.number: n for n in notebooks if n.section == "solutions"}
    repo = REPO_URL.removeprefix("https://github.com/")
    out = [
        "# PEFT lab: parameter-efficient fine-tuning, derived, built and measured", "",
        "A course of Jupyter notebooks on fine-tuning language models by training a small part of them: LoRA, "
        "bottleneck adapters, prefix and prompt tuning, IA3, DoRA, QLoRA, and sharded training. Each method "
        "notebook derives the method's equations and checks every one of them with numbers, builds the method in "
        "a few lines, shows the version in the course's helper package `peft_lab`, compares it with the "
        "reference library (Hugging Face PEFT, AdapterHub, bitsandbytes) where there is one, trains it on a "
        "small task and measures parameters, memory, speed, accuracy and forgetting.", "",
        "Every notebook runs offline on a laptop CPU in about a minute: the base model, `tiny`, is a small "
        "GPT-2 pretrained on text that the course's own code generates. The pages below show each notebook "
        "as it was last executed, outputs and figures included. Each page has an *Open in Colab* button "
        "(the rocket icon in its header, and the badge under its title) and a download of the `.ipynb` "
        "(the download icon).", "",
        "## What the course teaches", "",
        "- why full fine-tuning is memory-hungry, and where the memory of a training step goes;",
        "- how each parameter-efficient method works, from its equations to a working implementation;",
        "- how to check an implementation against a reference library, and how close \"equal\" can be in "
        "float32;",
        "- how the methods compare at an equal budget and at an equal accuracy, and what each costs in "
        "memory, time and forgetting;",
        "- how training is sharded over several processes (ZeRO, FSDP) when one machine is not enough.", "",
        "## The notebooks", "",
    ]
    timed = any(n.time for n in course)
    out += ["| | notebook | prerequisites |" + (" estimated time |" if timed else "") + " solutions |",
            "|---|---|---|" + ("---|" if timed else "") + "---|"]
    for n in course:
        sol = solutions.get(n.number)
        sol_cell = f"[worked solutions]({_link(sol)})" if sol else ""
        time_cell = f" {_cell(re.split(r'[;(,]', n.time)[0].strip()) or '–'} |" if timed else ""
        out.append(f"| {n.number} | [{_strip_number(n.title)}]({_link(n)}) | {_cell(n.prerequisites)} |"
                   f"{time_cell} {sol_cell} |")
    out += ["", "## Learning objectives", ""]
    for n in course:
        out += [f"### [{n.title}]({_link(n)})", ""]
        if n.time:
            out += [f"*Estimated time:* {n.time}", ""]
        if n.objectives:
            out += ["After this notebook you can", ""] + [f"- {item}" for item in n.objectives] + [""]
        elif n.learn:
            out += [f"You will learn {n.learn}", ""]
    out += [
        "## Run it yourself", "",
        "### On your computer", "",
        "With Python 3.10–3.13:", "",
        "```bash",
        f"git clone {REPO_URL}",
        f"cd {repo.split('/')[-1]}",
        'pip install -e ".[notebooks]"',
        "jupyter lab notebooks/",
        "```", "",
        "Everything runs on the CPU and offline: the tiny model and the task data are in the repository's "
        "`data/` folder. To keep a CPU-only install small, install PyTorch first "
        "(`pip install torch --index-url https://download.pytorch.org/whl/cpu`).", "",
        "### In Colab", "",
        "Click the rocket icon at the top of a notebook's page and choose Colab, or the *Open in Colab* badge "
        "under its title. The notebook's first code cell runs only in Colab: it clones the repository, "
        "installs the package and points it at the repository's `data/`.", "",
        "### On a GPU", "",
        "Each notebook has one *parameters* cell. Set `MODEL_NAME = \"gpt2\"` (or any causal language model "
        "of the Hugging Face Hub, downloaded on first use) and raise the step counts as that cell's comment "
        "suggests; the device is picked automatically (CUDA, then Apple's MPS, then the CPU). Notebook 07 "
        "shows the command that trains the same adapters sharded over several GPUs.", "",
    ]
    for section, caption in SECTIONS.items():
        pages = [n for n in notebooks if n.section == section]
        if pages:
            out += ["```{toctree}", f":caption: {caption}", ":maxdepth: 1", "",
                    *[_link(n).removesuffix(".ipynb") for n in pages], "```", ""]
    others = sorted({n.section for n in notebooks} - set(SECTIONS))
    for section in others:
        out += ["```{toctree}", f":caption: {section}", ":maxdepth: 1", "",
                *[_link(n).removesuffix(".ipynb") for n in notebooks if n.section == section], "```", ""]
    return "\n".join(out)


def _strip_number(title: str) -> str:
    return re.sub(r"^\d+\s*[·:.-]\s*", "", title)


def _cell(text: str) -> str:
    """Text for a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ").strip()


def conf_py(title: str) -> str:
    """Sphinx's configuration for the site."""
    settings = {
        "project": title,
        "author": "the peft-lab authors",
        "copyright": "the peft-lab authors, MIT licence",
        "extensions": ["myst_nb"],
        "html_theme": "sphinx_book_theme",
        "html_title": title,
        "html_static_path": ["_static"],
        "html_css_files": ["site.css"],
        "html_last_updated_fmt": None,
        "html_show_sphinx": False,
        "html_copy_source": True,
        "exclude_patterns": ["**.ipynb_checkpoints", "_build"],
        "nb_execution_mode": "off",
        "nb_ipywidgets_js": {},
        "nb_merge_streams": True,
        "nb_render_markdown_format": "myst",   # Markdown outputs (tables, $math$) rendered like the notebook's text
        "myst_enable_extensions": ["dollarmath", "amsmath"],
        "myst_dmath_double_inline": True,
        "myst_heading_anchors": 3,
        "mathjax_path": "mathjax/tex-svg-full.js",
        "mathjax3_config": MATHJAX_CONFIG,
        "suppress_warnings": ["mystnb.unknown_mime_type", "myst.header", "misc.highlighting_failure"],
        "html_theme_options": {
            "repository_url": REPO_URL,
            "repository_branch": BRANCH,
            "path_to_docs": "",
            "launch_buttons": {"colab_url": COLAB},
            "use_download_button": True,
            "use_repository_button": True,
            "use_fullscreen_button": False,
            "home_page_in_toc": True,
            "show_navbar_depth": 1,
            "navigation_with_keys": True,
        },
    }
    return "".join(f"{k} = {v!r}\n" for k, v in settings.items())


def stage(dest: Path, executed: Path | None = None, notebooks_dir: Path = NOTEBOOKS) -> Path:
    """The notebooks the site shows, in ``dest``: the committed ones, each replaced by its executed copy in
    ``executed`` (same relative path) where there is one that is not older than the committed notebook (an older
    one is left from an earlier build)."""
    shutil.copytree(notebooks_dir, dest, ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__", "*.py"))
    if executed is not None:
        for nb in Path(executed).rglob("*.ipynb"):
            rel = nb.relative_to(executed)
            committed = notebooks_dir / rel
            if committed.is_file() and ".ipynb_checkpoints" not in rel.parts \
                    and nb.stat().st_mtime >= committed.stat().st_mtime:
                shutil.copy2(nb, dest / rel)
    return dest


def prepare(src: Path, staged: Path) -> list[Notebook]:
    """Write the Sphinx source tree into ``src``: conf.py, index.md, the notebooks of ``staged`` (and their
    folders' other files, e.g. figures they link to), the static files."""
    notebooks = discover(staged)
    shutil.copytree(staged, src / "notebooks")
    for n in notebooks:
        dest = src / "notebooks" / n.path
        nb = json.loads(dest.read_text(encoding="utf-8"))
        dest.write_text(json.dumps(_page_source(nb, Path("notebooks") / n.path), ensure_ascii=False),
                        encoding="utf-8")
    static = src / "_static"
    static.mkdir(parents=True)
    for asset in ASSETS.iterdir():
        shutil.copy2(asset, static / asset.name)
    _copy_mathjax(static / "mathjax")
    (src / "index.md").write_text(landing_page(notebooks), encoding="utf-8")
    (src / "conf.py").write_text(conf_py("PEFT lab"), encoding="utf-8")
    return notebooks


def mathjax_dir() -> Path:
    """MathJax 3's browser build, from the ``django-static-mathjax`` wheel (the ``site`` extra)."""
    import importlib.util

    spec = importlib.util.find_spec("mathjax")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("MathJax is missing: pip install -e '.[site]' (django-static-mathjax)")
    folder = Path(next(iter(spec.submodule_search_locations))) / "static" / "mathjax"
    if not (folder / "es5" / "tex-svg-full.js").is_file():
        raise FileNotFoundError(f"no es5/tex-svg-full.js in {folder}: is django-static-mathjax installed?")
    return folder


def _copy_mathjax(dest: Path) -> None:
    src = mathjax_dir()
    dest.mkdir(parents=True)
    for part in MATHJAX_PARTS:
        p = src / part if part == "LICENSE" else src / "es5" / part
        if p.is_dir():
            shutil.copytree(p, dest / part)
        elif p.is_file():
            shutil.copy2(p, dest / part)


# --------------------------------------------------------------------------------------------------- build
def build(out: Path, executed: Path | None = None, quiet: bool = True, notebooks_dir: Path = NOTEBOOKS) -> dict:
    """Build the site into ``out`` (replaced) from the committed notebooks, or from their executed copies in
    ``executed`` where it has them. Returns the pages built, the seconds taken and Sphinx's warnings."""
    import io

    from sphinx.application import Sphinx
    from sphinx.util.docutils import docutils_namespace, patch_docutils

    start = time.perf_counter()
    out = Path(out).resolve()
    if out.exists() and any(out.iterdir()) and not (out / "searchindex.js").is_file():
        raise FileExistsError(f"{out} is a folder that holds something other than a site: give a new or empty one")
    with tempfile.TemporaryDirectory(prefix="peft-lab-site-") as tmp:
        src, html, doctrees = Path(tmp, "src"), Path(tmp, "html"), Path(tmp, "doctrees")
        staged = stage(Path(tmp, "notebooks"), executed, Path(notebooks_dir))
        notebooks = prepare(src, staged)
        warnings = io.StringIO()
        with patch_docutils(src), docutils_namespace():
            app = Sphinx(str(src), str(src), str(html), str(doctrees), "html", freshenv=True,
                         status=None if quiet else sys.stdout, warning=warnings, parallel=0)
            app.build(force_all=True)
        if app.statuscode:
            raise RuntimeError(f"the site build failed:\n{warnings.getvalue()}")
        (html / ".buildinfo").unlink(missing_ok=True)
        for n in notebooks:   # the download is the notebook itself, not the copy the pages were made from
            shutil.copy2(staged / n.path, html / "_sources" / "notebooks" / n.path)
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(html, out)
    text = re.sub(r"\x1b\[[0-9;]*m", "", warnings.getvalue()).replace(str(src), "")
    return {"pages": [str(Path("notebooks") / n.path.with_suffix(".html")) for n in notebooks],
            "seconds": round(time.perf_counter() - start, 1),
            "warnings": [line for line in text.splitlines() if "WARNING" in line or "ERROR" in line]}
