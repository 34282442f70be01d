"""The evaluation protocols as library functions: evaluate_fold, evaluate_clip_es, the CAM sources, episode loading."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from clipprior.cache import PriorCache
from clipprior.config import get_preset
from clipprior.data import load_label, load_rgb, present_classes, present_names, prompt_names
from clipprior.errors import CacheKeyError, DataNotFoundError, InvalidInputError
from clipprior.evaluate import (
    CachedCams,
    ModelCams,
    cache_facts,
    cache_image_pairs,
    evaluate_clip_es,
    evaluate_fold,
    load_episode,
    resolve_data_root,
)
from clipprior.model import load_clip
from clipprior.preprocess import preprocess_query
from clipprior.priors import pir, resize_maps, vtp
from tests._synthetic_priors import expected_scores, make_synthetic_cache, raw_prior


@pytest.fixture(scope="module")
def fold0(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_synthetic_cache(tmp_path_factory.mktemp("protocols"), fold=0, n_episodes=10)


def test_cache_facts_and_data_root(fold0: tuple[Path, Path], tmp_path: Path) -> None:
    path, root = fold0
    with PriorCache(path) as cache:
        facts = cache_facts(cache)
    assert (facts.dataset, facts.fold, facts.split, facts.model) == ("pascal5i", 0, "val", "synthetic")
    assert facts.fold_classes() == [1, 2, 3, 4, 5] and facts.class_name(3) == "bird"
    assert facts.label() == "pascal5i fold 0 (val)"
    assert resolve_data_root(root, facts) == root
    with pytest.raises(DataNotFoundError, match="pass --data-root"):
        resolve_data_root(None, facts)
    with pytest.raises(DataNotFoundError, match="not a directory"):
        resolve_data_root(tmp_path / "nowhere", facts)


def test_load_episode_puts_priors_at_the_label_size(fold0: tuple[Path, Path]) -> None:
    path, root = fold0
    with PriorCache(path) as cache:
        record = cache.episodes[0]
        data = load_episode(cache, record, root)
        bare = load_episode(cache, record, root, images=False)
    label = load_label(root / record.query_label)
    np.testing.assert_array_equal(data.label, label)
    assert data.query is not None and data.query.shape == (*label.shape, 3) and len(data.supports) == 1
    assert bare.query is None and bare.supports == []
    for kind in ("vtp_raw", "vtp_refined", "vvp"):
        assert data.priors[kind] is not None and data.priors[kind].shape == label.shape
    np.testing.assert_allclose(data.priors["vtp_raw"], raw_prior(label == record.class_id), atol=1e-3)


@pytest.mark.parametrize("threshold", [0.5, 0.2])
def test_evaluate_fold_equals_the_brute_force_scores(fold0: tuple[Path, Path], threshold: float) -> None:
    path, root = fold0
    seen: list[int] = []
    with PriorCache(path) as cache:
        result = evaluate_fold(cache, root, fixed_threshold=threshold, on_episode=seen.append)
        limited = evaluate_fold(cache, root, limit=3)
    expected = expected_scores(path, root, threshold)
    assert seen == list(range(1, 11)) and result.missing_classes == []
    for kind, scores in result.scores.items():
        assert scores.miou_fixed == pytest.approx(expected[kind]["miou"], abs=1e-12)
        assert scores.fbiou_fixed == pytest.approx(expected[kind]["fbiou"], abs=1e-12)
    assert result.to_dict()["priors"]["vtp_raw"]["per_class"]["1"]["name"] == "aeroplane"
    assert limited.scores["vtp_raw"].episodes == 3


def test_clip_es_from_the_cache_skips_or_names_missing_cams(fold0: tuple[Path, Path]) -> None:
    path, root = fold0
    with PriorCache(path) as cache:
        pairs = cache_image_pairs(cache, "pascal5i", "val")
        assert pairs == sorted(pairs) and all(label.startswith("SegmentationClassAug/") for _, label in pairs)
        with pytest.raises(CacheKeyError, match="--skip-missing"):
            evaluate_clip_es(pairs, root, CachedCams(cache), n_classes=21)
        results, skipped = evaluate_clip_es(pairs, root, CachedCams(cache), n_classes=21, skip_missing=True)
    assert 0 < skipped < len(pairs)
    assert set(results) == {"vtp_raw", "vtp_refined"} and set(results["vtp_raw"]) == {1.0, 2.0}


def test_model_cams_are_one_vtp_pass_with_the_present_classes(tiny_clip_dir: Path, fold0: tuple[Path, Path]) -> None:
    _, root = fold0
    clip = load_clip(str(tiny_clip_dir), device="cpu")
    config = get_preset("official")
    image, label_id = "JPEGImages/2007_001_1.jpg", "SegmentationClassAug/2007_001_1.png"
    label = load_label(root / label_id)
    classes = present_classes(label, 20)
    assert len(classes) == 2  # the synthetic image shows its class and another one
    cams = ModelCams(clip, "pascal5i", config)(image, root, label, classes)
    names = prompt_names("pascal5i")
    pixels = preprocess_query(load_rgb(root / image), clip.patch_size, config.vtp_resample)[None]
    for c in classes:  # each class alone (batching moves PIR by ~2e-5), with the other class in its softmax
        out = vtp(clip, pixels, [names[c - 1]], context=[present_names(label, c, names)], config=config,
                  return_attention=True)
        refined = pir(out.cam, out.attention, config=config).refined
        torch.testing.assert_close(cams["vtp_raw"][c], resize_maps(out.cam, label.shape)[0], atol=1e-4, rtol=0)
        torch.testing.assert_close(cams["vtp_refined"][c], resize_maps(refined, label.shape)[0], atol=1e-4, rtol=0)
    assert ModelCams(clip, "pascal5i", config)(image, root, label, []) == {"vtp_raw": {}, "vtp_refined": {}}


def test_evaluate_fold_refuses_an_empty_selection(fold0: tuple[Path, Path], tmp_path: Path) -> None:
    _, root = fold0
    empty = tmp_path / "empty.h5"
    from clipprior.cache import CacheWriter

    with CacheWriter(empty, {"dataset": "pascal5i", "fold": 0, "split": "val", "model": "m", "shot": 1}) as writer:
        writer.set_episodes([])
        writer.finalize()
    with PriorCache(empty) as cache, pytest.raises(InvalidInputError, match="has no episodes"):
        evaluate_fold(cache, root)


def test_clip_es_images_choose_dataset_root_and_pairs(fold0: tuple[Path, Path], tmp_path: Path) -> None:
    from clipprior.errors import DatasetError
    from clipprior.evaluate import clip_es_images

    path, root = fold0
    with PriorCache(path) as cache:
        chosen = clip_es_images(cache, data_root=root, split="val", limit=3)
        assert chosen.dataset == "pascal5i" and chosen.root == root  # the cache's benchmark
        assert chosen.pairs == cache_image_pairs(cache, "pascal5i", "val")[:3]
        assert chosen.n_classes == 21 and chosen.class_names[:2] == ["background", "aeroplane"]
        assert clip_es_images(cache, data_root=root, dataset="coco").n_classes == 81  # --dataset wins
    listed = tmp_path / "list.txt"
    listed.write_text("2007_001_1\n", encoding="utf-8")
    chosen = clip_es_images(None, data_root=root, list_file=listed, split="val")
    assert chosen.pairs == [("JPEGImages/2007_001_1.jpg", "SegmentationClassAug/2007_001_1.png")]
    with pytest.raises(DataNotFoundError, match="pass --data-root"):
        clip_es_images(None, list_file=listed)
    with pytest.raises(InvalidInputError, match="list file"):
        clip_es_images(None, data_root=root)
    listed.write_text("\n", encoding="utf-8")
    with pytest.raises(DatasetError, match="no image to score"):
        clip_es_images(None, data_root=root, list_file=listed)


def test_clip_es_cams_prefer_the_model_then_the_cache(tiny_clip_dir: Path, fold0: tuple[Path, Path]) -> None:
    from clipprior.evaluate import clip_es_cams

    path, _ = fold0
    clip = load_clip(str(tiny_clip_dir), device="cpu")
    with PriorCache(path) as cache:
        cams, source = clip_es_cams("pascal5i", cache=cache)
        assert isinstance(cams, CachedCams) and source == str(cache.path)
        cams, source = clip_es_cams("pascal5i", cache=cache, clip=clip, config=get_preset("official"))
        assert isinstance(cams, ModelCams) and source == clip.source and cams.config == get_preset("official")
    with pytest.raises(InvalidInputError, match="needs CAMs"):
        clip_es_cams("pascal5i")


def test_clip_es_result_records_the_reference_under_clip_es_names(fold0: tuple[Path, Path]) -> None:
    from clipprior.cache import VTP_CAM, VTP_REFINED
    from clipprior.evaluate import CLIP_ES_REFERENCE, ClipEsResult, clip_es_images

    assert {VTP_CAM.prior: 58.6, VTP_REFINED.prior: 70.8} == CLIP_ES_REFERENCE
    path, root = fold0
    with PriorCache(path) as cache:
        chosen = clip_es_images(cache, data_root=root, split="val")
        scores, skipped = evaluate_clip_es(chosen.pairs, root, CachedCams(cache), n_classes=chosen.n_classes,
                                           skip_missing=True)
    payload = ClipEsResult(chosen, str(path), scores, skipped).to_dict()
    assert payload["reference"] == {"clip_es_voc_train": {"raw": 58.6, "refined": 70.8}}
    assert payload["dataset"] == "pascal5i" and payload["skipped"] == skipped
    assert list(payload["priors"]["vtp_raw"]["1"]["per_class"])[:2] == ["background", "aeroplane"]


def test_episode_scorer_gives_each_episodes_iou_and_the_running_scores(fold0: tuple[Path, Path]) -> None:
    from clipprior.evaluate import EpisodeScorer, PriorMeter, binary_iou

    path, root = fold0
    scorer = EpisodeScorer(0.5, kinds=("vvp", "vtp_raw", "vtp_refined"))
    meters = {k: PriorMeter(thresholds=(0.5,), fixed_threshold=0.5) for k in scorer.kinds}
    with PriorCache(path) as cache:
        for record in cache.episodes[:4]:
            data = load_episode(cache, record, root, images=False)
            ious = scorer.update(data)
            assert list(ious) == ["vvp", "vtp_raw", "vtp_refined"]
            for kind, iou in ious.items():
                meters[kind].update(data.priors[kind], data.label, record.class_id)
                assert iou == binary_iou(data.priors[kind], data.label == record.class_id, 0.5,
                                         valid=data.label != 255)
            assert ious["vtp_refined"] == 1.0  # the synthetic refined prior is the target
    results = scorer.results()
    assert list(results) == ["vvp", "vtp_raw", "vtp_refined"]
    for kind, scores in results.items():
        assert scores.miou_fixed == meters[kind].result().miou_fixed and scores.episodes == 4
    assert EpisodeScorer(0.5).results() == {}
    with pytest.raises(InvalidInputError, match="unknown prior kind"):
        EpisodeScorer(0.5, kinds=("vtp",))
