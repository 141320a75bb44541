"""kNN during training, every `eval.knn_every` iterations on small sets (the full kNN after the run is the
`eval knn` command, which `dinolike train` runs when `eval.final_knn` is set)."""

from __future__ import annotations

from functools import lru_cache

from omegaconf import DictConfig
from torch import nn

from dinolike import dist


@lru_cache(maxsize=4)
def _dataset(spec: str, channels: int, limit: int | None):
    from dinolike.data.datasets import build_dataset

    return build_dataset(spec, channels=channels, limit=limit)


def periodic_knn(backbone: nn.Module, cfg: DictConfig, env: dist.DistEnv) -> dict[str, float]:
    """k=20 weighted kNN top-1 (%) of the kept backbone's CLS token; runs on every rank (sharded)."""
    from dinolike.data.normalize import build_eval_transform
    from dinolike.eval.features import extract_features
    from dinolike.eval.knn import knn_eval
    from dinolike.eval.settings import eval_settings

    e, d = cfg.eval, cfg.data
    size = cfg.crops.global_size
    transform = build_eval_transform(size, size, tuple(d.mean), tuple(d.std))
    sets = []
    for spec in (e.knn_train, e.knn_val):
        ds = _dataset(spec, d.channels, e.knn_limit)
        sets.append(
            extract_features(
                backbone, ds, transform, channels=d.channels, mean=tuple(d.mean), std=tuple(d.std),
                resolution=size, resize=size, n_last_blocks=1, batch_size=256, device=env.device,
                progress=False,
            )
        )
    train, val = sets
    res = knn_eval(train.knn_features(), train.labels, val.knn_features(), val.labels,
                   eval_settings("knn", ks=(20,)))
    return {"knn_top1": res["k20_top1"]}
