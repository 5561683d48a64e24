"""The docs site (`make docs` -> `_docs/`), checked in a real headless browser, and the notebook rule it needs.

* `test_import_cells_hold_only_imports` always runs: nbdev executes every cell that contains an import when it renders
  the docs, so a cell mixing imports with test code breaks `make docs` (`NameError ... ViT backbones and taps`).
* The browser tests render the home page and the `00_manifold` page (`manifold.html`) with Chromium (Debian's
  `chromium` package), check the MAGMA equation, the `magma_loss` signature and every local link of the site, and save
  screenshots in `_docs/screenshots/`. They skip when `_docs/` or Chromium is absent (plain `make test` on a fresh
  clone); with `MAGMA_REQUIRE_DOCS=1` (`make docs-check`, run by `.ci/run`) a missing site or browser is a failure.
"""
import ast, os, re, shutil, subprocess, tempfile, warnings
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


def _browse(page: Path, screenshot: Path | None = None) -> str:
    "The DOM of `page` after its scripts ran (KaTeX included), from headless Chromium; optionally a screenshot too."
    exe = _chromium()
    with tempfile.TemporaryDirectory() as prof:
        base = [exe, '--headless', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--no-first-run',
                '--hide-scrollbars', f'--user-data-dir={prof}', '--window-size=1280,2000', '--virtual-time-budget=10000']
        url = page.resolve().as_uri()
        dom = subprocess.run(base + ['--dump-dom', url], capture_output=True, text=True, timeout=120)
        assert dom.returncode == 0 and '<html' in dom.stdout, dom.stderr[-2000:]
        if screenshot:
            screenshot.parent.mkdir(parents=True, exist_ok=True); screenshot.unlink(missing_ok=True)
            r = subprocess.run(base + [f'--screenshot={screenshot}', url], capture_output=True, text=True, timeout=120)
            assert r.returncode == 0 and screenshot.exists(), r.stderr[-2000:]
    return dom.stdout


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
def site():
    _need((DOCS / 'index.html').exists(), '_docs/ not built (run `make docs`)')
    _need(_chromium() is not None, 'no chromium binary (apt-get install -y chromium)')
    pages = {'index': DOCS / 'index.html', 'manifold': DOCS / 'manifold.html'}
    assert pages['manifold'].exists(), sorted(p.name for p in DOCS.glob('*.html'))
    return {k: (p, _browse(p, SHOTS / f'{k}.png')) for k, p in pages.items()}


def _png_ok(p: Path):
    from PIL import Image, ImageStat
    im = Image.open(p).convert('L')
    assert im.size == (1280, 2000), im.size
    assert ImageStat.Stat(im).stddev[0] > 10, f'{p} is (nearly) blank'


def test_home_page(site):
    page, dom = site['index']
    text = _text(dom)
    assert 'magma' in text and 'MAGMA' in text, text[:500]
    assert _magma_equation(_tex(dom)), _tex(dom)
    assert 'manifold.html' in dom                       # the home page leads to the API pages
    _png_ok(SHOTS / 'index.png')


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
    assert sig.startswith('defmagma_loss(z_ref:Tensor,z_target:Tensor,bandwidth:') and 'normalized:bool=True' in sig, sig
    assert 'trace(Y^T L Y) / B^2' in text                # its docstring
    _png_ok(SHOTS / 'manifold.png')


def test_no_broken_local_links(site):
    pages = sorted(DOCS.rglob('*.html'))
    assert len(pages) >= 20, pages
    static = [(p, p.read_text(encoding='utf-8')) for p in pages if 'screenshots' not in p.parts]
    rendered = list(site.values())                      # the DOMs after their scripts ran
    bad = _broken_links(static + rendered)
    n = sum(1 for p, h in static for _ in _local_targets(p, h))
    assert n > 500, n                                   # sidebars, tables of contents and doc links: many links
    assert not bad, f'{len(bad)} broken local links:\n' + '\n'.join(sorted(set(bad))[:50])
