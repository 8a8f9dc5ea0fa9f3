"""Dataset mixtures: which datasets a split reads, and drawing training samples from them by weight.

A mixture YAML (`data.mixture`), like OSUM's data config, maps dataset names to their shards:

    train:
      librispeech: {shards: libri/shards.list, weight: 1.0}
      emotion:     {shards: emo/, weight: 0.5, task: ser}   # task forced on every sample
      relabel:     {shards: libri/shards.list, task: auto}  # a task drawn from each sample's labels
    valid:
      dev: {shards: dev.jsonl}

Relative `shards` are relative to the YAML's folder (`path` is accepted for `shards`, as OSUM names it).

What an epoch is with weighted mixing. Each draw picks dataset i with probability w_i / sum(w), then
takes that dataset's next sample (its shards shuffled for the epoch). With `data.epoch_samples` unset,
the epoch ends at the first draw that finds its dataset used up: no sample repeats within an epoch,
the proportions hold up to the end, and the heavier datasets are only partly seen (a new shuffle next
epoch shows them other parts). With `data.epoch_samples: N`, an epoch is exactly N draws over all ranks
and workers (N / parts each); a dataset that runs out starts again, reshuffled. Each rank and worker
draws from its own disjoint part of every dataset. Validation does not mix: every sample once, in order.
"""
from __future__ import annotations

import dataclasses
import logging
import random
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import yaml

from osum import tasks
from osum.config import DataConfig, DatasetConfig, from_dict
from osum.data.shards import resolve_sources
from osum.data.stats import PipelineStats

T = TypeVar("T")
log = logging.getLogger("osum.data")
SPLITS = ("train", "valid")


def load_mixture(path: str | Path) -> dict[str, list[DatasetConfig]]:
    """Read a mixture YAML into {"train": [...], "valid": [...]}; unknown keys are errors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mixture file {str(path)!r} does not exist")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict) or set(data) - set(SPLITS):
        raise ValueError(f"mixture {str(path)!r}: expected top-level keys {' and/or '.join(SPLITS)}, "
                         f"got {sorted(data) if isinstance(data, dict) else type(data).__name__}")
    out: dict[str, list[DatasetConfig]] = {s: [] for s in SPLITS}
    for split, entries in data.items():
        if not isinstance(entries, dict):
            raise ValueError(f"mixture {str(path)!r}: {split} must map dataset names to settings")
        for name, settings in entries.items():
            settings = dict(settings or {})
            if "path" in settings:
                if "shards" in settings:
                    raise ValueError(f"mixture {str(path)!r}: {split}.{name} gives both path and shards")
                settings["shards"] = settings.pop("path")
            if "name" in settings:
                raise ValueError(f"mixture {str(path)!r}: {split}.{name}: the name is the key, not a setting")
            ds = from_dict(DatasetConfig, {"name": str(name), **settings}, f"{split}.{name}.")
            if ds.shards and not Path(ds.shards).is_absolute():
                ds.shards = str(path.parent / ds.shards)
            out[split].append(ds)
    return out


def datasets(data: DataConfig, split: str) -> list[DatasetConfig]:
    """The datasets of a split: `data.train`/`data.valid` plus those of `data.mixture`, checked."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    found = [dataclasses.replace(ds) for ds in getattr(data, split)]  # canonicalised below, not the caller's
    if data.mixture:
        found += load_mixture(data.mixture)[split]
    seen = set()
    for ds in found:
        where = f"data.{split} dataset {ds.name!r}"
        if not ds.name:
            raise ValueError(f"data.{split}: every dataset needs a name (shards {ds.shards!r})")
        if ds.name in seen:
            raise ValueError(f"{where} is listed twice")
        seen.add(ds.name)
        if not ds.shards:
            raise ValueError(f"{where} has no shards")
        if not ds.weight >= 0:
            raise ValueError(f"{where}: weight must be >= 0, got {ds.weight}")
        if ds.task is not None and ds.task.strip().lower() == tasks.AUTO_TASK:
            ds.task = tasks.AUTO_TASK
        elif ds.task is not None:
            ds.task = str(tasks.parse_spec(ds.task))
    if split == "train" and found and not any(ds.weight > 0 for ds in found):
        raise ValueError("data.train: every dataset has weight 0")
    return found


def resolve(data: DataConfig, split: str) -> list[tuple[DatasetConfig, list[str]]]:
    """Each dataset with its source files; a missing source is an error now rather than mid-epoch."""
    out = []
    for ds in datasets(data, split):
        sources = resolve_sources(ds.shards)
        missing = [s for s in sources if not Path(s).is_file()]
        if missing:
            raise FileNotFoundError(f"data.{split} dataset {ds.name!r}: {len(missing)} of {len(sources)} shards "
                                    f"do not exist, e.g. {missing[0]!r}")
        out.append((ds, sources))
    return out


def mix(streams: dict[str, Callable[[int], Iterator[T]]], weights: dict[str, float], rng: random.Random,
        stats: PipelineStats, total: int | None = None) -> Iterator[T]:
    """Draw from several streams by weight. `streams[name](n)` starts pass n over a dataset.

    total None: stop when a drawn dataset is used up (an epoch without repeats); else stop after `total`
    draws, restarting used-up datasets. See the module docstring.
    """
    names = [n for n in streams if weights.get(n, 0) > 0]
    if not names:
        raise ValueError("mix needs at least one stream with a positive weight")
    probs = [weights[n] for n in names]
    passes = {n: 0 for n in names}
    iters = {n: streams[n](0) for n in names}
    drawn, counts = 0, Counter()
    while total is None or drawn < total:
        name = rng.choices(names, probs)[0]
        try:
            item = next(iters[name])
        except StopIteration:
            if total is None:
                log.info("epoch ends after %d draws: dataset %r is used up (draws: %s)", drawn, name, dict(counts))
                return
            passes[name] += 1
            iters[name] = streams[name](passes[name])
            try:
                item = next(iters[name])
            except StopIteration:
                raise ValueError(f"dataset {name!r} has no samples for this rank/worker; it cannot be cycled "
                                 "(use fewer workers or ranks, or more data)") from None
        stats.drawn[name] += 1
        counts[name] += 1
        drawn += 1
        yield item
