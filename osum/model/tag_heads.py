"""Fitting the voice summary's tag heads: a regularised linear classifier per tag field over the summary's pooled
statistics of the frozen encoder (VoiceSummary.heads), fitted on labelled utterances after training.

`osum export --fit-tag-heads event=LIST.jsonl` uses it. The fit is multinomial logistic regression with an L2
penalty on standardised statistics, solved by L-BFGS; the standardisation is folded into the stored weights, so
the head is one plain linear layer. It reports its training accuracy and a cross-validated one: with
`group_by`, every utterance that shares a group (an event clip, a speaker) is held out together, which is what
an unseen voice or clip will meet.

A short sound inside speech (a vocal event) is a few frames of the utterance. `osum export --locate-tag-head
event` first fits a frame locator, a logistic scorer over one block's normalised frames, on the sound spans that
`osum synth` records (`extra.event.span`), and the event head then reads statistics pooled with its
probabilities as frame weights; with `--locator-crop W`, only the frames within W of its peak, every later block
run again on them (SpeechLLM.located_stats). A head over so few sources can be fitted with dropout instead
(`--tag-head-dropout event=P`): AdamW on the standardised statistics with a share P of them dropped at random
at each step and a fixed, short schedule, which regularises by noise and early stopping where the L2 penalty alone
lets the head fit each recording's quirks.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from osum import audio as A
from osum import tasks


@dataclass
class HeadFit:
    """What a fit found: the head (weight (C, D), bias (C,)) and how well it separates the rows."""

    field: str
    weight: torch.Tensor
    bias: torch.Tensor
    rows: int
    train_accuracy: float
    cv_accuracy: float | None  # None when the rows fall into fewer than two folds
    cv_groups: str  # what a fold holds out together
    skipped: dict[str, int]


# The dropout fit's schedule (fit_linear with dropout > 0): epochs, batch, peak learning rate, warm-up steps and
# AdamW's weight decay. On osum-tiny's event head, dropout 0.3 and 0.5 held out 1.2 points apart, within fold
# noise (model card, recipes/osum-tiny/event_readers.py).
DROPOUT_FIT = {"epochs": 15, "batch": 32, "lr": 1e-3, "warmup": 20, "weight_decay": 0.05}


def fit_linear(x: torch.Tensor, y: torch.Tensor, n_classes: int, reg: float = 1e-2,
               max_iter: int = 300, dropout: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-penalised multinomial logistic regression on (N, D) features `x`, labels `y` in [0, n_classes).
    The features are standardised first (so `reg` means the same for every field and encoder); the returned
    (C, D) weight and (C,) bias apply to the raw features. `dropout` > 0: fitted instead by AdamW with that
    share of the standardised features dropped at each step (DROPOUT_FIT; `reg` unused), from a fixed seed, so
    the same rows give the same head."""
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"fit_linear needs as many labels as rows, at least one: got {x.shape[0]} and {y.shape[0]}")
    if not 0 <= dropout < 1:
        raise ValueError(f"fit_linear dropout {dropout}: a share of the features, 0 (none) up to below 1")
    # Callers may hold features made under torch.inference_mode: the fit needs autograd on copies of them.
    with torch.inference_mode(False), torch.enable_grad():
        if dropout > 0:
            return _fit_dropout(x.clone().float(), y.clone(), n_classes, dropout)
        return _fit(x.clone().double(), y.clone(), n_classes, reg, max_iter)


def _standardise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.mean(0), x.std(0, unbiased=False).clamp(min=1e-6)


def _fit_dropout(x: torch.Tensor, y: torch.Tensor, n_classes: int, dropout: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    mean, scale = _standardise(x)
    z = (x - mean) / scale
    rng = torch.Generator().manual_seed(0)  # its own stream: the caller's random state is left as it was
    w = torch.zeros(x.shape[1], n_classes, requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    fit = DROPOUT_FIT
    steps = fit["epochs"] * -(-len(y) // fit["batch"])
    opt = torch.optim.AdamW([w, b], lr=fit["lr"], weight_decay=fit["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / fit["warmup"]) * max(0.0, 1 - s / steps))
    for _ in range(fit["epochs"]):
        order = torch.randperm(len(y), generator=rng)
        for first in range(0, len(y), fit["batch"]):
            idx = order[first:first + fit["batch"]]
            keep = (torch.rand(len(idx), z.shape[1], generator=rng) >= dropout).float() / (1 - dropout)
            loss = F.cross_entropy((z[idx] * keep) @ w + b, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    weight = (w.detach() / scale[:, None]).T  # as _fit's
    return weight, b.detach() - (mean / scale) @ w.detach()


def _fit(x: torch.Tensor, y: torch.Tensor, n_classes: int, reg: float, max_iter: int
         ) -> tuple[torch.Tensor, torch.Tensor]:
    mean, scale = _standardise(x)
    z = (x - mean) / scale
    w = torch.zeros(x.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z @ w + b, y) + reg * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    weight = (w.detach() / scale[:, None]).T  # (C, D): z @ w == x @ (w / scale) - (mean / scale) @ w
    bias = b.detach() - (mean / scale) @ w.detach()
    return weight.float(), bias.float()


def fold_of(group: str, folds: int) -> int:
    """The cross-validation fold of a group: a hash of its name, so a group's fold is the same in every run."""
    return int(hashlib.sha256(group.encode("utf-8")).hexdigest(), 16) % folds


def _lookup(row: dict, dotted: str) -> str | None:
    value = row
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return str(value)


def cross_validate(x: torch.Tensor, y: torch.Tensor, groups: Sequence[str], n_classes: int, reg: float = 1e-2,
                   folds: int = 5, scored: torch.Tensor | None = None, dropout: float = 0.0) -> float | None:
    """Accuracy on each fold of a fit (`fit_linear`) on the others, every group in one fold (by a hash of its
    name). `scored` (a bool mask over the rows): only those rows are scored; the others are fitted on in every
    fold they are not in, e.g. added data whose effect on the original rows is the question."""
    fold = torch.tensor([fold_of(g, folds) for g in groups])
    if len(set(fold.tolist())) < 2:
        return None
    scored = torch.ones(len(y), dtype=torch.bool) if scored is None else scored
    right = 0
    for k in sorted(set(fold.tolist())):
        held = fold == k
        weight, bias = fit_linear(x[~held], y[~held], n_classes, reg, dropout=dropout)
        held = held & scored
        right += int(((x[held] @ weight.T + bias).argmax(-1) == y[held]).sum())
    return right / int(scored.sum())


def encoder_batches(model, rows: Sequence[dict], batch_size: int, window: int
                    ) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """(row indices, padded log-mels, lengths) of the rows whose audio fits one encoder pass, read `window` rows
    at a time and batched by length within it, so memory does not grow with the list."""
    for first in range(0, len(rows), window):
        mels = {i: A.log_mel_spectrogram(A.load_audio(rows[i]["audio"]), n_mels=model.config.audio.n_mels).T
                for i in range(first, min(first + window, len(rows)))}
        fits = sorted((i for i, m in mels.items() if m.shape[0] <= model.encoder.max_frames),
                      key=lambda i: mels[i].shape[0])  # similar lengths together: less padding
        for start in range(0, len(fits), batch_size):
            index = fits[start:start + batch_size]
            lens = torch.tensor([mels[i].shape[0] for i in index])
            padded = nn.utils.rnn.pad_sequence([mels[i] for i in index], batch_first=True)
            yield index, padded.to(model.device), lens.to(model.device)


@torch.no_grad()
def pooled_stats(model, rows: Sequence[dict], batch_size: int = 8, window: int = 256,
                 located: bool = False) -> list[torch.Tensor | None]:
    """Each row's voice-summary statistics (`SpeechLLM.summary_stats`; `located`: the located head's, pooled with
    the frame locator's weights, over a crop with `adaptor.locator_crop`); None for audio longer than the
    encoder's window (the summary of a longer input is not one pass)."""
    out: list[torch.Tensor | None] = [None] * len(rows)
    for index, padded, lens in encoder_batches(model, rows, batch_size, window):
        for i, row in zip(index, model.summary_stats(padded, lens, located=located).cpu()):
            out[i] = row
    return out


@dataclass
class LocatorFit:
    """What a frame locator's fit found: how many rows and frames it read, and how well it finds the sound."""

    field: str
    layer: int
    rows: int
    inside: int  # frames inside the spans (the positives)
    outside: int  # frames outside them (the negatives: twice as many from each row, where it has them)
    top_in_span: float  # share of the rows whose highest-scoring frame lies inside the sound's span
    skipped: dict[str, int]


def _span_of(row: dict, field: str) -> tuple[float, float] | None:
    """The row's `extra.<field>.span` in seconds, when it is two numbers with 0 <= start < end."""
    info = (row.get("extra") or {}).get(field)
    span = info.get("span") if isinstance(info, dict) else None
    if (isinstance(span, (list, tuple)) and len(span) == 2 and all(isinstance(t, (int, float)) for t in span)
            and 0 <= span[0] < span[1]):
        return span[0], span[1]
    return None


def _span_frames(span: tuple[float, float], frames: int) -> tuple[int, int] | None:
    """A span in seconds → encoder frames [first, last) within `frames`, at least one; None when it starts past
    the audio."""
    first = int(span[0] * A.ENCODER_FRAMES_PER_SECOND)
    if first >= frames:
        return None
    return first, min(frames, max(first + 1, round(span[1] * A.ENCODER_FRAMES_PER_SECOND)))


@torch.no_grad()
def fit_locator(model, field: str, rows: Sequence[dict], layer: int | None = None, reg: float = 1e-2) -> LocatorFit:
    """Fit the voice summary's frame locator on block `layer` (one of `adaptor.summary_layers`; default the middle
    one) from rows that give
    the span (seconds) of `field`'s sound as `extra.<field>.span` (osum synth writes it for inserted events), and
    install it in `model` with `config.adaptor.located_head` = `field`: that field's head then reads statistics
    pooled where the locator hears the sound. A head fitted before reads them too, so fit it again after this
    (`fit_model_head`), as `osum export --locate-tag-head` does. Every frame inside a span is a positive; twice as
    many frames outside it, drawn by a generator seeded from the row's key, are negatives, so the fit is the same
    on every run. Rows without a usable span, with a span outside the audio or longer than one encoder pass are
    counted by reason."""
    if model.summary is None:
        raise ValueError("a frame locator weights the voice summary's frames: the model has none "
                         "(model.adaptor.summary_layers)")
    if field not in tasks.TAG_FIELDS:
        raise ValueError(f"frame locator for {field!r}: not a tag field ({', '.join(tasks.TAG_FIELDS)})")
    if layer is None:
        layer = model.summary.layers[len(model.summary.layers) // 2]
    if layer not in model.summary.layers:
        raise ValueError(f"frame locator on block {layer}: the summary pools blocks {model.summary.layers} only")
    skipped = {f"no usable extra.{field}.span": 0, "span outside the audio": 0, "longer than one encoder pass": 0}
    spanned = []
    for row in rows:
        if _span_of(row, field) is None:
            skipped[f"no usable extra.{field}.span"] += 1
        else:
            spanned.append(row)
    xs, ys, kept, read = [], [], [], set()  # kept: each used row's frames and span, to score once fitted
    block = model.summary.layers.index(layer)
    for index, padded, lens in encoder_batches(model, spanned, batch_size=8, window=256):
        _, encoder_lens, hidden = model.encoder.forward_layers(padded, lens, model.summary.layers)
        h = F.layer_norm(hidden[block].float(), hidden[block].shape[-1:]).cpu()  # as VoiceSummary.frame_weights
        for i, frames, n in zip(index, h, encoder_lens.tolist()):
            read.add(i)
            row = spanned[i]
            span = _span_frames(_span_of(row, field), n)
            if span is None:
                skipped["span outside the audio"] += 1
                continue
            inside = torch.zeros(n, dtype=torch.bool)
            inside[span[0]:span[1]] = True
            seed = int(hashlib.sha256(str(row.get("key", i)).encode("utf-8")).hexdigest(), 16) % 2 ** 63
            outside = (~inside).nonzero()[:, 0]
            outside = outside[torch.randperm(len(outside), generator=torch.Generator().manual_seed(seed))]
            outside = outside[:2 * int(inside.sum())]
            xs += [frames[:n][inside], frames[outside]]
            ys += [torch.ones(int(inside.sum()), dtype=torch.long), torch.zeros(len(outside), dtype=torch.long)]
            kept.append((frames[:n], span))
    skipped["longer than one encoder pass"] = len(spanned) - len(read)
    if not kept:
        raise ValueError(f"frame locator for {field!r}: none of the {len(rows)} rows has a usable "
                         f"extra.{field}.span within one encoder pass")
    weight, bias = fit_linear(torch.cat(xs), torch.cat(ys), 2, reg)
    weight, bias = weight[1:] - weight[:1], bias[1:] - bias[:1]  # the sound's logit against the rest's
    install_locator(model, field, layer, weight, bias)
    top_hits = sum(first <= int((frames @ weight.T)[:, 0].argmax()) < last for frames, (first, last) in kept)
    inside = int(sum(int(y.sum()) for y in ys))
    return LocatorFit(field, layer, len(kept), inside, sum(len(y) for y in ys) - inside, top_hits / len(kept),
                      {k: v for k, v in skipped.items() if v})


def install_locator(model, field: str, layer: int, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Put a (1, D_enc) frame scorer on block `layer` into the model's voice summary, for `field`'s head."""
    summary = model.summary
    dim = model.config.encoder.d_model
    if tuple(weight.shape) != (1, dim) or tuple(bias.shape) != (1,):
        raise ValueError(f"a frame locator must be (1, {dim}) + (1,), got {tuple(weight.shape)} + {tuple(bias.shape)}")
    locator = nn.Linear(dim, 1, device=summary.proj.weight.device)  # float32: checkpoint._keep_fp32
    with torch.no_grad():
        locator.weight.copy_(weight)
        locator.bias.copy_(bias)
    locator.requires_grad_(False)
    if summary.located not in (None, field) and summary.located in summary.heads:
        raise ValueError(f"a frame locator for {field!r}: the {summary.located} head reads this model's located "
                         f"statistics; fit the locator for {summary.located} again, or export from a model without "
                         "one")
    summary.locator, summary.locator_layer, summary.located = locator, layer, field
    model.config.adaptor.located_head, model.config.adaptor.locator_layer = field, layer
    _sync_located_dim(model)


def _sync_located_dim(model) -> None:
    """The located head's width as the config now says: a crop's statistics start at the locator's block."""
    crop, summary = model.config.adaptor.locator_crop, model.summary
    summary.located_dim = summary.stats_dim if crop is None else model.crop_stats_dim(summary.locator_layer)


def set_locator_crop(model, crop: int | None) -> None:
    """Let the located head read a crop of `crop` frames each side of the locator's peak (None: the whole
    utterance; SpeechLLM.located_stats). A head fitted before reads other statistics: fit it again after this."""
    summary = model.summary
    if summary is None or summary.locator is None:
        raise ValueError("a locator crop needs a fitted frame locator (fit_locator)")
    if crop is not None and (isinstance(crop, bool) or not isinstance(crop, int) or crop < 1):
        raise ValueError(f"locator crop {crop!r}: frames each side of the locator's peak, a positive integer")
    model.config.adaptor.locator_crop = crop
    _sync_located_dim(model)


def fit_model_head(model, field: str, rows: Sequence[dict], reg: float = 1e-2, group_by: str | None = None,
                   folds: int = 5, dropout: float = 0.0) -> HeadFit:
    """Fit `field`'s head on labelled rows (an `audio` path and the field's label) and install it in `model`
    (its summary's heads and `config.adaptor.tag_heads`); the located field (`fit_locator`) reads statistics
    pooled with its locator's weights (`SpeechLLM.located_stats`). `reg` and `dropout`: `fit_linear`'s. Rows
    without a label of the field's vocabulary, or with audio longer than one encoder pass, are counted by reason
    and left out."""
    if model.summary is None:
        raise ValueError("tag heads read the voice summary's statistics: the model has none "
                         "(model.adaptor.summary_layers)")
    if field not in tasks.TAG_FIELDS:
        raise ValueError(f"tag head for {field!r}: not a tag field ({', '.join(tasks.TAG_FIELDS)})")
    vocab = tasks.LABELS[field]
    skipped = {f"no {field} label": 0, f"{field} label not in the vocabulary": 0,
               "longer than one encoder pass": 0}
    labelled = []
    for row in rows:
        if not row.get(field):
            skipped[f"no {field} label"] += 1
        elif row[field] not in vocab:
            skipped[f"{field} label not in the vocabulary"] += 1
        else:
            labelled.append(row)
    missing = sum(_lookup(row, group_by) is None for row in labelled) if group_by else 0
    if missing:  # held out alone, they would make the printed estimate better than the grouping says it is
        raise ValueError(f"tag head for {field!r}: {missing} of {len(labelled)} labelled rows have no {group_by} to "
                         "group their cross-validation by (a corpus osum synth built before it wrote that key? "
                         "build it again, or name another key)")
    kept, xs = [], []
    located = field == model.config.adaptor.located_head and model.summary.locator is not None
    for row, stats in zip(labelled, pooled_stats(model, labelled, located=located)):
        if stats is None:
            skipped["longer than one encoder pass"] += 1
        else:
            kept.append(row)
            xs.append(stats)
    if len({row[field] for row in kept}) < 2:
        raise ValueError(f"tag head for {field!r}: the rows hold {len(kept)} usable utterances of "
                         f"{len({row[field] for row in kept})} label(s); a classifier needs at least two labels")
    x = torch.stack(xs).float()
    y = torch.tensor([vocab.index(row[field]) for row in kept])
    weight, bias = fit_linear(x, y, len(vocab), reg, dropout=dropout)
    train_accuracy = float(((x @ weight.T + bias).argmax(-1) == y).float().mean())
    groups = ([_lookup(row, group_by) for row in kept] if group_by
              else [str(row.get("key", i)) for i, row in enumerate(kept)])
    cv = cross_validate(x, y, groups, len(vocab), reg, folds, dropout=dropout)
    install_head(model, field, weight, bias)
    return HeadFit(field, weight, bias, len(kept), train_accuracy, cv, group_by or "each utterance",
                   {k: v for k, v in skipped.items() if v})


def install_head(model, field: str, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Put a (C, D) head into the model's voice summary and name its field in `config.adaptor.tag_heads`."""
    summary = model.summary
    n, dim = len(tasks.LABELS[field]), summary.head_dim(field)
    if tuple(weight.shape) != (n, dim) or tuple(bias.shape) != (n,):
        raise ValueError(f"head for {field!r} must be ({n}, {dim}) + ({n},), "
                         f"got {tuple(weight.shape)} + {tuple(bias.shape)}")
    head = nn.Linear(dim, n, device=summary.proj.weight.device)  # float32: checkpoint._keep_fp32
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    head.requires_grad_(False)
    summary.heads[field] = head
    if field not in model.config.adaptor.tag_heads:
        model.config.adaptor.tag_heads = [*model.config.adaptor.tag_heads, field]
