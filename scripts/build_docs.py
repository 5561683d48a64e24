"""Build the docs site from the notebooks into `_docs/` (what `make docs` runs).

1. nbdev 2.4.14's own `nbdev_proc_nbs` pipeline: `nbs/nbdev.yml` from settings.ini, the symbol index, `nbs/sidebar.yml`,
   then every notebook processed into `_proc/` (show_doc signatures and docstrings rendered, doc links added, hidden
   cells and `#|` directives removed). Its parts are called directly because the `nbdev_proc_nbs` command first tries
   to *download and install* Quarto with sudo when no `quarto` is on PATH.
2. The results pages filled in: the table and figures notebooks (`nbs/tables/`), committed without outputs, are executed
   in the staged copy with papermill (`profile mini`, `launch_runs False`, `runs_dir` a copy of the repository's
   `results/`), so they train nothing and show the committed mini tables and the figures drawn from the committed
   `metrics.csv`, `results.json` and `figure_data.npz` files. The kernels talk to papermill over IPC (local sockets),
   not TCP: ipykernel prints a warning for every kernel on unencrypted TCP (7 per build before). The executed copies
   are cached in `_proc/.executed/`, keyed by the notebook, `results/`, `magma/` and this script; `nbs/` is never
   written.
3. `_proc/` (a Quarto website project: `nbs/_quarto.yml`) rendered to HTML. The renderer is Quarto when a `quarto`
   binary is on PATH (or in .venv/bin), else smalldocs (pure Python, from PyPI, in the dev extras), which reads the
   same `_quarto.yml`. The `quarto-cli` package on PyPI cannot be the default: it is an sdist whose build downloads the
   Quarto binary from GitHub, so it does not install from the package index alone.
4. The site made self-contained: nbdev's doc links to the published site (`doc_host` + `doc_baseurl`, e.g.
   `https://magma-ssl.github.io/magma/manifold.html#...`) become relative links, and when Debian's `libjs-katex` is
   installed KaTeX is copied into `site_libs/katex/` so that the equations render offline (else the CDN is used).
   Both are our output, not a patch of a third party's code: the links are nbdev's doc links in our pages, and the
   KaTeX URL is the one smalldocs (and Quarto) writes in the HTML of every page with maths.
5. Search fetches `search.json`, which a browser refuses on a page opened from disk (`file://`): `make docs-serve`
   serves `_docs/` on http://127.0.0.1:8000, where the search box works (`make docs-check` tests it so).

README.md is never written here: nbdev_readme is not called, and settings.ini's readme_nb names no notebook.
"""
import argparse, hashlib, json, os, re, shutil, subprocess, sys, tempfile, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

KATEX_CDN = re.compile(r'https://cdn\.jsdelivr\.net/npm/katex@[0-9.]+/dist/')
DEBIAN_KATEX = Path('/usr/share/javascript/katex')
# the results pages, executed on the committed results/ with these papermill parameters (runs_dir added per build)
RESULT_NBS = ('table1', 'table2', 'table3', 'table6', 'table7', 'table8', 'figures')
RESULT_PARAMS = dict(profile='mini', launch_runs=False)
RESULT_NOTE = ("*This page was executed when the docs were built (`scripts/build_docs.py`) with `profile mini` and "
               "`launch_runs False`: it trained nothing and shows what the repository's committed `results/mini/` "
               "holds ({what}).*")
RESULT_WHAT = dict(figures="each run's `metrics.csv` and `results.json`: Fig. 2 and the Fig. 4 numbers; Figs. 3 to 6 "
                           "and the reconstructions from the `figure_data.npz` of the demo-sized runs in "
                           "`results/demo-figures/` (the mini runs predate it; no checkpoint is read)",
                   table="`results/mini/{name}-mini.md`, re-rendered from the runs' `results.json`; a cell \"not run\" "
                         "has no committed run")


def _digest(paths) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        for part in (p.as_posix().encode(), b'\0', p.read_bytes(), b'\0'): h.update(part)
    return h.hexdigest()[:16]


def _as_page(nb: Path, name: str, runs: Path) -> str:
    """The executed notebook `nb` as its page shows it: papermill's injected-parameters cell becomes a note saying how
    the page was made, and the scratch copy `runs` of results/ is written `results` wherever the outputs name it."""
    d = json.loads(nb.read_text(encoding='utf-8'))
    what = RESULT_WHAT['figures'] if name == 'figures' else RESULT_WHAT['table'].format(name=name)
    note = RESULT_NOTE.format(what=what)
    d['cells'] = [dict(cell_type='markdown', id=c.get('id', 'injected'), metadata={}, source=note)
                  if 'injected-parameters' in c.get('metadata', {}).get('tags', []) else c for c in d['cells']]
    return json.dumps(d, indent=1, ensure_ascii=False).replace(str(runs), 'results')


def _execute(pm, nb: Path, runs: Path, ipc: Path):
    "Run `nb` in place with papermill on the results copy `runs`, its kernel on IPC sockets at `ipc`."
    from traitlets.config import Config
    try:
        pm.execute_notebook(str(nb), str(nb), parameters=dict(RESULT_PARAMS, runs_dir=str(runs)), cwd=str(nb.parent),
                            kernel_name='python3', progress_bar=False,
                            # a local kernel over IPC, each with its own socket files (two run at once): on TCP,
                            # ipykernel warns once per kernel that the channel is not encrypted
                            config=Config({'KernelManager': {'transport': 'ipc', 'ip': str(ipc)}}))
    except pm.PapermillExecutionError as e:
        sys.exit(f'docs: executing {nb.parent.name}/{nb.name} on results/ failed in cell {e.exec_count}: '
                 f'{e.ename}: {e.evalue}')


def _execute_results(stage: Path, root: Path, cache: Path, n_workers: int = 2):
    """Execute the table and figures notebooks of `stage/tables/` in place on a copy of `root/results` (`_execute`),
    each made a page (`_as_page`). Cached in `cache` by content. Returns the names executed (not from the cache)."""
    try: import papermill as pm
    except ImportError: sys.exit("docs: the results pages are executed with papermill, which is not installed: "
                                 "`make setup` (or pip install papermill ipykernel); `--no-results` builds the site "
                                 "without them")
    results = root / 'results'
    if not results.is_dir(): sys.exit(f'docs: {results} is missing: the results pages are rendered from the committed '
                                      'results/')
    common = _digest([p for p in results.rglob('*') if p.is_file()] + sorted((root / 'magma').glob('*.py'))
                     + [Path(__file__).resolve()])
    cache.mkdir(parents=True, exist_ok=True)
    todo = []
    for name in RESULT_NBS:
        nb = stage / 'tables' / f'{name}.ipynb'
        if not nb.exists(): sys.exit(f'docs: {nb.relative_to(stage)} not in the processed notebooks (RESULT_NBS in '
                                     f'{Path(__file__).name})')
        key = cache / f"{name}-{hashlib.sha256(nb.read_bytes() + common.encode()).hexdigest()[:16]}.ipynb"
        if key.exists(): shutil.copy(key, nb)
        else: todo.append((name, nb, key))
    if not todo: return []
    with tempfile.TemporaryDirectory(prefix='magma-docs-results-') as tmp:
        runs = Path(tmp) / 'results'
        shutil.copytree(results, runs)
        def one(item):
            name, nb, key = item
            _execute(pm, nb, runs, Path(tmp) / f'{name}-ipc')
            text = _as_page(nb, name, runs)
            nb.write_text(text, encoding='utf-8')
            for old in cache.glob(f'{name}-*.ipynb'): old.unlink()
            key.write_text(text, encoding='utf-8')
            return name
        with ThreadPoolExecutor(max(1, n_workers)) as ex: return list(ex.map(one, todo))


def _front_cell(nb: dict):
    "The raw front-matter cell nbdev puts first in a processed notebook, if any."
    for c in nb['cells'][:3]:
        if c['cell_type'] == 'raw' and ''.join(c['source']).lstrip().startswith('---'): return c


def _stage(cache: Path, stage: Path, keep_output_file: bool = True):
    """Copy `_proc/` to `stage`, each notebook named as its page will be (`output-file`: 00_manifold -> manifold), so
    that the file names are the pages' names for any renderer (smalldocs does not read `output-file`). Two notebooks
    that claim one page (11_evaluate.ipynb and evaluate.ipynb both want evaluate.html) are told apart: the module
    notebook, which nbdev's doc links point to, keeps the name and the other becomes `<name>-notebook.html`."""
    shutil.copytree(cache, stage, ignore=shutil.ignore_patterns('_docs', '_site', '.executed'))
    renames = _rename_pages(stage, keep_output_file)
    if (stage / 'sidebar.yml').exists() and renames: _rename_in_sidebar(stage, renames)
    return renames


def _rename_pages(stage: Path, keep_output_file: bool) -> dict:
    "Rename the notebooks of `stage` after their pages (see `_stage`): {old: new}, paths relative to `stage`."
    nbs = sorted(stage.rglob('*.ipynb'), key=lambda p: (p.parent.as_posix(), not re.match(r'\d+_', p.name), p.name))
    taken, renames = set(), {}
    for nb in nbs:
        d = json.loads(nb.read_text(encoding='utf-8'))
        fm = _front_cell(d)
        m = re.search(r'(?m)^output-file:\s*(\S+)\s*$', ''.join(fm['source'])) if fm else None
        stem = Path(m.group(1)).stem if m else nb.stem
        if (nb.parent, stem) in taken: stem = nb.stem + '-notebook'
        taken.add((nb.parent, stem))
        if m and (Path(m.group(1)).stem != stem or not keep_output_file):
            # the file name now says it; smalldocs warns about the key, Quarto is told the (possibly new) name
            fm['source'] = re.sub(r'(?m)^output-file:.*\n?', f'output-file: {stem}.html\n' if keep_output_file else '',
                                  ''.join(fm['source']))
            nb.write_text(json.dumps(d, indent=1, ensure_ascii=False), encoding='utf-8')
        if stem != nb.stem: renames[nb] = nb.with_name(stem + '.ipynb')
    for i, nb in enumerate(renames): nb.rename(nb.with_name(f'.rename{i}'))     # two steps: a target may be a source
    for i, (nb, new) in enumerate(renames.items()): nb.with_name(f'.rename{i}').rename(new)
    return {a.relative_to(stage).as_posix(): b.relative_to(stage).as_posix() for a, b in renames.items()}


def _notebook_title(nb: Path) -> str:
    "The sidebar entry of a `-notebook` page: its front matter's title (else its name) and ` (notebook)`."
    fm = _front_cell(json.loads(nb.read_text(encoding='utf-8')))
    m = re.search(r'(?m)^title:\s*(.+?)\s*$', ''.join(fm['source'])) if fm else None
    return (m.group(1).strip('"\'') if m else nb.stem.replace('-notebook', '')) + ' (notebook)'


def _rename_in_sidebar(stage: Path, renames: dict):
    "nbdev's `sidebar.yml` in `stage` told the new names; a `-notebook` page gets a title saying so."
    import yaml
    def walk(items):
        for i, it in enumerate(items):
            if isinstance(it, str) and it in renames:
                new = renames[it]
                notebook = new.endswith('-notebook.ipynb')
                items[i] = {'text': _notebook_title(stage / new), 'href': new} if notebook else new
            elif isinstance(it, dict):
                if isinstance(it.get('href'), str) and it['href'] in renames: it['href'] = renames[it['href']]
                if isinstance(it.get('contents'), list): walk(it['contents'])
    sb = stage / 'sidebar.yml'
    y = yaml.safe_load(sb.read_text(encoding='utf-8'))
    walk(y['website']['sidebar']['contents'])
    sb.write_text(yaml.safe_dump(y, sort_keys=False), encoding='utf-8')


def _postprocess(site: Path, doc_url: str, katex: bool):
    """Relative links instead of links to the published site; KaTeX from site_libs when vendored (both rewrite our
    pages' HTML, not a third party's code). nbdev links every symbol of the index, also methods that have no show_doc
    section of their own (`SSLMethod.encode_views`): such a link goes to its class's section (`#sslmethod`), else to the
    top of its page, instead of a missing anchor."""
    pat = re.compile(r'(href|src)="' + re.escape(doc_url.rstrip('/') + '/') + r'([^"#]*)(?:#([^"]*))?"')
    pages = {p: p.read_text(encoding='utf-8') for p in site.rglob('*.html')}
    ids = {p.resolve(): set(re.findall(r'\sid="([^"]+)"', h)) for p, h in pages.items()}
    n_links = n_fallback = 0
    for page, s in pages.items():
        up = '../' * (len(page.relative_to(site).parts) - 1)
        def fix(m):
            nonlocal n_links, n_fallback
            n_links += 1
            path, anchor = m.group(2) or 'index.html', m.group(3)
            have = ids.get((site / path).resolve())
            if anchor and have is not None and anchor not in have:
                n_fallback += 1
                while '.' in anchor and anchor not in have: anchor = anchor.rsplit('.', 1)[0]
                if anchor not in have: anchor = None
            return f'{m.group(1)}="{up}{path}' + (f'#{anchor}' if anchor else '') + '"'
        s = pat.sub(fix, s)
        if katex: s = KATEX_CDN.sub(f'{up}site_libs/katex/', s)
        page.write_text(s, encoding='utf-8')
    return n_links, n_fallback


def _vendor_katex(site: Path):
    "Debian's libjs-katex copied into `site_libs/katex/` (fonts and auto-render included), when it is installed."
    if not (DEBIAN_KATEX / 'katex.min.js').exists(): return False
    dst = site / 'site_libs' / 'katex'
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(DEBIAN_KATEX, dst, ignore=shutil.ignore_patterns('*.mjs'))   # symlinks followed: fonts included
    ar = dst / 'contrib' / 'auto-render.min.js'
    if not ar.exists(): shutil.copy(dst / 'contrib' / 'auto-render.js', ar)
    return True


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--renderer', choices=['auto', 'quarto', 'smalldocs'],
                    default=os.environ.get('MAGMA_DOCS_RENDERER', 'auto'))
    ap.add_argument('--n_workers', type=int, default=2)
    ap.add_argument('--force', action='store_true', help='re-process every notebook (ignore the _proc cache)')
    ap.add_argument('--no-results', action='store_true',
                    help='do not execute the table and figures notebooks (empty results pages)')
    a = ap.parse_args(argv)
    t0 = time.time()
    from nbdev.config import get_config
    from nbdev.quarto import refresh_quarto_yml, nbdev_sidebar
    from nbdev.serve import proc_nbs
    import nbdev.doclinks
    cfg = get_config()
    root, doc_path = cfg.config_path, cfg.doc_path
    refresh_quarto_yml()                       # nbs/nbdev.yml from settings.ini; nbs/_quarto.yml is ours and kept
    nbdev.doclinks._build_modidx()
    nbdev_sidebar.__wrapped__(path=cfg.nbs_path)
    cache = proc_nbs(cfg.nbs_path, n_workers=a.n_workers, force=a.force)
    print(f'docs: notebooks processed into {cache.relative_to(root)}/ in {time.time() - t0:.1f}s', flush=True)

    bindir = Path(sys.executable).parent
    quarto = shutil.which('quarto', path=f'{bindir}{os.pathsep}{os.environ.get("PATH", "")}')
    renderer = a.renderer if a.renderer != 'auto' else ('quarto' if quarto else 'smalldocs')
    t1 = time.time()
    with tempfile.TemporaryDirectory(prefix='magma-docs-') as tmp:
        src = Path(tmp) / 'site'
        _stage(cache, src, keep_output_file=renderer == 'quarto')
        if not a.no_results:
            t2 = time.time()
            ran = _execute_results(src, root, cache / '.executed', a.n_workers)
            how = f'executed on results/ ({", ".join(ran)}) in {time.time() - t2:.1f}s' if ran else \
                'from the cache (_proc/.executed)'
            print(f'docs: results pages {", ".join(RESULT_NBS)} {how}', flush=True)
        if renderer == 'quarto':
            if not quarto: sys.exit('docs: --renderer quarto but no quarto binary on PATH')
            subprocess.run([quarto, 'render', '--no-cache'], cwd=src, check=True)
        else:
            subprocess.run([str(bindir / 'smalldocs'), 'render', '.'], cwd=src, check=True)
        out = src / doc_path.name
        if not (out / 'index.html').exists(): sys.exit(f'docs: {renderer} wrote no {out}/index.html')
        katex = _vendor_katex(out)
        n_links, n_fallback = _postprocess(out, cfg.doc_host + cfg.doc_baseurl, katex)
        shutil.rmtree(doc_path, ignore_errors=True)
        shutil.move(str(out), str(doc_path))
    n = sum(1 for _ in doc_path.rglob('*.html'))
    print(f'docs: {renderer} rendered {n} pages into {doc_path.relative_to(root)}/ in {time.time() - t1:.1f}s '
          f'({n_links} doc links made relative, {n_fallback} of them to the section of their class or page; '
          f'KaTeX {"vendored from libjs-katex" if katex else "from the CDN"}); '
          f'total {time.time() - t0:.1f}s; `make docs-serve` to browse it with search')


if __name__ == '__main__': main()
