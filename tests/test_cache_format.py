"""The cache format module and the files of older format versions (tests/fixtures)."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from clipprior.cache import PriorCache, _format, _h5, _read, _report, _union, _write, check_cache, summarize_cache
from clipprior.cache._format import MAP_KINDS, PANEL_ORDER, PRIORS, READABLE_VERSIONS, TABLES, kinds_of
from clipprior.config import PriorConfig
from clipprior.errors import CacheCorruptError
from tests._cache_job import episodes, fake_vtp, fake_vvp, image_key, image_size, run_job

FIXTURES = Path(__file__).parent / "fixtures"


def _expected_v1() -> dict[str, object]:
    return {"n_images": 4, "n_episodes": 3, "shot": 2}


def test_v1_fixture_is_version_1_and_readable() -> None:
    path = FIXTURES / "cache_v1.h5"
    with h5py.File(path, "r") as f:
        assert int(f.attrs["format_version"]) == 1
    assert 1 in READABLE_VERSIONS
    spec = _expected_v1()
    cache = PriorCache(path)
    assert cache.images == [image_key(i) for i in range(spec["n_images"])]
    assert len(cache) == spec["n_episodes"] and cache.shot == spec["shot"]
    assert cache.config == PriorConfig()
    assert cache.episodes == episodes(spec["n_images"], spec["n_episodes"], spec["shot"])
    for key, class_id in cache.vtp_keys():
        i = int(key.split("_")[-1].split(".")[0])
        cam, refined = fake_vtp(i, class_id)
        assert cache.image_size(key) == image_size(i)
        assert torch.equal(cache.vtp(key, class_id, refined=False), torch.from_numpy(cam.astype(np.float16)).float())
        assert torch.equal(cache.vtp(key, class_id), torch.from_numpy(refined.astype(np.float16)).float())
    for record in cache:
        expected = fake_vvp(record, spec["shot"]).astype(np.float16)
        assert torch.equal(cache.vvp(record.index), torch.from_numpy(expected).float())
    report = check_cache(cache)
    assert report.ok, report.problems
    summary = summarize_cache(cache)
    # every kind a v1 file holds: the optional feature tables (--store features) came later
    assert set(summary["values"]) == {k.name for k in MAP_KINDS if not _format.TABLES[k.table].optional}
    cache.close()


def test_current_writer_output_matches_the_declared_format(tmp_path: Path) -> None:
    out = run_job(tmp_path / "p.h5", n_images=3, n_episodes=2, shot=1)
    with h5py.File(out, "r") as f:
        assert f.attrs[_format.ATTR_FORMAT] == _format.FORMAT_NAME
        assert int(f.attrs[_format.ATTR_VERSION]) == _format.FORMAT_VERSION
        for table in TABLES.values():
            if table.optional:  # a maps cache has no feature tables (tests/test_store_features.py checks them)
                assert table.group not in f
                continue
            rows = f[table.grid].shape[0]
            for path, dtype in table.key_columns:
                assert f[path].shape == (rows,) and f[path].dtype == dtype
            for kind in kinds_of(table.group):
                assert f[kind.name].shape[0] == rows and f[kind.name].dtype == kind.dtype
                assert f[kind.name].ndim == 1 + kind.ndim
        assert f[_format.IMAGES_KEY].shape[0] == 3


def test_unknown_versions_are_refused_with_the_known_ones(tmp_path: Path) -> None:
    out = run_job(tmp_path / "p.h5", n_images=2, n_episodes=1)
    with h5py.File(out, "r+") as f:
        f.attrs["format_version"] = 99
    with pytest.raises(Exception, match=r"format version 99; this clipprior reads versions \[1"):
        _ = PriorCache(out).images


@pytest.mark.parametrize("module", [_read, _report])
def test_reader_and_report_do_not_reach_into_the_writer_or_private_reader_state(module: object) -> None:
    tree = ast.parse(inspect.getsource(module))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "clipprior.cache._write" not in imported
    if module is _report:
        private = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
                   and isinstance(node.value, ast.Name) and node.value.id == "cache" and node.attr.startswith("_")}
        assert not private


def test_map_kinds_are_declared_once() -> None:
    names = [k.name for k in MAP_KINDS]
    assert len(set(names)) == len(names)
    assert all(k.table in TABLES and k.name.startswith(k.table + "/") for k in MAP_KINDS)
    sources = {m.__name__: inspect.getsource(m) for m in (_h5, _read, _report, _union, _write)}
    spelled = [*names, *(t.grid for t in TABLES.values()), _format.IMAGES_KEY, _format.IMAGES_SIZE, "seg-"]
    for name in spelled:  # no module but the format module spells a dataset path or file rule
        assert not any(f'"{name}' in src for src in sources.values()), name


def test_attribute_and_manifest_names_are_spelled_once() -> None:
    """Root attributes and manifest keys are named through _format in the package, never by their string."""
    from clipprior.cli import cache_cmds

    names = {_format.ATTR_FORMAT, _format.ATTR_VERSION, _format.ATTR_RUN_ID, _format.ATTR_CREATED,
             _format.ATTR_FINALIZED, _format.ATTR_SHARD_INDEX, _format.ATTR_SHARD_COUNT, _format.MANIFEST_SHARD}
    for module in (_h5, _read, _report, _union, _write, cache_cmds):
        assert not names & _literals(module), module.__name__
    # the commands read a cache through the public API only
    imports = [node for node in ast.walk(ast.parse(inspect.getsource(cache_cmds))) if isinstance(node, ast.ImportFrom)]
    imported = {node.module or "" for node in imports} | {alias.name for node in imports for alias in node.names}
    assert not any("_format" in name for name in imported)


def _literals(module: object) -> set[str]:
    """The string constants of a module's code (docstrings left out)."""
    tree = ast.parse(inspect.getsource(module))  # type: ignore[arg-type]
    docs = {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and node.body
            and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return {node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs}


def test_show_and_evaluate_iterate_the_declared_prior_kinds() -> None:
    from clipprior import photos
    from clipprior.cli import cache_cmds, demo
    from clipprior.cli import evaluate as evaluate_cmd
    from clipprior.cli import show as show_cmd
    from clipprior.evaluate import PRIOR_KINDS, PRIOR_TITLES, episodes, metrics, protocols

    assert PRIOR_KINDS == tuple(k.prior for k in PRIORS) == ("vtp_raw", "vtp_refined", "vvp")
    assert PRIOR_TITLES == {"vtp_raw": "VTP raw", "vtp_refined": "VTP refined", "vvp": "VVP"}
    assert sorted(k.name for k in PANEL_ORDER) == sorted(k.name for k in PRIORS) and PANEL_ORDER[0].prior == "vvp"
    assert all(k.label and k.abbrev for k in PRIORS) and set(PRIORS) <= set(MAP_KINDS)
    assert tuple(k.prior for k in kinds_of("vtp")) == protocols.CAM_KINDS
    names = {k.prior for k in kinds_of("vtp")} | {k.label for k in kinds_of("vtp")}  # ("vvp" names arguments too)
    for module in (episodes, metrics, protocols, evaluate_cmd, show_cmd, cache_cmds, demo, photos):
        assert not names & _literals(module), module.__name__  # no own list of the kinds


# ----------------------------------------------------------------------------------------- damage


def _flip_chunk(path: Path, dataset: str, row: int) -> None:
    """Flip bits in the middle of the stored (compressed, checksummed) chunk of one row, on disk."""
    with h5py.File(path, "r") as f:
        ds = f[dataset]
        info = ds.id.get_chunk_info_by_coord((row,) + (0,) * (ds.ndim - 1))
    with open(path, "r+b") as fh:
        fh.seek(info.byte_offset + info.size // 2)
        byte = fh.read(1)
        fh.seek(info.byte_offset + info.size // 2)
        fh.write(bytes([byte[0] ^ 0x5A]))


def test_a_bit_flip_is_a_clipprior_error_naming_file_and_entry(tmp_path: Path) -> None:
    out = run_job(tmp_path / "p.h5", n_images=4, n_episodes=3)
    cache = PriorCache(out)
    keys = cache.vtp_keys()
    cache.close()
    with h5py.File(out, "r") as f:
        assert f["vtp/refined"].fletcher32 and f["vvp/maps"].fletcher32 and f["vtp/grid"].fletcher32
    _flip_chunk(out, "vtp/refined", 2)
    _flip_chunk(out, "vvp/maps", 1)
    with PriorCache(out) as cache:
        assert torch.equal(cache.vtp(*keys[2], refined=False), cache.vtp(*keys[2], refined=False))  # raw map intact
        with pytest.raises(CacheCorruptError) as info:
            cache.vtp(*keys[2])
        assert not isinstance(info.value, OSError)
        assert str(out) in str(info.value) and f"vtp/refined {keys[2]!r}" in str(info.value)
        assert "clipprior verify" in str(info.value)
        with pytest.raises(CacheCorruptError, match=r"vvp/maps 1 cannot be read"):
            cache.vvp(1)
        cache.vvp(0)
    report = check_cache(out)
    assert report.damaged == [f"vtp/refined {keys[2]!r}", "vvp/maps 1"]
    assert not report.ok and sum("damaged" in p for p in report.problems) == 2
    with pytest.raises(CacheCorruptError, match=r"vtp/refined"):
        summarize_cache(out)


def test_verify_lists_every_damaged_entry_and_merge_names_it(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from clipprior.cache import merge_caches, shard_path
    from clipprior.cli.main import app

    out = run_job(tmp_path / "p.h5", n_images=6, n_episodes=4)
    with PriorCache(out) as cache:
        keys = cache.vtp_keys()
    for row in (0, 3, 5):
        _flip_chunk(out, "vtp/cam", row)
    result = CliRunner().invoke(app, ["verify", str(out)])
    assert result.exit_code == 1
    text = " ".join(result.output.split())
    for row in (0, 3, 5):
        assert f"vtp/cam {keys[row]!r}: damaged" in text
    assert "Traceback" not in result.output

    for i in range(2):
        run_job(tmp_path / "s.h5", n_images=6, n_episodes=4, shard=(i, 2))
    shard = shard_path(tmp_path / "s.h5", 0, 2)
    _flip_chunk(shard, "vtp/refined", 1)
    with pytest.raises(CacheCorruptError, match=rf"{shard}.*vtp/refined \("):
        merge_caches([shard_path(tmp_path / "s.h5", i, 2) for i in range(2)], tmp_path / "m.h5")
    assert not (tmp_path / "m.h5").exists()


def test_damaged_index_table_is_named(tmp_path: Path) -> None:
    out = run_job(tmp_path / "p.h5", n_images=4, n_episodes=3)
    _flip_chunk(out, "vtp/class_id", 0)
    with pytest.raises(CacheCorruptError, match="index table"):
        PriorCache(out).vtp_keys()
    with pytest.raises(CacheCorruptError):
        check_cache(out)


def test_v1_fixture_without_checksums_is_noted() -> None:
    report = check_cache(FIXTURES / "cache_v1.h5")
    assert report.ok and any("no per-entry checksums" in n for n in report.notes)
