"""The package surface: lazy re-exports, py.typed, the CLI module layout."""

from __future__ import annotations

import subprocess
import sys
from importlib import resources

import clipprior


def test_every_public_name_resolves():
    for name in clipprior.__all__:
        assert getattr(clipprior, name) is not None, name
    assert sorted(set(clipprior.__all__)) == sorted(clipprior.__all__)


def test_unknown_attribute_raises_attribute_error():
    try:
        clipprior.no_such_name  # noqa: B018
    except AttributeError as err:
        assert "no_such_name" in str(err)
    else:  # pragma: no cover
        raise AssertionError("expected AttributeError")


def test_import_is_light():
    code = "import sys, clipprior; print(sorted(m for m in ('torch', 'transformers', 'h5py') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_reading_a_cache_does_not_import_transformers():
    code = "import sys; from clipprior import PriorCache; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"


def test_ships_py_typed_and_tokenizer():
    root = resources.files("clipprior")
    assert (root / "py.typed").is_file()
    assert (root / "assets" / "clip-tokenizer" / "vocab.json").is_file()


def test_cli_is_installed_under_the_package():
    import clipprior.cli.main as main

    assert main.__name__ == "clipprior.cli.main"
    found = subprocess.run([sys.executable, "-c", "import importlib.util as u; print(u.find_spec('cli') is None)"],
                           capture_output=True, text=True, check=True, cwd="/").stdout.strip()
    assert found == "True"


def test_every_source_folder_is_a_package_the_build_finds():
    # pyproject.toml finds packages by `include = ["clipprior", "clipprior.*"]`: a folder of modules without
    # __init__.py would be left out of a wheel (an editable install would still import it).
    from pathlib import Path

    from setuptools import find_packages

    root = Path(clipprior.__file__).parent
    folders = {p.parent for p in root.rglob("*.py") if "__pycache__" not in p.parts}
    expected = {".".join(f.relative_to(root.parent).parts) for f in folders}
    found = set(find_packages(str(root.parent), include=["clipprior", "clipprior.*"]))
    assert expected <= found, sorted(expected - found)
