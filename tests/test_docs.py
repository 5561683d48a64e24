"""The docs site (`make docs` -> `_docs/`), checked in a real headless browser, and the notebook rule it needs.

* `test_import_cells_hold_only_imports` always runs: nbdev executes every cell that contains an import when it renders
  the docs, so a cell mixing imports with test code breaks `make docs` (`NameError ... ViT backbones and taps`).
* The browser tests render the home page and the `00_manifold` page (`manifold.html`) with Chromium (Debian's
  `chromium` package), check the MAGMA equation, the `magma_loss` signature and every local link of the site, and save
  screenshots in `_docs/screenshots/`.
* The results pages: every cell of the committed mini tables (`results/mini/table*-mini.md`) is a cell of an HTML table
  on its page (`tables/table1.html`, ...), Table 2's page shows its table in the browser and the figures page shows
  figures that loaded (`naturalWidth > 0`), with screenshots `table2.png` and `figures.png`.
* Every show_doc signature fits the page (`test_signatures_fit_the_page`): none reaches past the text column or
  scrolls (issue 28: 63 of 232 were cut off by the page grid, an inline-block output div growing to the longest line).
* The table pages name each row's setting: Table 2's rows have distinct labels (method and λ, e_st, e_dur), in the
  committed Markdown (always checked) and on its page; the figures page shows at least four figures drawn from
  committed files, labels the demo-sized runs, and its subtitle is a whole sentence.
* Search: typing in the search box lists the section it names (smalldocs' own script, which fetches `search.json`).

The browser loads the pages over http, as `make docs-serve` serves them: the fixture `served` serves `_docs/` on a free
port of 127.0.0.1 for the module's tests (a browser refuses `fetch` on a `file://` page, so search needs a server).
The tests that read the built site are marked `site`: `make test` leaves them to `make docs-check` (so its time does
not depend on whether `_docs/` was built), and elsewhere they skip when `_docs/` or Chromium is absent; with
`MAGMA_REQUIRE_DOCS=1` (`make docs-check`, run by `.ci/run`) a missing site or browser is a failure.
"""
import os, re, shutil, subprocess, tempfile, threading, warnings
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / '_docs'
SHOTS = DOCS / 'screenshots'
REQUIRE = os.environ.get('MAGMA_REQUIRE_DOCS', '') not in ('', '0')


def _need(cond, why):
    if cond: return
    if REQUIRE: pytest.fail(f'{why} (MAGMA_REQUIRE_DOCS=1: the docs check must run)')
    pytest.skip(why)


# ---------------------------------------------------------------- the notebook rule

def _mixed_cells(nb_path):
    "Cells nbdev's docs build would execute that mix imports with other code (the exact test of nbdev.processors)."
    from nbdev.process import NBProcessor
    from nbdev.processors import _do_eval
    out = []
    for c in NBProcessor(nb_path).nb.cells:
        if c.cell_type != 'code': continue
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter('always')
            _do_eval(c)
        if any('imports and other code' in str(x.message) for x in w):
            first = next((l for l in c.source.splitlines() if l.strip()), '')
            out.append(f'{nb_path.relative_to(ROOT)} cell {c.idx_}: {first[:70]}')
    return out


def test_import_cells_hold_only_imports():
    nbs = [p for p in sorted((ROOT / 'nbs').rglob('*.ipynb')) if '.ipynb_checkpoints' not in p.parts]
    assert nbs
    bad = [m for p in nbs for m in _mixed_cells(p)]
    assert not bad, ('these cells mix imports with other code; nbdev runs every import cell when it renders the docs, '
                     'so put the imports in a cell of their own:\n' + '\n'.join(bad))


# ---------------------------------------------------------------- links

class _Links(HTMLParser):
    def __init__(self):
        super().__init__(); self.links, self.ids = [], set()
    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if a.get('id'): self.ids.add(a['id'])
        for k in ('href', 'src'):
            if a.get(k) is not None: self.links.append((tag, a[k]))


def _parse(html):
    p = _Links(); p.feed(html); return p


def _local_targets(page: Path, html: str):
    "(link, target file, anchor) for every link of `page` that stays on the site."
    for tag, url in _parse(html).links:
        u = urlsplit(url)
        if u.scheme or url.startswith('//') or url.startswith(('mailto:', 'javascript:', 'data:')): continue
        target = page if not u.path else (page.parent / unquote(u.path)).resolve()
        if target.is_dir(): target = target / 'index.html'
        yield url, target, unquote(u.fragment)


def _broken_links(pages_html):
    cache, bad = {}, []
    for page, html in pages_html:
        for url, target, anchor in _local_targets(page, html):
            if not target.exists() or DOCS.resolve() not in (target.resolve(), *target.resolve().parents):
                bad.append(f'{page.relative_to(DOCS)}: {url} (no such file)'); continue
            if anchor and target.suffix == '.html':
                if target not in cache: cache[target] = _parse(target.read_text(encoding='utf-8')).ids
                if anchor not in cache[target]: bad.append(f'{page.relative_to(DOCS)}: {url} (no id {anchor!r} there)')
    return bad


# ---------------------------------------------------------------- the browser

def _chromium():
    for name in (os.environ.get('CHROMIUM', ''), 'chromium', 'chromium-browser', 'google-chrome', 'chrome'):
        if name and shutil.which(name): return shutil.which(name)


class _Quiet(SimpleHTTPRequestHandler):
    "http.server's handler (`make docs-serve`), without a log line per request."
    def log_message(self, *args): pass


@pytest.fixture(scope='module')
def served():
    """`_docs/` served over http on a free port of 127.0.0.1 while the module's tests run, as `make docs-serve` serves
    it (the same http.server, in a thread): the site's base URL."""
    _need((DOCS / 'index.html').exists(), '_docs/ not built (run `make docs`)')
    _need(_chromium() is not None, 'no chromium binary (apt-get install -y chromium)')
    httpd = ThreadingHTTPServer(('127.0.0.1', 0), partial(_Quiet, directory=str(DOCS)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try: yield f'http://127.0.0.1:{httpd.server_address[1]}/'
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def _browse(base: str, page: Path, screenshot: Path | None = None) -> str:
    """The DOM of `page` loaded from the server at `base` (the fixture `served`) after its scripts ran (KaTeX included),
    from headless Chromium; optionally a screenshot too."""
    exe = _chromium()
    with tempfile.TemporaryDirectory() as prof:
        base_args = [exe, '--headless', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--no-first-run',
                     '--hide-scrollbars', f'--user-data-dir={prof}', '--window-size=1280,2000',
                     '--virtual-time-budget=10000']
        url = base + page.resolve().relative_to(DOCS.resolve()).as_posix()
        dom = subprocess.run(base_args + ['--dump-dom', url], capture_output=True, text=True, timeout=120)
        assert dom.returncode == 0 and '<html' in dom.stdout, dom.stderr[-2000:]
        if screenshot:
            screenshot.parent.mkdir(parents=True, exist_ok=True); screenshot.unlink(missing_ok=True)
            r = subprocess.run(base_args + [f'--screenshot={screenshot}', url], capture_output=True, text=True,
                               timeout=120)
            assert r.returncode == 0 and screenshot.exists(), r.stderr[-2000:]
    return dom.stdout


def _probe(base: str, page: Path, script: str, screenshot: Path | None = None) -> str:
    """The DOM of `page` after `script` ran in it (on load): a copy of the page beside it, so that its relative links
    are the page's own, removed afterwards. What the script finds goes in the DOM (e.g. a `data-` attribute)."""
    probe = page.with_name(f'_probe-{page.name}')
    html = page.read_text(encoding='utf-8')
    on_load = f"<script>window.addEventListener('load', () => {{ {script} }});</script></body>"
    probe.write_text(html.replace('</body>', on_load, 1), encoding='utf-8')
    try: return _browse(base, probe, screenshot)
    finally: probe.unlink(missing_ok=True)


def _text(html):
    "Visible text of a DOM, whitespace collapsed (tags dropped, entities decoded)."
    import html as h
    html = re.sub(r'(?is)<(script|style)\b.*?</\1>', ' ', html)
    return re.sub(r'\s+', ' ', h.unescape(re.sub(r'<[^>]+>', ' ', html)))


def _tex(html):
    "All TeX source on the page (KaTeX annotations once rendered, the raw math spans before), spacing removed."
    import html as h
    tex = re.findall(r'(?s)<annotation encoding="application/x-tex">(.*?)</annotation>', html)
    tex += re.findall(r'(?s)class="math (?:display|inline)">(.*?)</span>', html)
    return [re.sub(r'\s+|\\[,!;:]|\\q?quad', '', h.unescape(t)) for t in tex]


def _magma_equation(tex):
    "The MAGMA term Tr(Y^T L Y)/B^2 and its normalized Laplacian L = I - D^-1/2 W D^-1/2 (one display or two)."
    return (any(r'\mathrm{Tr}' in t and r'Y^\topL' in t and 'B^2' in t for t in tex)
            and any('L=I-D^{-1/2}WD^{-1/2}' in t for t in tex))


@pytest.fixture(scope='module')
def site(served):
    pages = {'index': DOCS / 'index.html', 'manifold': DOCS / 'manifold.html'}
    assert pages['manifold'].exists(), sorted(p.name for p in DOCS.glob('*.html'))
    return {k: (p, _browse(served, p, SHOTS / f'{k}.png')) for k, p in pages.items()}


def _png_ok(p: Path):
    from PIL import Image, ImageStat
    im = Image.open(p).convert('L')
    assert im.size == (1280, 2000), im.size
    assert ImageStat.Stat(im).stddev[0] > 10, f'{p} is (nearly) blank'


@pytest.mark.site
def test_home_page(site):
    page, dom = site['index']
    text = _text(dom)
    assert 'magma' in text and 'MAGMA' in text, text[:500]
    assert _magma_equation(_tex(dom)), _tex(dom)
    assert 'manifold.html' in dom                       # the home page leads to the API pages
    _png_ok(SHOTS / 'index.png')


@pytest.mark.site
def test_manifold_page(site):
    page, dom = site['manifold']
    text = _text(dom)
    assert 'The MAGMA regularizer' in text
    assert _magma_equation(_tex(dom)), _tex(dom)
    if (DOCS / 'site_libs' / 'katex').exists():         # vendored KaTeX (Debian's libjs-katex): rendered offline
        assert dom.count('class="katex"') > 5, 'KaTeX did not render the equations'
    assert 'id="magma_loss"' in dom                     # show_doc's section for the API function
    compact = re.sub(r'\s+', '', text)                  # the signature, as show_doc renders it
    i = compact.find('defmagma_loss(')
    assert i >= 0, 'no magma_loss signature on the page'
    sig = compact[i:compact.find(')->Tensor', i) + 9]
    assert sig.startswith('defmagma_loss(z_ref:Tensor,z_target:Tensor,bandwidth:'), sig
    assert 'normalized:bool=True' in sig, sig
    assert 'trace(Y^T L Y) / B^2' in text                # its docstring
    _png_ok(SHOTS / 'manifold.png')


@pytest.mark.site
def test_no_broken_local_links(site):
    pages = sorted(DOCS.rglob('*.html'))
    assert len(pages) >= 20, pages
    static = [(p, p.read_text(encoding='utf-8')) for p in pages if 'screenshots' not in p.parts]
    rendered = list(site.values())                      # the DOMs after their scripts ran
    bad = _broken_links(static + rendered)
    n = sum(1 for p, h in static for _ in _local_targets(p, h))
    assert n > 500, n                                   # sidebars, tables of contents and doc links: many links
    assert not bad, f'{len(bad)} broken local links:\n' + '\n'.join(sorted(set(bad))[:50])


# ---------------------------------------------------------------- the results pages and search

class _Cells(HTMLParser):
    "The text of every cell (<td>, <th>) inside an HTML <table>, whitespace collapsed."
    def __init__(self):
        super().__init__(); self.cells, self._cell, self._tables = [], None, 0
    def handle_starttag(self, tag, attrs):
        if tag == 'table': self._tables += 1
        if tag in ('td', 'th') and self._tables: self._cell = []
    def handle_endtag(self, tag):
        if tag == 'table': self._tables -= 1
        if tag in ('td', 'th') and self._cell is not None:
            self.cells.append(re.sub(r'\s+', ' ', ''.join(self._cell)).strip()); self._cell = None
    def handle_data(self, data):
        if self._cell is not None: self._cell.append(data)


def _table_cells(html):
    p = _Cells(); p.feed(html); return p.cells


def _md_cells(md: str):
    "Every cell of the Markdown tables of `md` (separator rows left out); `**` bold marks dropped."
    rows = [l.strip() for l in md.splitlines()
            if l.strip().startswith('|') and not re.fullmatch(r'\|[-:| ]+\|', l.strip())]
    return [c.strip().replace('**', '') for r in rows for c in r.strip('|').split('|')]


COMMITTED = sorted((ROOT / 'results' / 'mini').glob('table*-mini.md'))


class _Rows(HTMLParser):
    "Every HTML table of a page as a list of rows, each a list of its cells' texts (whitespace collapsed)."
    def __init__(self):
        super().__init__(); self.tables, self._stack, self._cell = [], [], None
    def handle_starttag(self, tag, attrs):
        if tag == 'table': self._stack.append([]); self.tables.append(self._stack[-1])
        elif tag == 'tr' and self._stack: self._stack[-1].append([])
        elif tag in ('td', 'th') and self._stack: self._cell = []
    def handle_endtag(self, tag):
        if tag == 'table' and self._stack: self._stack.pop()
        elif tag in ('td', 'th') and self._cell is not None and self._stack and self._stack[-1]:
            self._stack[-1][-1].append(re.sub(r'\s+', ' ', ''.join(self._cell)).strip()); self._cell = None
    def handle_data(self, data):
        if self._cell is not None: self._cell.append(data)


def _html_tables(html):
    p = _Rows(); p.feed(html); return [t for t in p.tables if t]


def _labels(rows, head):
    "The (Method, setting, Metric) label of every body row of a table whose header is `head`."
    i = [head.index(c) for c in ('Method', 'λ, e_st, e_dur', 'Metric')]
    return [tuple(r[j] for j in i) for r in rows]


def test_committed_table2_names_every_row():
    "results/mini/table2-mini.md: a setting column, and one distinct label (method, λ/e_st/e_dur, metric) per row."
    md = (ROOT / 'results' / 'mini' / 'table2-mini.md').read_text(encoding='utf-8')
    rows = [[c.strip() for c in l.strip().strip('|').split('|')] for l in md.split('\n\n**')[0].splitlines()
            if l.startswith('|') and not re.fullmatch(r'\|[-:| ]+\|', l.strip())]
    head, body = rows[0], rows[1:]
    assert 'λ, e_st, e_dur' in head, head
    labels = _labels(body, head)
    assert len(body) == 9 and len(set(labels)) == len(labels), labels
    assert ('M-MAE', 'λ=1, e_st=0, e_dur=10', 'linear') in labels and ('MAE', 'λ=0', 'linear') in labels, labels


@pytest.mark.site
def test_results_pages_hold_the_committed_tables():
    "Every cell of every committed mini table is a cell of an HTML table on its page (the static HTML of `make docs`)."
    _need((DOCS / 'index.html').exists(), '_docs/ not built (run `make docs`)')
    assert COMMITTED, 'no results/mini/table*-mini.md'
    for md in COMMITTED:
        page = DOCS / 'tables' / f"{md.name.split('-')[0]}.html"
        assert page.exists(), f'no page {page.relative_to(DOCS)} for {md.relative_to(ROOT)}'
        have = set(_table_cells(page.read_text(encoding='utf-8')))
        want = _md_cells(md.read_text(encoding='utf-8'))
        assert len(want) > 50, (md, want)
        missing = [c for c in dict.fromkeys(want) if c not in have]
        assert not missing, (f'{page.relative_to(DOCS)} lacks {len(missing)} cells of {md.relative_to(ROOT)}: '
                             f'{missing[:10]}')


@pytest.mark.site
def test_table_page_in_the_browser(served):
    page = DOCS / 'tables' / 'table2.html'
    assert page.exists(), sorted(p.name for p in (DOCS / 'tables').glob('*.html'))
    dom = _browse(served, page, SHOTS / 'table2.png')
    cells = _table_cells(dom)
    assert '45.65' in cells, cells[:40]      # the chosen schedule's validation score (results/mini/table2-mini.md)
    assert 'λ=1, e_st=0, e_dur=10' in cells and 'not run' not in cells, cells[:40]
    main = next(t for t in _html_tables(dom) if t[0][:2] == ['Method', 'λ, e_st, e_dur'])   # the table itself, first
    labels = _labels(main[1:], main[0])
    assert len(labels) == 9 and len(set(labels)) == 9, labels              # one distinct label per row
    assert 'class="dataframe"' not in dom, 'a raw pandas DataFrame on the page'   # it ends on the rendered tables
    assert 'launch_runs False' in _text(dom)             # the note saying how the page was made
    assert '/tmp/' not in dom and 'magma-docs-results' not in dom   # the build's scratch copy is written as results/
    _png_ok(SHOTS / 'table2.png')


@pytest.mark.site
def test_figures_page_in_the_browser(served):
    page = DOCS / 'tables' / 'figures.html'
    assert page.exists(), sorted(p.name for p in (DOCS / 'tables').glob('*.html'))
    dom = _probe(served, page, "document.body.dataset.imgs = JSON.stringify("
                               "[...document.querySelectorAll('.cell-output img')]"
                               ".map((i) => [i.complete, i.naturalWidth, i.naturalHeight]));", SHOTS / 'figures.png')
    import html as h, json
    m = re.search(r'data-imgs="([^"]*)"', dom)
    assert m, 'the probe found no figures'
    imgs = json.loads(h.unescape(m.group(1)))
    assert imgs and all(ok and w > 0 and hgt > 0 for ok, w, hgt in imgs), imgs   # every figure loaded
    assert len(imgs) >= 4, imgs                          # Figs. 2 to 6 and reconstructions, from committed files
    assert any(w >= 1000 for _, w, _ in imgs), imgs      # Fig. 2, rendered large (a 2x2 grid)
    cells = _table_cells(dom)
    assert {'MAE', 'M-MAE', 'U-MAE', 'MU-MAE'} <= set(cells), cells   # the Fig. 4 numbers, one row per method
    assert 'DBI' in cells and 'class="dataframe"' not in dom   # as a rendered table, not a raw DataFrame
    text = _text(dom)
    assert 'demo-sized runs on the synthetic set, not the mini protocol' in text, text[:2000]
    for fig in ('Fig. 3', 'Fig. 4', 'Fig. 5', 'Fig. 6', 'MAE reconstructions'): assert fig in text, fig
    desc = re.search(r'<div class="description">(.*?)</div>', dom, re.S)
    assert desc and desc.group(1).strip().endswith('.'), desc and desc.group(1)   # the subtitle: a whole sentence
    _png_ok(SHOTS / 'figures.png')


SIGS = ("const main = document.querySelector('main.content').getBoundingClientRect(); "
        "const sigs = [...document.querySelectorAll('.cell-output-markdown pre')]"
        ".filter((p) => /^(async def|def|class) /.test(p.textContent.trim())); "
        "document.body.dataset.sigs = JSON.stringify(sigs.map((p) => { const r = p.getBoundingClientRect(); "
        "return [p.textContent.trim().split('(')[0], "
        "r.right > main.right + 1 || p.scrollWidth > p.clientWidth + 1]; }));")


@pytest.mark.site
def test_signatures_fit_the_page(served):
    "Every show_doc signature of the API pages lies inside the text column, whole (wrapped, not cut off nor scrolled)."
    import html as h, json
    n, cut = 0, []
    for page in sorted(DOCS.glob('*.html')):
        m = re.search(r'data-sigs="([^"]*)"', _probe(served, page, SIGS))
        sigs = json.loads(h.unescape(m.group(1))) if m else []
        n += len(sigs); cut += [f'{page.name}: {name}' for name, bad in sigs if bad]
    assert n > 100, n                                   # the API pages' signatures were found
    assert not cut, f'{len(cut)} of {n} signatures do not fit the page: {cut[:10]}'


@pytest.mark.site
def test_search_finds_a_section(served):
    """Typing `magma_loss` in the search box of the served home page lists the magma_loss section of the manifold page:
    smalldocs' own search script, which fetches `search.json` (a Quarto build has another search box: it fails here)."""
    page = DOCS / 'index.html'
    _need('smalldocs-search' in page.read_text(encoding='utf-8'),
          'no smalldocs search box on index.html (another renderer)')
    dom = _probe(served, page, "const i = document.querySelector('.smalldocs-search input'); "
                               "i.value = 'magma_loss'; i.dispatchEvent(new Event('input'));")
    hits = re.findall(r'<a class="search-result" href="([^"]*)"', dom)
    assert hits, 'search found nothing: ' + ('"No results"' if 'search-none' in dom else 'no results box')
    assert any(x.split('#')[0].endswith('manifold.html') for x in hits), hits
    assert any(x.endswith('#magma_loss') for x in hits), hits
