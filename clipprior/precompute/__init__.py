"""Planning and running the CLIP passes of a prior cache.

VTP depends only on (image, class) and the query side of VVP only on the image, so the work is
planned around unique passes:

- every unique query image runs through CLIP once, in batches of images of the same size; that one
  pass gives the Grad-CAM of each of its classes (one backward for all pairs of the batch), the
  attention for PIR and the layer features for VVP;
- every unique (support image, class) runs its masked pass once; its features are kept in memory
  only while an episode still needs them (a reference count over the known schedule), so memory
  stays flat as the episode count grows;
- each episode's VVP is then a cheap cosine-max between features already computed.

By default everything is at the image's own geometry: the query and supports are resized up to a
multiple of the patch size, as the official VTP path prepares the query, and the maps are stored on
that patch grid with the image size recorded (see ``docs/cache-format.md``). With
``PriorConfig.geometry == "official"``, VVP runs on the trainers' stretched square tensors and VTP on
the official validation path (see ``docs/priors.md``).

The data flow reads top to bottom, one module per stage:

1. :mod:`~clipprior.precompute.plan`: unique passes, chunks (the unit of resumption), batches;
2. :mod:`~clipprior.precompute.load`: decode, convert, resize the images and masks of a batch;
3. :mod:`~clipprior.precompute.passes`: the CLIP passes on the model's device;
4. :mod:`~clipprior.precompute.post`: PIR and VVP;
5. :mod:`~clipprior.precompute.write`: into the cache writer;

and :mod:`~clipprior.precompute.engine` runs them (:func:`run_precompute`, the one entry point);
:mod:`~clipprior.precompute.provenance` records what makes two runs the same computation;
:mod:`~clipprior.precompute.fold` does a fold's whole cache (:func:`fold_episodes`, then
:func:`precompute_fold`: provenance with the data root, writer, feature stage, engine), as
``clipprior precompute`` does.

Example:
    >>> stats = run_precompute(clip, dataset, episodes, writer, class_names=names)  # doctest: +SKIP
    >>> stats.query_passes  # doctest: +SKIP
    364
"""

from __future__ import annotations

from clipprior.precompute.engine import check_recomputed, recompute_episode, run_precompute
from clipprior.precompute.features import feature_plan, store_features
from clipprior.precompute.fold import (
    STORE_CHOICES,
    FoldEpisodes,
    FoldPrecompute,
    check_episode_sources,
    fold_episodes,
    precompute_fold,
)
from clipprior.precompute.plan import (
    PrecomputeStats,
    QueryWork,
    WorkPlan,
    episode_records,
    plan_chunks,
    plan_work,
)
from clipprior.precompute.provenance import build_provenance, computation_settings, geometry_description

__all__ = [
    "STORE_CHOICES",
    "FoldEpisodes",
    "FoldPrecompute",
    "PrecomputeStats",
    "QueryWork",
    "WorkPlan",
    "build_provenance",
    "check_episode_sources",
    "check_recomputed",
    "computation_settings",
    "episode_records",
    "feature_plan",
    "fold_episodes",
    "geometry_description",
    "plan_chunks",
    "plan_work",
    "precompute_fold",
    "recompute_episode",
    "run_precompute",
    "store_features",
]
