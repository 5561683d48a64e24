"""pytest settings for magma's tests.

`slow`: a test of several processes or a whole subprocess job, which `make test` skips to stay under 10 minutes on
2 cores (`pytest -m "not slow"`) and `make test-slow` (or plain `pytest tests`) runs. Each slow test's behaviour has
a faster check in `make test` too; the slow one proves it end to end (named in the test's own marker reason).

`site`: a test that reads the built docs site (`_docs/`, in a browser or as HTML). `make docs-check` (run by CI) builds
the site and runs them; `make test` deselects them, so its time does not depend on whether `_docs/` exists.
"""


def pytest_configure(config):
    config.addinivalue_line('markers', 'slow(reason): skipped by `make test`, run by `make test-slow`')
    config.addinivalue_line('markers', 'site: reads the built docs site; run by `make docs-check`, skipped by `make test`')
