"""The data pipeline: small generator stages from shards to padded batches, and `build_loader`.

    loader = build_loader(cfg.data, "train", model.prompts, n_mels=80, epoch=0, rank=0, world_size=1,
                          layout=AudioLayout.of(model.config))
    for batch in loader:
        model(batch["features"], batch["feature_lens"], batch["prompt_ids"], batch["target_ids"])
    log.info(loader.stats.summary())

Training: shard shuffle -> split by rank/worker -> read -> weighted mixture -> shuffle buffer -> decode
-> resample -> speed perturbation -> duration filter -> targets -> length filters -> noise -> log-mel
-> SpecAugment -> sort buffer -> dynamic batches -> collate. Validation reads every sample once, in
order, without the random stages. Each random stage takes its own RNG derived from (seed, epoch, rank,
worker), so a loader is a pure function of them: a resumed run rebuilds it and skips the batches done.
Every sample a stage drops is counted by reason in `loader.stats` (see osum/data/stats.py).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import soxr
import torch

from osum import tasks
from osum.audio import (
    ADAPTOR_STRIDES,
    MIN_SAMPLES,
    SAMPLE_RATE,
    AudioError,
    adaptor_lengths,
    audio_info,
    encoder_lengths,
    load_audio,
    log_mel_spectrogram,
    num_frames,
)
from osum.config import DataConfig, DatasetConfig
from osum.data import mixture
from osum.data.schema import Sample
from osum.data.shards import iter_records, parse_record
from osum.data.stats import PipelineStats
from osum.data.targets import make_target
from osum.model.prompt import PromptBuilder, PromptIds

__all__ = ["AudioLayout", "Item", "Loader", "PipelineStats", "build_loader"]

log = logging.getLogger("osum.data")
T = TypeVar("T")
NOISE_SUFFIXES = (".wav", ".flac")


@dataclass(frozen=True)
class AudioLayout:
    """How the model turns audio into LLM positions, for the length filters and batch budgets: the adaptor's
    conv strides, and the positions it adds around the audio's own (speech begin and end; the voice summary)."""

    strides: tuple[int, ...] = ADAPTOR_STRIDES
    extra: int = 2

    @classmethod
    def of(cls, model) -> AudioLayout:
        """The layout of a ModelConfig."""
        return cls(tuple(model.adaptor.conv_strides), 2 + (1 if model.adaptor.summary_layers else 0))

    def audio_positions(self, samples: int) -> int:
        return int(adaptor_lengths(encoder_lengths(num_frames(samples)), self.strides))


@dataclass
class Item:
    """A sample on its way through the pipeline; stages fill the fields in order."""

    sample: Sample
    dataset: str  # the mixture's name for the dataset it came from
    wav: np.ndarray | None = None  # float32 mono
    sample_rate: int = 0
    features: torch.Tensor | None = None  # (T, n_mels)
    spec: str | None = None  # canonical task spec it is trained on
    prompt: str | None = None
    target: str | None = None
    prompt_ids: PromptIds | None = None
    target_ids: list[int] | None = None  # target tokens + end token
    transcript_ids: list[int] | None = None  # tokens of what is said (empty when unknown), for the CTC loss
    layout: AudioLayout = AudioLayout()

    @property
    def seconds(self) -> float:
        return len(self.wav) / self.sample_rate

    @property
    def frames(self) -> int:
        return self.features.shape[0] if self.features is not None else int(num_frames(len(self.wav)))

    @property
    def audio_positions(self) -> int:
        """LLM positions of the audio (12.5 per second at 16 kHz with the default strides)."""
        return self.layout.audio_positions(len(self.wav))

    @property
    def sequence_length(self) -> int:
        """prompt + speech-begin (+ summary) + audio + speech-end + target + end: what the LLM sees."""
        prompt = len(self.prompt_ids.prefix) + len(self.prompt_ids.suffix)
        return prompt + self.layout.extra + self.audio_positions + len(self.target_ids)


def derive_rng(*parts: Any) -> random.Random:
    """An RNG that depends only on `parts` (str seeding hashes with SHA-512: same in every process)."""
    return random.Random(":".join(str(p) for p in ("osum-data", *parts)))


# ---------------------------------------------------------------------------------------------------
# Sources, splitting and reading


def shuffle_shards(sources: list[str], rng: random.Random) -> list[str]:
    """The sources in a random order (the same on every rank: seed it without the rank)."""
    out = list(sources)
    rng.shuffle(out)
    return out


def split_by_part(items: Iterable[T], part: int, num_parts: int) -> Iterator[T]:
    """Every num_parts-th item starting at `part`: parts 0..num_parts-1 are disjoint and cover all."""
    if not 0 <= part < num_parts:
        raise ValueError(f"part {part} is not in [0, {num_parts})")
    for i, item in enumerate(items):
        if i % num_parts == part:
            yield item


def read_dataset(sources: list[str], part: int, num_parts: int, stats: PipelineStats, name: str,
                 task: str | None = None) -> Iterator[Item]:
    """The samples of one dataset that belong to `part` (rank x worker), as Items.

    With at least as many sources as parts, each part reads whole sources (shards); with fewer, every
    part reads all sources and keeps every num_parts-th record, so no part is left empty.
    """
    by_shard = len(sources) >= num_parts
    mine = sources[part::num_parts] if by_shard else sources
    # shard-level problems are counted once, by the part that owns the shard (or part 0 when all read all)
    source_stats = stats if by_shard or part == 0 else PipelineStats()
    records = (r for path in mine for r in iter_records(path, source_stats))
    if not by_shard:
        records = split_by_part(records, part, num_parts)
    for record in records:
        sample = parse_record(record, stats)
        if sample is not None:
            if task is not None:
                sample.task = None if task == tasks.AUTO_TASK else task
            yield Item(sample, name)


# ---------------------------------------------------------------------------------------------------
# Sample stages


def shuffle_buffer(items: Iterable[T], rng: random.Random, size: int) -> Iterator[T]:
    """Local shuffle: keep `size` items, emit a random one as each new one arrives."""
    if size <= 1:
        yield from items
        return
    buf: list[T] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        i = rng.randrange(size)
        yield buf[i]
        buf[i] = item
    rng.shuffle(buf)
    yield from buf


def with_layout(items: Iterable[Item], layout: AudioLayout) -> Iterator[Item]:
    """Each item measures its LLM sequence by the model's layout (strides, added positions)."""
    for item in items:
        item.layout = layout
        yield item


def decode(items: Iterable[Item], stats: PipelineStats) -> Iterator[Item]:
    """Audio path or bytes -> float32 mono at its own rate; missing or unreadable audio is counted."""
    for item in items:
        src = item.sample.audio
        if src is None:
            stats.drop("audio_missing", item.sample.key, "the sample has no audio")
            continue
        if isinstance(src, str) and not os.path.exists(src):
            stats.drop("audio_missing", item.sample.key, f"{src!r} does not exist")
            continue
        try:
            rate = audio_info(src).sample_rate
            item.wav = load_audio(src, sr=rate)
        except AudioError as e:
            stats.drop("audio_unreadable", item.sample.key, str(e))
            continue
        item.sample_rate = rate
        item.sample.audio = None  # the encoded bytes are not needed any more
        yield item


def resample(items: Iterable[Item], sample_rate: int = SAMPLE_RATE) -> Iterator[Item]:
    for item in items:
        if item.sample_rate != sample_rate:
            item.wav = soxr.resample(item.wav, item.sample_rate, sample_rate, quality="HQ").astype(np.float32)
            item.sample_rate = sample_rate
        yield item


def speed_perturb(items: Iterable[Item], rng: random.Random, speeds: list[float]) -> Iterator[Item]:
    """Play each sample at a random speed from `speeds` by resampling (tempo and pitch change together,
    like sox `speed`); word spans are rescaled with it."""
    for item in items:
        speed = rng.choice(speeds)
        if speed != 1.0:
            # reading the samples as if recorded at sr * speed, written back at sr: len / speed samples
            item.wav = soxr.resample(item.wav, item.sample_rate * speed, item.sample_rate).astype(np.float32)
            if item.sample.words:
                words = [tasks.Word(w.word, w.start / speed, w.end / speed) for w in item.sample.words]
                item.sample = dataclasses.replace(item.sample, words=words)
        yield item


def filter_duration(items: Iterable[Item], stats: PipelineStats, min_seconds: float,
                    max_seconds: float) -> Iterator[Item]:
    """Drop audio shorter than min_seconds (or than the STFT needs) or longer than max_seconds."""
    for item in items:
        seconds = item.seconds
        if len(item.wav) < MIN_SAMPLES or seconds < min_seconds:
            stats.drop("too_short", item.sample.key, f"{seconds:.3f} s < {min_seconds} s")
        elif seconds > max_seconds:
            stats.drop("too_long", item.sample.key, f"{seconds:.2f} s > {max_seconds} s")
        else:
            yield item


def add_targets(items: Iterable[Item], rng: random.Random, prompts: PromptBuilder, stats: PipelineStats,
                data: DataConfig, modes: bool = True) -> Iterator[Item]:
    """Choose each sample's task, prompt and target (osum/data/targets.py) and tokenize them.

    modes=False (validation) keeps the requested tasks: no only-X or combined mode.
    """
    only_x, combined = (data.only_x_share, data.combined_share) if modes else (0.0, 0.0)
    for item in items:
        target = make_target(item.sample, rng, stats, only_x, combined, data.prompt_lang, data.time_resolution)
        if target is None:
            continue
        item.spec, item.prompt, item.target = str(target.spec), target.prompt, target.text
        item.prompt_ids = prompts.prompt_ids(target.prompt)
        item.target_ids = prompts.target_ids(target.text)
        item.transcript_ids = prompts.encode(item.sample.text) if item.sample.text else []
        yield item


def filter_lengths(items: Iterable[Item], stats: PipelineStats, max_target_tokens: int,
                   max_sequence_length: int) -> Iterator[Item]:
    """Drop samples whose target, or whole LLM sequence, is longer than allowed."""
    for item in items:
        if len(item.target_ids) > max_target_tokens:
            stats.drop("target_too_long", item.sample.key, f"{len(item.target_ids)} > {max_target_tokens} tokens")
        elif item.sequence_length > max_sequence_length:
            stats.drop("sequence_too_long", item.sample.key,
                       f"{item.sequence_length} > {max_sequence_length} positions")
        else:
            yield item


class NoiseBank:
    """The noise recordings of a folder (wav/flac, any depth), decoded at 16 kHz on first use."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"data.noise_dir {str(folder)!r} is not a directory")
        self.files = sorted(p for p in self.folder.rglob("*") if p.suffix.lower() in NOISE_SUFFIXES)
        if not self.files:
            raise ValueError(f"data.noise_dir {str(folder)!r} has no {'/'.join(NOISE_SUFFIXES)} files")
        self._cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> np.ndarray:
        if i not in self._cache:
            self._cache[i] = load_audio(self.files[i], SAMPLE_RATE)  # an unreadable noise file is an error
        return self._cache[i]


def add_noise(items: Iterable[Item], rng: random.Random, noise: NoiseBank, prob: float,
              snr_db: tuple[float, float] | list[float]) -> Iterator[Item]:
    """With probability `prob`, add a random stretch of a random noise file at an SNR uniform in snr_db."""
    for item in items:
        if rng.random() >= prob:
            yield item
            continue
        clip = noise[rng.randrange(len(noise))]
        n = len(item.wav)
        if len(clip) < n:
            clip = np.tile(clip, math.ceil(n / len(clip)))
        start = rng.randrange(len(clip) - n + 1)
        snr = rng.uniform(snr_db[0], snr_db[1])
        segment = clip[start:start + n]
        p_speech, p_noise = float(np.mean(item.wav ** 2)), float(np.mean(segment ** 2))
        if p_speech > 0 and p_noise > 0:  # silence on either side: nothing to scale against
            scale = math.sqrt(p_speech / (p_noise * 10 ** (snr / 10)))
            item.wav = (item.wav + scale * segment).astype(np.float32)
        yield item


def compute_features(items: Iterable[Item], n_mels: int) -> Iterator[Item]:
    """Whisper log-mel of each waveform, stored (T, n_mels); the waveform is kept for its length."""
    for item in items:
        item.features = log_mel_spectrogram(item.wav, n_mels).T.contiguous()
        yield item


def spec_augment(items: Iterable[Item], rng: random.Random, freq_masks: int, freq_mask_width: int,
                 time_masks: int, time_mask_width: int) -> Iterator[Item]:
    """SpecAugment masks on the log-mel: bands of up to freq_mask_width bins and time_mask_width frames
    set to zero (the normalised log-mel of near silence)."""
    for item in items:
        x = item.features.clone()
        frames, bins = x.shape
        for _ in range(freq_masks):
            width = rng.randint(0, min(freq_mask_width, bins))
            start = rng.randint(0, bins - width)
            x[:, start:start + width] = 0.0
        for _ in range(time_masks):
            width = rng.randint(0, min(time_mask_width, frames))
            start = rng.randint(0, frames - width)
            x[start:start + width, :] = 0.0
        item.features = x
        yield item


def sort_buffer(items: Iterable[Item], size: int) -> Iterator[Item]:
    """Sort each run of `size` items by length, so that batches hold similar lengths (less padding).

    The key is the LLM sequence length first (the LLM is most of the compute, and a long target, e.g. word
    timestamps, pads a whole batch of short ones), then the mel frames."""
    if size <= 1:
        yield from items
        return

    def key(x: Item) -> tuple[int, int]:
        return (x.sequence_length, x.frames)

    buf: list[Item] = []
    for item in items:
        buf.append(item)
        if len(buf) >= size:
            buf.sort(key=key)
            yield from buf
            buf = []
    buf.sort(key=key)
    yield from buf


def dynamic_batches(items: Iterable[Item], max_frames: int, max_tokens: int,
                    max_batch_size: int) -> Iterator[list[Item]]:
    """Group consecutive items while batch size x longest frames <= max_frames, batch size x longest
    sequence <= max_tokens and batch size <= max_batch_size (padded cost, not the sum of lengths)."""
    batch: list[Item] = []
    longest_frames = longest_seq = 0
    for item in items:
        frames, seq = item.frames, item.sequence_length
        n = len(batch) + 1
        f, s = max(longest_frames, frames), max(longest_seq, seq)
        if batch and (n > max_batch_size or n * f > max_frames or n * s > max_tokens):
            yield batch
            batch, f, s = [], frames, seq
        batch.append(item)
        longest_frames, longest_seq = f, s
    if batch:
        yield batch


def collate(batch: list[Item]) -> dict[str, Any]:
    """The trainer's batch: zero-padded features (B, T, n_mels), lengths, prompt and target ids."""
    feats = [item.features for item in batch]
    features = torch.nn.utils.rnn.pad_sequence(feats, batch_first=True, padding_value=0.0)  # (B, T, n_mels)
    return {
        "keys": [item.sample.key for item in batch],
        "features": features,
        "feature_lens": torch.tensor([f.shape[0] for f in feats], dtype=torch.long),  # (B,)
        "prompt_ids": [item.prompt_ids for item in batch],
        "target_ids": [item.target_ids for item in batch],
        "transcript_ids": [item.transcript_ids for item in batch],
        "tasks": [item.spec for item in batch],
        "labels": [item.sample.labels() for item in batch],  # every tag field a sample has, whatever its task
        "audio_seconds": float(sum(item.seconds for item in batch)),
        "num_target_tokens": int(sum(len(item.target_ids) for item in batch)),
    }


# ---------------------------------------------------------------------------------------------------
# The whole chain


def iterate(data: DataConfig, split: str, sets: list[tuple[DatasetConfig, list[str]]], prompts: PromptBuilder,
            n_mels: int, epoch: int, part: int, num_parts: int, stats: PipelineStats,
            noise: NoiseBank | None = None, layout: AudioLayout = AudioLayout()) -> Iterator[dict[str, Any]]:
    """Batches of one part (rank x worker) of one epoch of a split."""
    train = split == "train"
    # Validation is the same set every epoch: its RNGs (task inference, prompts) ignore the epoch.
    scope = (data.seed, split, epoch if train else "-", f"{part}/{num_parts}")

    def rng(stage: str) -> random.Random:
        return derive_rng(*scope, stage)

    if train:
        streams = {}
        for ds, sources in sets:
            if ds.weight > 0:
                def stream(n: int, ds: DatasetConfig = ds, sources: list[str] = sources) -> Iterator[Item]:
                    order = shuffle_shards(sources, derive_rng(data.seed, split, epoch, ds.name, n, "shards"))
                    return read_dataset(order, part, num_parts, stats, ds.name, ds.task)
                streams[ds.name] = stream
        total = None
        if data.epoch_samples is not None:
            total = data.epoch_samples // num_parts + (part < data.epoch_samples % num_parts)
        weights = {ds.name: ds.weight for ds, _ in sets}
        items: Iterator[Item] = mixture.mix(streams, weights, rng("mix"), stats, total)
        items = shuffle_buffer(items, rng("shuffle"), data.shuffle_buffer)
    else:
        items = (it for ds, sources in sets for it in _counted(read_dataset(sources, part, num_parts, stats, ds.name,
                                                                            ds.task), stats))
    items = decode(items, stats)
    items = with_layout(items, layout)
    items = resample(items, SAMPLE_RATE)
    if train and data.speed_perturb:
        items = speed_perturb(items, rng("speed"), data.speed_perturb)
    items = filter_duration(items, stats, data.min_seconds, data.max_seconds)
    items = add_targets(items, rng("targets"), prompts, stats, data, modes=train)
    items = filter_lengths(items, stats, data.max_target_tokens, data.max_sequence_length)
    if train and noise is not None:
        items = add_noise(items, rng("noise"), noise, data.noise_prob, data.noise_snr_db)
    items = compute_features(items, n_mels)
    if train and data.spec_augment:
        items = spec_augment(items, rng("specaug"), data.freq_masks, data.freq_mask_width, data.time_masks,
                             data.time_mask_width)
    items = sort_buffer(items, data.sort_buffer)
    for batch in dynamic_batches(items, data.max_batch_frames, data.max_batch_tokens, data.max_batch_size):
        out = collate(batch)
        stats.samples += len(batch)
        stats.batches += 1
        stats.audio_seconds += out["audio_seconds"]
        stats.target_tokens += out["num_target_tokens"]
        stats.tasks.update(out["tasks"])
        stats.datasets.update(item.dataset for item in batch)
        yield out


def _counted(items: Iterable[Item], stats: PipelineStats) -> Iterator[Item]:
    for item in items:
        stats.drawn[item.dataset] += 1
        yield item


class _Stream(torch.utils.data.IterableDataset):
    """One epoch of one rank; inside a DataLoader worker it takes the worker's part. Yields
    (batch or None, stats since the previous yield) so the main process can add up the counters."""

    def __init__(self, loader: Loader):
        super().__init__()
        self.loader = loader

    def __iter__(self) -> Iterator[tuple[dict[str, Any] | None, PipelineStats]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        ld = self.loader
        part, num_parts = ld.rank * workers + worker, ld.world_size * workers
        stats = PipelineStats()
        for batch in iterate(ld.data, ld.split, ld.sets, ld.prompts, ld.n_mels, ld.epoch, part, num_parts, stats,
                             ld.noise, ld.layout):
            yield batch, stats.take()
        yield None, stats.take()


def _as_is(x: Any) -> Any:
    return x


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # workers compute log-mels one at a time; threads would oversubscribe the cores


class Loader:
    """Batches of one epoch of one rank; iterate it (again) for the same batches. `.stats` counts the
    samples seen so far in the current iteration."""

    def __init__(self, data: DataConfig, split: str, prompts: PromptBuilder, n_mels: int, epoch: int,
                 rank: int = 0, world_size: int = 1, layout: AudioLayout = AudioLayout()):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size {world_size})")
        self.data, self.split, self.prompts, self.n_mels = data, split, prompts, n_mels
        self.epoch, self.rank, self.world_size, self.layout = epoch, rank, world_size, layout
        self.sets = mixture.resolve(data, split)
        if not self.sets:
            raise ValueError(f"data.{split} lists no datasets (set data.{split} or data.mixture)")
        self.noise = NoiseBank(data.noise_dir) if split == "train" and data.noise_dir else None
        self.stats = PipelineStats()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.stats.reset()
        stream = _Stream(self)
        if self.data.num_workers == 0:
            parts: Iterable = stream
        else:
            parts = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=self.data.num_workers,
                                                collate_fn=_as_is, worker_init_fn=_worker_init)
        for batch, delta in parts:
            self.stats.merge(delta)
            if batch is not None:
                yield batch


def build_loader(data: DataConfig, split: str, prompts: PromptBuilder, n_mels: int, epoch: int,
                 rank: int = 0, world_size: int = 1, layout: AudioLayout = AudioLayout()) -> Loader:
    """The trainer's data: `split` "train" (mixture, augmentation, shuffling) or "valid" (each sample once).

    Deterministic in (data.seed, epoch, rank, world_size): iterating twice gives identical batches, and
    the ranks read disjoint samples. `layout` is the model's (AudioLayout.of): the length filter
    (data.max_sequence_length) and the batches' token budget count the positions the model really makes.
    """
    return Loader(data, split, prompts, n_mels, epoch, rank, world_size, layout)
