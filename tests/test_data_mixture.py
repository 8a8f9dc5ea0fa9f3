"""Mixtures: the YAML, weighted draws matching the weights, epoch ends, and realised shares in the stats."""
from __future__ import annotations

import itertools
import random

import pytest

from osum.config import DataConfig, from_dict
from osum.data import mixture
from osum.data.pipeline import build_loader
from osum.data.stats import PipelineStats
from tests.data_fixtures import make_dataset, make_shards, prompt_builder

WEIGHTS = {"big": 0.5, "mid": 0.3, "small": 0.2}


def endless(name: str):
    return lambda n: (f"{name}-{n}-{i}" for i in itertools.count())


def test_draws_match_the_weights():
    stats = PipelineStats()
    drawn = list(mixture.mix({n: endless(n) for n in WEIGHTS}, WEIGHTS, random.Random(0), stats, total=5000))
    assert len(drawn) == 5000 and sum(stats.drawn.values()) == 5000
    for name, w in WEIGHTS.items():
        assert stats.drawn[name] / 5000 == pytest.approx(w, abs=0.02), name
    again = list(mixture.mix({n: endless(n) for n in WEIGHTS}, WEIGHTS, random.Random(0), PipelineStats(), total=5000))
    assert drawn == again


def test_epoch_ends_when_a_dataset_runs_out_or_cycles_with_a_total():
    sizes = {"a": 300, "b": 40}
    streams = {n: (lambda p, n=n: (f"{n}{p}-{i}" for i in range(sizes[n]))) for n in sizes}
    stats = PipelineStats()
    out = list(mixture.mix(streams, {"a": 1, "b": 1}, random.Random(1), stats))
    assert stats.drawn["b"] == 40 and len(out) == len(set(out))  # no repeats; b ran out first
    assert 20 < stats.drawn["a"] < 70
    stats = PipelineStats()
    out = list(mixture.mix(streams, {"a": 1, "b": 1}, random.Random(1), stats, total=400))
    assert len(out) == 400 and stats.drawn["b"] > 150 and "b1-0" in out and "b3-0" in out  # b restarted
    with pytest.raises(ValueError, match="positive weight"):
        list(mixture.mix(streams, {"a": 0, "b": 0}, random.Random(1), stats))


def test_mixture_yaml(tmp_path):
    (tmp_path / "mix.yaml").write_text(
        "train:\n"
        "  libri: {shards: a/shards.list, weight: 2}\n"
        "  emo: {path: /abs/emo, weight: 0.5, task: SER}\n"
        "valid:\n"
        "  dev: {shards: dev.jsonl}\n")
    got = mixture.load_mixture(tmp_path / "mix.yaml")
    assert [(d.name, d.shards, d.weight, d.task) for d in got["train"]] == [
        ("libri", str(tmp_path / "a/shards.list"), 2.0, None), ("emo", "/abs/emo", 0.5, "SER")]
    assert [d.name for d in got["valid"]] == ["dev"]
    data = from_dict(DataConfig, {"mixture": str(tmp_path / "mix.yaml"), "train": [{"name": "x", "shards": "x"}]})
    assert [(d.name, d.task) for d in mixture.datasets(data, "train")] == [("x", None), ("libri", None), ("emo", "asr+ser")]
    (tmp_path / "bad.yaml").write_text("train:\n  a: {shards: x, weigth: 1}\n")
    with pytest.raises(ValueError, match="weigth"):
        mixture.load_mixture(tmp_path / "bad.yaml")
    (tmp_path / "dup.yaml").write_text("train:\n  x: {shards: y}\n")
    with pytest.raises(ValueError, match="listed twice"):
        mixture.datasets(from_dict(DataConfig, {"mixture": str(tmp_path / "dup.yaml"),
                                                "train": [{"name": "x", "shards": "x"}]}), "train")
    with pytest.raises(ValueError, match="top-level keys"):
        (tmp_path / "top.yaml").write_text("libri: {path: x}\n")
        mixture.load_mixture(tmp_path / "top.yaml")


def test_loader_realises_the_configured_proportions(tmp_path):
    """Three datasets, weights 0.5/0.3/0.2, 600 draws: datasets and tasks come out in those shares."""
    sets = {"asr": ("asr",), "ser": ("asr+ser",), "sgc": ("asr+sgc",)}
    paths = {name: make_shards(tmp_path, n=30, tasks=t, per_shard=10, name=name, max_seconds=0.5)
             for name, t in sets.items()}
    (tmp_path / "mix.yaml").write_text("train:\n" + "".join(
        f"  {name}: {{shards: {paths[name]}, weight: {w}}}\n" for name, w in zip(sets, (0.5, 0.3, 0.2))))
    data = from_dict(DataConfig, {"mixture": str(tmp_path / "mix.yaml"), "epoch_samples": 600, "shuffle_buffer": 50,
                                  "max_batch_frames": 6000})
    loader = build_loader(data, "train", prompt_builder(), 80, epoch=0)
    n = sum(len(b["keys"]) for b in loader)
    s = loader.stats
    assert n == s.samples == sum(s.drawn.values()) == 600 and not s.dropped
    shares = s.shares("datasets")
    assert shares == pytest.approx({"asr": 0.5, "ser": 0.3, "sgc": 0.2}, abs=0.05)
    assert s.shares("tasks") == pytest.approx({"asr": 0.5, "asr+ser": 0.3, "asr+sgc": 0.2}, abs=0.05)
    assert "datasets [asr 47.5%, ser 31.2%, sgc 21.3%]" in s.summary()  # logged by the trainer each epoch
    # without epoch_samples the epoch stops when the first dataset (here the one of weight 0.5) runs out
    loader = build_loader(from_dict(DataConfig, {"mixture": str(tmp_path / "mix.yaml")}), "train",
                          prompt_builder(), 80, epoch=0)
    keys = [k for b in loader for k in b["keys"]]
    assert len(keys) == len(set(keys)) and loader.stats.drawn["asr"] == 30


def test_valid_split_reads_each_dataset_once_in_order(tmp_path):
    a = make_dataset(tmp_path, n=5, name="a")
    b = make_dataset(tmp_path, n=4, name="b")
    valid = [{"name": "a", "shards": str(a)}, {"name": "b", "shards": str(b), "weight": 0}]
    data = from_dict(DataConfig, {"valid": valid, "sort_buffer": 0})
    keys = [k for batch in build_loader(data, "valid", prompt_builder(), 80, epoch=3) for k in batch["keys"]]
    assert keys == [f"a-{i:04d}" for i in range(5)] + [f"b-{i:04d}" for i in range(4)]


def test_auto_task_draws_a_task_from_each_samples_labels(tmp_path):
    """The same shards twice, as they are and with `task: auto`: the second copy trains the tasks its labels
    allow (here gender or age), so the task no longer follows the audio."""
    shards = make_shards(tmp_path, n=40, tasks=("asr+sgc+sap",), per_shard=10, max_seconds=0.5)
    (tmp_path / "mix.yaml").write_text(f"train:\n  own: {{shards: {shards}}}\n  relabel: {{shards: {shards}, task: Auto}}\n")
    data = from_dict(DataConfig, {"mixture": str(tmp_path / "mix.yaml"), "epoch_samples": 400, "shuffle_buffer": 50,
                                  "max_batch_frames": 6000})
    assert [d.task for d in mixture.datasets(data, "train")] == [None, "auto"]
    loader = build_loader(data, "train", prompt_builder(), 80, epoch=0)
    assert sum(len(b["keys"]) for b in loader) == 400 and not loader.stats.dropped
    assert loader.stats.shares("tasks") == pytest.approx({"asr+sap+sgc": 0.5, "asr+sgc": 0.25, "asr+sap": 0.25},
                                                         abs=0.07)
