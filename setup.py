"""Packaging for magma, driven by `settings.ini` (the nbdev 2 convention)."""
from configparser import ConfigParser
from pathlib import Path
import setuptools, shlex

config = ConfigParser(delimiters=['='])
config.read(Path(__file__).resolve().parent / 'settings.ini', encoding='utf-8')
cfg = config['DEFAULT']

cfg_keys = 'version description keywords author author_email'.split()
expected = cfg_keys + "lib_name user branch license status min_python audience language".split()
for o in expected: assert o in cfg, f"missing expected setting: {o}"
setup_cfg = {o: cfg[o] for o in cfg_keys}

licenses = {'apache2': ('Apache Software License 2.0', 'OSI Approved :: Apache Software License')}
statuses = ['1 - Planning', '2 - Pre-Alpha', '3 - Alpha', '4 - Beta', '5 - Production/Stable', '6 - Mature', '7 - Inactive']
py_versions = '3.10 3.11 3.12'.split()

def extras_of(cfg) -> dict:
    "The extras from settings.ini: every `<name>_requirements` key (dev, notebooks, figures) is the extra `<name>`."
    return {k[:-len('_requirements')]: shlex.split(v) for k, v in cfg.items()
            if k.endswith('_requirements') and v.strip()}

requirements = shlex.split(cfg.get('requirements', ''))
min_python = cfg['min_python']
lic = licenses.get(cfg['license'].lower(), (cfg['license'], None))

if __name__ == '__main__':  # pip (setuptools' build backend) runs this file as __main__; tests import extras_of
  setuptools.setup(
    name=cfg['lib_name'],
    license=lic[0],
    classifiers=['Development Status :: ' + statuses[int(cfg['status'])],
                 'Intended Audience :: ' + cfg['audience'].title(),
                 'Natural Language :: ' + cfg['language'].title()]
                + ['Programming Language :: Python :: ' + o for o in py_versions[py_versions.index(min_python):]]
                + (['License :: ' + lic[1]] if lic[1] else []),
    url=cfg['git_url'],
    packages=setuptools.find_packages(include=['magma', 'magma.*']),
    include_package_data=True,
    install_requires=requirements,
    extras_require=extras_of(cfg),
    python_requires='>=' + cfg['min_python'],
    long_description=(Path(__file__).resolve().parent / 'README.md').read_text(encoding='utf-8'),
    long_description_content_type='text/markdown',
    zip_safe=False,
    entry_points={'console_scripts': cfg.get('console_scripts', '').split(),
                  'nbdev': [f'{cfg.get("lib_path")}={cfg.get("lib_path")}._modidx:d']},
    **setup_cfg)
