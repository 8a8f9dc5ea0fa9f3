"""Would training the encoder help the event head? A measurement on the model's own event utterances.

Release 7's event head is linear over the frozen encoder's statistics, pooled with the frame locator's weights
over the whole utterance. This reads the event more closely and lets the encoder learn:

- each utterance is cut to the frames within `--window` of the locator's highest-scoring frame, at the output of
  the locator's block (the blocks before it run on the whole utterance, as in the model);
- the later encoder blocks run again on that crop alone, so the speech around the event no longer reaches them;
- a linear head reads the mean and spread of the crop's blocks (the locator's block and every later one), each
  frame weighted by the locator;
- with `--tune N`, the last N of those block copies are trained with the head (AdamW, dropout); with 0, the head
  alone on frozen blocks. The model itself is never changed.

Each reader is scored as the export scores its head: 5-fold cross-validation with each recording's utterances held
out together (`extra.event.recording`), and on the held-out packs' test list after a fit on every training row. The
first row is that whole-utterance head's own fit (release 7's), for reference. About 23 min on 2 CPU cores for
the default `--tune 0,1`:

    python recipes/osum-tiny/event_finetune.py --model osum-tiny --data data/osum-tiny
"""
from __future__ import annotations

import argparse
import copy
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import osum
from osum import tasks
from osum.evaluate.run import read_eval_set
from osum.model.adaptor import weighted_stats
from osum.model.tag_heads import cross_validate, encoder_batches, fit_linear, fold_of

FIELD = "event"
GROUP = "recording"
FOLDS = 5


@dataclass
class Crops:
    """Every row's crop at the locator's block, zero-padded: frames (N, T, D), locator weights (N, T), valid (N, T);
    and the whole-utterance head's statistics (N, S)."""

    frames: torch.Tensor
    weights: torch.Tensor
    valid: torch.Tensor
    released: torch.Tensor


@torch.no_grad()
def crop_rows(model, rows: list[dict], window: int) -> Crops:
    """Each row's frames of the locator's block within `window` of its highest-scoring frame (2 * window + 1 at
    most, fewer at an utterance's edge), the locator's weights there, and the locator-weighted statistics of the
    whole utterance (batched as `pooled_stats` batches, so for a model without a crop they are the export's to the
    bit)."""
    summary = model.summary
    frames, weights, released = [None] * len(rows), [None] * len(rows), [None] * len(rows)
    for index, padded, lens in encoder_batches(model, rows, batch_size=8, window=256):
        _, encoder_lens, hidden = model.encoder.forward_layers(padded, lens, summary.layers)
        crop, w, valid = summary.crop(hidden, encoder_lens, window)  # the model's own crop (locator_crop)
        stats = summary.pool(hidden, encoder_lens, located=True)
        for j, i in enumerate(index):
            n = int(valid[j].sum())
            frames[i], weights[i] = crop[j, :n].float().cpu(), w[j, :n].cpu()
            released[i] = stats[j].cpu()
    too_long = [rows[i]["key"] for i, f in enumerate(frames) if f is None]
    if too_long:
        raise SystemExit(f"{len(too_long)} utterances are longer than one encoder pass, e.g. {too_long[0]}")
    valid = nn.utils.rnn.pad_sequence([torch.ones(len(f), dtype=torch.bool) for f in frames], batch_first=True)
    return Crops(nn.utils.rnn.pad_sequence(frames, batch_first=True),
                 nn.utils.rnn.pad_sequence(weights, batch_first=True), valid, torch.stack(released))


class CropReader(nn.Module):
    """Copies of the last `tuned` encoder blocks (the frozen ones before them run once, beforehand, in
    `frozen_outputs`) and a linear head over the located statistics of the crop's blocks."""

    def __init__(self, blocks: list[nn.Module], tuned: int, stats_dim: int, n_classes: int, dropout: float):
        super().__init__()
        self.tuned = nn.ModuleList(copy.deepcopy(b) for b in blocks[len(blocks) - tuned:])
        self.tuned.requires_grad_(True)  # the model's encoder is frozen: its copies inherit requires_grad=False
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(stats_dim, n_classes)
        self.register_buffer("mean", torch.zeros(stats_dim))
        self.register_buffer("scale", torch.ones(stats_dim))

    def stats(self, frozen: list[torch.Tensor], weights: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Standardised statistics of the frozen blocks' outputs and the tuned blocks' run on the last of them."""
        hidden, x, mask = list(frozen), frozen[-1], valid[:, None, None, :]
        for block in self.tuned:
            x = block(x, mask)
            hidden.append(x)
        return (weighted_stats(hidden, weights, min_count=torch.finfo(torch.float32).tiny) - self.mean) / self.scale

    def forward(self, frozen: list[torch.Tensor], weights: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.stats(frozen, weights, valid)))


@torch.no_grad()
def frozen_outputs(blocks: list[nn.Module], crops: Crops, frozen: int) -> list[torch.Tensor]:
    """The crop, and the outputs of the first `frozen` later blocks run on it (each (N, T, D))."""
    out, x, mask = [crops.frames], crops.frames, crops.valid[:, None, None, :]
    for block in blocks[:frozen]:
        x = block(x, mask)
        out.append(x)
    return out


def train_reader(blocks: list[nn.Module], tuned: int, inputs: list[torch.Tensor], crops: Crops, y: torch.Tensor,
                 rows: torch.Tensor, args: argparse.Namespace, n_classes: int) -> tuple[CropReader, list[float]]:
    """A reader fitted on `rows` (indices): the head and the last `tuned` blocks, AdamW with a short warm-up and a
    linear decay; its statistics standardised by their values on those rows before training. Returns the reader
    and each epoch's mean training loss."""
    torch.manual_seed(args.seed)
    pick = lambda idx: ([h[idx] for h in inputs], crops.weights[idx], crops.valid[idx])  # noqa: E731
    stats_dim = 2 * crops.frames.shape[-1] * (len(inputs) + tuned)
    reader = CropReader(blocks, tuned, stats_dim, n_classes, args.dropout)
    with torch.no_grad():
        stats = reader.stats(*pick(rows))  # raw: mean 0, scale 1 so far
    reader.mean.copy_(stats.mean(0))
    reader.scale.copy_(stats.std(0).clamp(min=1e-4))
    groups = [{"params": reader.head.parameters(), "lr": args.head_lr}]
    if tuned:
        groups.append({"params": reader.tuned.parameters(), "lr": args.block_lr})
    opt = torch.optim.AdamW(groups, weight_decay=args.weight_decay)
    per_epoch = -(-len(rows) // args.batch)
    total = args.epochs * per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.0, 1 - s / total))
    losses = []
    reader.train()
    for _ in range(args.epochs):
        order, epoch_loss = rows[torch.randperm(len(rows))], 0.0
        for start in range(0, len(order), args.batch):
            idx = order[start:start + args.batch]
            loss = F.cross_entropy(reader(*pick(idx)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            epoch_loss += loss.item() * len(idx)
        losses.append(epoch_loss / len(rows))
    return reader.eval(), losses


@torch.no_grad()
def predict(reader: CropReader, inputs: list[torch.Tensor], crops: Crops, rows: torch.Tensor) -> torch.Tensor:
    """The reader's label index for each of `rows`."""
    return reader([h[rows] for h in inputs], crops.weights[rows], crops.valid[rows]).argmax(-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="osum-tiny", help="a model with a located event head (osum export "
                                                          "--locate-tag-head event)")
    ap.add_argument("--data", default="data/osum-tiny", help="an `osum synth` output folder")
    ap.add_argument("--tune", default="0,1", help="comma-separated: how many of the last encoder blocks to train, "
                                                  "a row each (0: the head alone)")
    ap.add_argument("--window", type=int, default=40, help="encoder frames (20 ms) kept each side of the peak")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--head-lr", type=float, default=1e-3)
    ap.add_argument("--block-lr", type=float, default=3e-5)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--dropout", type=float, default=0.3)
    ap.add_argument("--reg", type=float, default=1e-2, help="the whole-utterance head's L2 penalty (as the export's)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.window < 1 or args.epochs < 1 or args.batch < 1:
        raise SystemExit("--window, --epochs and --batch must be at least 1")
    data = Path(args.data)
    for name in ("train_synth_ved.jsonl", "test_synth_ved.jsonl"):
        if not (data / name).is_file():
            raise SystemExit(f"{data / name}: not found (build the corpus first: recipe stage 1)")
    model = osum.load(args.model).eval().float()
    if model.summary is None or model.config.adaptor.located_head != FIELD or model.summary.locator is None:
        raise SystemExit(f"{args.model}: no frame locator for {FIELD} (osum export --locate-tag-head {FIELD})")
    later = list(model.encoder.layers)[model.summary.locator_layer + 1:]
    try:
        tunes = [int(t) for t in args.tune.split(",")]
    except ValueError:
        raise SystemExit(f"--tune {args.tune!r}: expected comma-separated block counts, e.g. 0,1") from None
    if any(not 0 <= t <= len(later) for t in tunes):
        raise SystemExit(f"--tune {args.tune!r}: {len(later)} encoder block(s) follow the locator's (block "
                         f"{model.summary.locator_layer}), so each count must be 0 to {len(later)}")
    train, test = read_eval_set(data / "train_synth_ved.jsonl"), read_eval_set(data / "test_synth_ved.jsonl")
    vocab = tasks.LABELS[FIELD]
    for row in (*train, *test):
        if row.get(FIELD) not in vocab:
            raise SystemExit(f"{row['key']}: {FIELD} {row.get(FIELD)!r} is not an event label ({', '.join(vocab)})")
    missing = [r["key"] for r in train if not isinstance((r.get("extra") or {}).get(FIELD), dict)
               or GROUP not in r["extra"][FIELD]]
    if missing:
        raise SystemExit(f"{len(missing)} training rows have no extra.{FIELD}.{GROUP} to hold out by, e.g. "
                         f"{missing[0]} (osum synth writes it)")
    y, y_test = (torch.tensor([vocab.index(r[FIELD]) for r in rows]) for rows in (train, test))
    groups = [r["extra"][FIELD][GROUP] for r in train]
    fold = torch.tensor([fold_of(g, FOLDS) for g in groups])
    if len(set(fold.tolist())) < 2:
        raise SystemExit(f"the training rows' {len(set(groups))} recordings fall into one fold: too few to hold "
                         "any out")
    start = time.time()
    crops, test_crops = crop_rows(model, train, args.window), crop_rows(model, test, args.window)
    print(f"{len(train)} training utterances of {len(set(groups))} recordings; test: {len(test)}; crops of "
          f"{2 * args.window + 1} frames at most around the locator's peak on block {model.summary.locator_layer}, "
          f"blocks {model.summary.locator_layer}-{len(model.encoder.layers) - 1} read\n", flush=True)
    print("| reader | encoder blocks trained | recording-held-out | test packs |\n|---|---|---|---|")
    held = cross_validate(crops.released, y, groups, len(vocab), args.reg, folds=FOLDS)
    weight, bias = fit_linear(crops.released, y, len(vocab), args.reg)
    test_acc = float(((test_crops.released @ weight.T + bias).argmax(-1) == y_test).float().mean())
    print(f"| the whole-utterance head (locator-weighted; L-BFGS) | 0 | {held:.1%} | {test_acc:.1%} |",
          flush=True)
    for tuned in tunes:
        inputs = frozen_outputs(later, crops, len(later) - tuned)
        test_inputs = frozen_outputs(later, test_crops, len(later) - tuned)
        right = 0
        for k in sorted(set(fold.tolist())):
            fitted, _ = train_reader(later, tuned, inputs, crops, y, torch.nonzero(fold != k)[:, 0], args,
                                     len(vocab))
            rows = torch.nonzero(fold == k)[:, 0]
            right += int((predict(fitted, inputs, crops, rows) == y[rows]).sum())
        fitted, losses = train_reader(later, tuned, inputs, crops, y, torch.arange(len(y)), args, len(vocab))
        test_acc = float((predict(fitted, test_inputs, test_crops, torch.arange(len(y_test))) == y_test)
                         .float().mean())
        print(f"| crop around the peak (AdamW; training loss {losses[0]:.3f} → {losses[-1]:.3f}) | {tuned} | "
              f"{right / len(y):.1%} | {test_acc:.1%} |", flush=True)
    print(f"\n{time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
