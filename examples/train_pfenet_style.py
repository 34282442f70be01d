r"""A complete PFENet-style few-shot segmentation training loop on cached CLIP priors.

What a PFENet / BAM / HDMNet / PI-CLIP trainer does, with the priors read from a clipprior cache
instead of computed by CLIP inside the model:

* its own sampler: a random class and random supports for every query, fresh every epoch
  (:class:`clipprior.EpisodeSampler`, restricted to what the cache can serve);
* the trainers' augmentation (:mod:`clipprior.transforms`), which moves the priors with the query
  image and its labels;
* 1- or K-shot, ``DataLoader`` workers (fork or spawn), and the extra fields PI-CLIP and BAM need
  (``label_b``, the class index);
* a small model that takes the priors as PI-CLIP does (:func:`clipprior.prior_channels`).

Run it on your data (see docs/training-loop.md for making the cache)::

    python examples/train_pfenet_style.py --cache ~/caches/p5i-f0-train.h5 --fold 0 \
        --data-root ~/data/VOCdevkit2012/VOC2012 --shot 1 --epochs 2 --workers 4

The test suite runs it on a synthetic PASCAL-5i with a tiny random CLIP (tests/test_training_example.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from clipprior import EpisodeSampler, PriorCache, fold_classes, open_dataset, prior_channels
from clipprior.training import base_label, reverse_shots
from clipprior.transforms import train_transform


def fss_label(label: np.ndarray, class_id: int) -> np.ndarray:
    """The episode's binary label: 1 for the class, 0 elsewhere, 255 (ignore) kept."""
    return np.where(label == class_id, 1, np.where(label == 255, 255, 0)).astype(np.uint8)


def read_priors(cache: PriorCache, episode: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """VTP (1, H, W) and VVP (2K, H, W) of an episode at the query's original size, supports in draw order."""
    supports = [image for image, _ in episode.supports]
    if hasattr(cache, "episode_priors"):  # any store mode: computed on the fly by a features cache
        return cache.episode_priors(episode.query_image, episode.class_id, supports, size="original")
    vtp = cache.vtp(episode.query_image, episode.class_id, size="original")[None]
    vvp = cache.vvp(query=episode.query_image, class_id=episode.class_id, supports=supports, size="original")
    return vtp, vvp


class TrainEpisodes(Dataset):
    """The trainer's episodes, augmented, with their priors on the feature map.

    ``__getitem__((epoch, i))`` draws query ``i``'s episode of that epoch (a plain ``i`` takes the
    epoch of ``set_epoch``), so every epoch visits every query once with fresh supports. Safe in
    ``DataLoader`` workers: the cache opens its file once per process and pickles as its path; the
    episode and the augmentation depend on (seed, epoch, index) only, not on the worker.

    Args:
        dataset: The training :class:`clipprior.FSSDataset`.
        cache: The prior cache of that fold and split.
        shot: K.
        seed: Seed of the episodes and the augmentation.
        image_size: Side of the network input (473 in the trainers).
        feature_size: Side of the feature map the priors go to (60 for 473 inputs).
        trainer: Augmentation of ``"pi-clip"`` (resize to the side) or ``"pfenet"`` (random crop).
        pi_clip_order: Stack supports (and VVP channels) in PI-CLIP's order, reverse draw order.
    """

    def __init__(self, dataset: Any, cache: PriorCache, shot: int, seed: int = 0, image_size: int = 473,
                 feature_size: int = 60, trainer: str = "pi-clip", pi_clip_order: bool = False) -> None:
        self.dataset, self.cache = dataset, cache
        self.sampler = EpisodeSampler(dataset, shot=shot, seed=seed, cache=cache)
        self.seed, self.epoch = seed, 0
        self.augment = train_transform(trainer, image_size, to_tensor=True)
        self.feature_size = (feature_size, feature_size)
        self.base_classes = fold_classes(dataset.name, dataset.fold, "train", dataset.coco_split)
        self.pi_clip_order = pi_clip_order

    def set_epoch(self, epoch: int) -> None:
        """Draw the episodes and augmentations of ``epoch`` (call before iterating the loader)."""
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        episode = self.sampler.episode(index, epoch)
        rng = np.random.default_rng((self.seed, epoch, index, 1))  # the augmentation's draws
        ds, c = self.dataset, episode.class_id

        raw = ds.load_label(episode.query_label)
        labels = np.stack([fss_label(raw, c), base_label(raw, self.base_classes)], axis=2)  # label, label_b
        vtp, vvp = read_priors(self.cache, episode)
        prior = torch.cat([vtp, vvp])  # (1 + 2K, H, W), moved with the query
        image, labels, prior = self.augment(ds.load_image(episode.query_image).astype(np.float32), labels, prior,
                                            rng=rng)
        # PI-CLIP resizes its priors to the feature map with align_corners=True
        prior = F.interpolate(prior[None], size=self.feature_size, mode="bilinear", align_corners=True)[0]
        vtp, vvp = prior[:1], prior[1:]

        supports, support_labels = [], []
        for image_id, label_id in episode.supports:  # each support augmented with its own draws
            s_image, s_label, _ = self.augment(ds.load_image(image_id).astype(np.float32),
                                               fss_label(ds.load_label(label_id), c), rng=rng)
            supports.append(s_image)
            support_labels.append(s_label)
        if self.pi_clip_order:
            supports, support_labels, vvp = supports[::-1], support_labels[::-1], reverse_shots(vvp)
        return {
            "query": image,                                   # (3, S, S), normalised
            "label": labels[0],                               # (S, S): 1 class, 0 other, 255 ignore
            "label_b": labels[1],                             # (S, S): BAM's base-class label
            "supports": torch.stack(supports),                # (K, 3, S, S)
            "support_labels": torch.stack(support_labels),    # (K, S, S)
            "vtp": vtp,                                       # (1, F, F)
            "vvp": vvp,                                       # (2K, F, F)
            "class_id": c,                                    # 1-based dataset class
            "subcls": self.base_classes.index(c),             # PI-CLIP's cat_idx: rank among the base classes
            "key": f"{episode.query_image}|{c}|{'|'.join(i for i, _ in episode.supports)}",
        }


class EpochShuffle(Sampler):
    """Every query once per epoch in a fresh order, as ``(epoch, index)`` keys.

    The epoch travels with each index, so persistent workers (started once, holding their own
    copy of the dataset) draw the episodes of the right epoch.
    """

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Shuffle for ``epoch`` from now on."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        return iter([(self.epoch, int(i)) for i in order])


class TinyPFENet(nn.Module):
    """A PFENet-shaped toy: CNN features, masked support prototype, priors into the query merge, a base learner.

    The prior channels enter as in PI-CLIP's ``query_merge``: ``cat([query, prototype,
    prior_channels(vtp, vvp)])``, 2 + 2K channels (4 for 1-shot, 12 for 5-shot).
    """

    def __init__(self, shot: int, n_base: int, width: int = 16) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1), nn.ReLU(),
                                      nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU())
        self.query_merge = nn.Sequential(nn.Conv2d(2 * width + 2 + 2 * shot, width, 1), nn.ReLU())
        self.head = nn.Conv2d(width, 2, 1)
        self.base_learner = nn.Conv2d(width, n_base + 1, 1)

    def forward(self, query: torch.Tensor, supports: torch.Tensor, support_labels: torch.Tensor,
                vtp: torch.Tensor, vvp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S), (B, K, 3, S, S), (B, K, S, S), (B, 1, F, F), (B, 2K, F, F) -> (B, 2, S, S), base logits."""
        b, k = supports.shape[:2]
        q = self.backbone(query)
        s = self.backbone(supports.flatten(0, 1))
        mask = F.interpolate((support_labels.flatten(0, 1)[:, None] == 1).float(), size=s.shape[-2:], mode="nearest")
        prototype = ((s * mask).sum((2, 3)) / (mask.sum((2, 3)) + 5e-4)).view(b, k, -1).mean(1)
        size = q.shape[-2:]
        priors = prior_channels(F.interpolate(vtp, size=size, mode="bilinear", align_corners=True),
                                F.interpolate(vvp, size=size, mode="bilinear", align_corners=True))
        merged = self.query_merge(torch.cat([q, prototype[..., None, None].expand_as(q), priors], dim=1))
        out = F.interpolate(self.head(merged), size=query.shape[-2:], mode="bilinear", align_corners=True)
        base = F.interpolate(self.base_learner(q), size=query.shape[-2:], mode="bilinear", align_corners=True)
        return out, base


def train(cache_path: str | Path, data_root: str | Path, *, dataset: str = "pascal5i", fold: int = 0,
          list_root: str | Path | None = None, shot: int = 1, epochs: int = 2, batch_size: int = 4,
          workers: int = 2, start_method: str | None = None, image_size: int = 473, feature_size: int = 60,
          trainer: str = "pi-clip", seed: int = 321, lr: float = 1e-3, max_iters: int | None = None,
          pi_clip_order: bool = False) -> dict[str, Any]:
    """Train :class:`TinyPFENet` for a few epochs; return what happened (losses, episodes seen per epoch).

    Paths may start with ``~``. Every episode the sampler draws is read from the cache: a miss
    raises :class:`clipprior.CacheKeyError` and stops the run.
    """
    torch.manual_seed(seed)
    cache = PriorCache(Path(cache_path).expanduser(), data_root=Path(data_root).expanduser())
    ds = open_dataset(dataset, Path(data_root).expanduser(), fold=fold, split="train",
                      list_root=None if list_root is None else Path(list_root).expanduser())
    episodes = TrainEpisodes(ds, cache, shot, seed, image_size, feature_size, trainer, pi_clip_order)
    model = TinyPFENet(shot, n_base=len(episodes.base_classes))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    criterion = nn.CrossEntropyLoss(ignore_index=255)
    history: dict[str, Any] = {"losses": [], "episodes": [], "mode": episodes.sampler.mode, "queries": len(episodes)}
    order = EpochShuffle(len(episodes), seed)
    loader = DataLoader(episodes, batch_size=batch_size, sampler=order, num_workers=workers, drop_last=True,
                        persistent_workers=workers > 0, multiprocessing_context=start_method if workers else None)
    for epoch in range(epochs):
        order.set_epoch(epoch)  # the workers get (epoch, index) keys: fresh episodes every epoch
        seen = []
        started = time.perf_counter()
        for i, batch in enumerate(loader):
            if max_iters is not None and i >= max_iters:
                break
            out, base = model(batch["query"], batch["supports"], batch["support_labels"], batch["vtp"], batch["vvp"])
            loss = criterion(out, batch["label"]) + criterion(base, batch["label_b"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            history["losses"].append(loss.item())
            seen.extend(batch["key"])
        history["episodes"].append(seen)
        recent = history["losses"][-max(1, len(seen) // batch_size):]
        print(f"epoch {epoch}: {len(seen)} episodes, loss {np.mean(recent):.3f}, "
              f"{time.perf_counter() - started:.1f} s", file=sys.stderr)
    return history


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: train, then print the sampling mode, final loss and episodes per epoch as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", required=True, help="prior cache of the fold's training split")
    parser.add_argument("--data-root", required=True, help="VOC2012 or MSCOCO2014 folder")
    parser.add_argument("--dataset", default="pascal5i")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--list-root", default=None, help="the trainers' lists/<dataset> folder (default: built)")
    parser.add_argument("--shot", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--start-method", choices=["fork", "spawn", "forkserver"], default=None)
    parser.add_argument("--image-size", type=int, default=473)
    parser.add_argument("--feature-size", type=int, default=60)
    parser.add_argument("--trainer", choices=["pi-clip", "pfenet"], default="pi-clip")
    parser.add_argument("--pi-clip-order", action="store_true", help="supports in reverse draw order, as PI-CLIP")
    parser.add_argument("--max-iters", type=int, default=None)
    args = parser.parse_args(argv)
    history = train(args.cache, args.data_root, dataset=args.dataset, fold=args.fold, list_root=args.list_root,
                    shot=args.shot, epochs=args.epochs, batch_size=args.batch_size, workers=args.workers,
                    start_method=args.start_method, image_size=args.image_size, feature_size=args.feature_size,
                    trainer=args.trainer, max_iters=args.max_iters, pi_clip_order=args.pi_clip_order)
    print(json.dumps({"mode": history["mode"], "final_loss": history["losses"][-1],
                      "episodes_per_epoch": [len(e) for e in history["episodes"]]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
