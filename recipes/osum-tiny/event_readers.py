"""Which event reader to release? The readers `osum export` can fit, compared on the held-out estimate.

Each reader is the located event head's statistics (the frame locator's weights over the whole utterance, or over
the crop within `--crop` frames of its peak with the later blocks run again on it, `--locator-crop`) and a fit
(L-BFGS with an L2 penalty, or AdamW with dropout, `--tag-head-dropout`), on the training split's event
utterances alone or with the extra list (recipe stage 1: Scratch's coughs). Each is scored two ways:

- held out by recording: 5-fold, each recording's utterances in one fold (the extra list's too), scored on the
  corpus's own training utterances only, so that every row is scored on the same utterances;
- on the held-out packs' test list (other hedgewars characters, never trained on).

The released reader was chosen on the first. The model's frame locator is used as it is. About 5 min on 2 CPU
cores:

    python recipes/osum-tiny/event_readers.py --model osum-tiny --data data/osum-tiny
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

import osum
from osum import tasks
from osum.evaluate.run import read_eval_set
from osum.model.tag_heads import cross_validate, fit_linear, pooled_stats, set_locator_crop

FIELD = "event"
GROUP = "recording"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="osum-tiny", help="a model with a located event head (osum export "
                                                          "--locate-tag-head event)")
    ap.add_argument("--data", default="data/osum-tiny", help="an `osum synth` output folder")
    ap.add_argument("--extra", default="train_extra_ved.jsonl", help="the extra event list, in --data "
                                                                     "(event_sources.py --write)")
    ap.add_argument("--crop", type=int, default=40, help="frames kept each side of the locator's peak")
    ap.add_argument("--regs", default="0.01,0.1,1", help="L2 penalties of the L-BFGS rows")
    ap.add_argument("--dropouts", default="0.3,0.5", help="dropout shares of the AdamW rows")
    args = ap.parse_args()
    if args.crop < 1:
        raise SystemExit(f"--crop {args.crop}: at least one frame each side")
    try:
        fits = ([("L-BFGS, L2 " + r, float(r), 0.0) for r in args.regs.split(",")]
                + [("AdamW, dropout " + d, 1e-2, float(d)) for d in args.dropouts.split(",")])
    except ValueError:
        raise SystemExit(f"--regs {args.regs!r} / --dropouts {args.dropouts!r}: comma-separated numbers") from None
    if any(reg <= 0 for _, reg, d in fits if not d):
        raise SystemExit(f"--regs {args.regs!r}: each penalty above 0")
    if any(not 0 < d < 1 for name, _, d in fits if name.startswith("AdamW")):
        raise SystemExit(f"--dropouts {args.dropouts!r}: each a share above 0 and below 1")
    data = Path(args.data)
    lists = {"train": data / "train_synth_ved.jsonl", "extra": data / args.extra, "test": data / "test_synth_ved.jsonl"}
    for path in lists.values():
        if not path.is_file():
            raise SystemExit(f"{path}: not found (recipe stage 1 writes it)")
    rows = {name: read_eval_set(path) for name, path in lists.items()}
    vocab = tasks.LABELS[FIELD]
    for row in (r for part in rows.values() for r in part):
        if row.get(FIELD) not in vocab:
            raise SystemExit(f"{row['key']}: {FIELD} {row.get(FIELD)!r} is not an event label ({', '.join(vocab)})")
    model = osum.load(args.model).eval()
    if model.summary is None or model.config.adaptor.located_head != FIELD or model.summary.locator is None:
        raise SystemExit(f"{args.model}: no frame locator for {FIELD} (osum export --locate-tag-head {FIELD})")
    y = {name: torch.tensor([vocab.index(r[FIELD]) for r in part]) for name, part in rows.items()}
    groups = [((r.get("extra") or {}).get(FIELD) or {}).get(GROUP) for r in rows["train"] + rows["extra"]]
    if None in groups:
        key = (rows["train"] + rows["extra"])[groups.index(None)]["key"]
        raise SystemExit(f"{key}: no extra.{FIELD}.{GROUP} to hold out by (osum synth writes it)")
    print(f"{len(rows['train'])} training utterances, {len(rows['extra'])} extra ({lists['extra'].name}), "
          f"{len(rows['test'])} test; held-out accuracy scored on the {len(rows['train'])} training utterances\n")
    print("| statistics | fit | extra list | recording-held-out | test packs |\n|---|---|---|---|---|", flush=True)
    for reader, crop in (("whole utterance, locator-weighted", None),
                         (f"crop of {2 * args.crop + 1} frames at the peak, blocks re-run", args.crop)):
        set_locator_crop(model, crop)
        stats = {}
        for name, part in rows.items():
            got = pooled_stats(model, part, located=True)
            if any(s is None for s in got):
                raise SystemExit(f"{lists[name]}: utterances longer than one encoder pass")
            stats[name] = torch.stack(got)
        for fit, reg, dropout in fits:
            for extra in (False, True):
                parts = ["train", "extra"] if extra else ["train"]
                x, labels = torch.cat([stats[p] for p in parts]), torch.cat([y[p] for p in parts])
                scored = torch.arange(len(labels)) < len(rows["train"])
                held = cross_validate(x, labels, groups[:len(labels)], len(vocab), reg, scored=scored,
                                      dropout=dropout)
                if held is None:
                    raise SystemExit(f"the training rows' {len(set(groups))} recordings fall into one fold: too few "
                                     "to hold any out")
                weight, bias = fit_linear(x, labels, len(vocab), reg, dropout=dropout)
                test = float(((stats["test"] @ weight.T + bias).argmax(-1) == y["test"]).float().mean())
                print(f"| {reader} | {fit} | {'yes' if extra else 'no'} | {held:.1%} | {test:.1%} |", flush=True)


if __name__ == "__main__":
    main()
