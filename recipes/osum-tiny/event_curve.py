"""How does the event head grow with what it is fitted on? The learning curves behind the model card's event limit.

The located event head (a frame locator, then a linear head, L-BFGS, over the statistics it weights: `osum
export --locate-tag-head event`, release 7's) is fitted again, locator and head, on part of the training
split's event utterances and scored on the held-out packs' test list. Two curves, each point the mean over
`--draws` random draws:

- recordings: a fraction of each label's recordings (`extra.event.recording`; at least one), every utterance of
  the recordings kept. The slope says what more recordings of these kinds would bring.
- utterances: every recording, a fraction of each one's utterances (at least one). The slope says what more
  insertions of the same recordings (more draws of level, pitch and position) would bring.

With release 7's weights the full set is that release's own fit, so its point matches its test figure. Each utterance's
encoder blocks are computed once and reused by every fit (10 min in all on 2 CPU cores):

    python recipes/osum-tiny/event_curve.py --model osum-tiny --data data/osum-tiny
"""
from __future__ import annotations

import argparse
import hashlib
import math
import random
from collections import defaultdict
from pathlib import Path
from statistics import mean

import torch
from torch import nn

import osum
from osum import tasks
from osum.evaluate.run import read_eval_set
from osum.model.tag_heads import fit_locator, fit_model_head, pooled_stats

FRACTIONS = (0.125, 0.25, 0.5, 0.75, 1.0)
FIELD = "event"
GROUP = "extra.event.recording"


def cache_encoder(model) -> None:
    """Make `model.encoder.forward_layers` compute each utterance once: every fit below encodes the same
    utterances in other batches. Items are keyed by their log-mel frames and encoded alone, as a batch of one
    gives what a padded batch gives an item (the encoder masks padding)."""
    encoder, compute, store = model.encoder, model.encoder.forward_layers, {}

    def forward_layers(features, feature_lens, layers):
        outs, lens, hidden = [], [], []
        for mel, n in zip(features, feature_lens.tolist()):
            key = (hashlib.sha256(mel[:n].contiguous().cpu().numpy().tobytes()).hexdigest(), tuple(layers))
            if key not in store:
                with torch.no_grad():
                    out, enc_lens, kept = compute(mel[None, :n], torch.tensor([n], device=mel.device), layers)
                store[key] = (out[0], int(enc_lens[0]), [h[0] for h in kept])
            outs.append(store[key][0])
            lens.append(store[key][1])
            hidden.append(store[key][2])
        pad = nn.utils.rnn.pad_sequence
        return (pad(outs, batch_first=True), torch.tensor(lens, device=features.device),
                [pad([h[i] for h in hidden], batch_first=True) for i in range(len(layers))])

    encoder.forward_layers = forward_layers


def subsets(train: list[dict], axis: str, fraction: float, rng: random.Random) -> list[dict]:
    """The rows a point of one curve is fitted on: a fraction of each label's recordings, or of each
    recording's utterances, drawn by `rng`, at least one of each."""
    by_recording: dict[str, list[dict]] = defaultdict(list)
    for row in train:
        by_recording[row["extra"]["event"]["recording"]].append(row)

    def keep(items: list) -> list:
        return rng.sample(items, max(1, math.ceil(fraction * len(items))))

    if axis == "utterances":
        return [row for rec in sorted(by_recording) for row in keep(by_recording[rec])]
    by_label: dict[str, list[str]] = defaultdict(list)
    for rec, rows in sorted(by_recording.items()):
        by_label[rows[0][FIELD]].append(rec)
    return [row for label in sorted(by_label) for rec in keep(by_label[label]) for row in by_recording[rec]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="osum-tiny", help="a model with a located event head (osum export "
                                                          "--locate-tag-head event)")
    ap.add_argument("--data", default="data/osum-tiny", help="an `osum synth` output folder")
    ap.add_argument("--reg", type=float, default=1e-2, help="the locator's and head's L2 penalty (as the export's)")
    ap.add_argument("--draws", type=int, default=3, help="random draws averaged at each fraction below 1")
    args = ap.parse_args()
    data = Path(args.data)
    model = osum.load(args.model).eval()
    if model.config.adaptor.located_head != FIELD or model.summary.locator is None:
        raise SystemExit(f"{args.model}: no frame locator for {FIELD} (osum export --locate-tag-head {FIELD})")
    layer = model.config.adaptor.locator_layer
    train, test = read_eval_set(data / "train_synth_ved.jsonl"), read_eval_set(data / "test_synth_ved.jsonl")
    y_test = torch.tensor([tasks.LABELS[FIELD].index(r[FIELD]) for r in test])
    cache_encoder(model)

    def point(rows: list[dict]) -> tuple[float | None, float, int, int]:
        """Locator and head fitted on `rows`: (recording-held-out accuracy, test accuracy, recordings, rows)."""
        fit_locator(model, FIELD, rows, layer=layer, reg=args.reg)
        head = fit_model_head(model, FIELD, rows, reg=args.reg, group_by=GROUP)
        x_test = torch.stack(pooled_stats(model, test, located=True))
        accuracy = float(((x_test @ head.weight.T + head.bias).argmax(-1) == y_test).float().mean())
        return head.cv_accuracy, accuracy, len({r["extra"]["event"]["recording"] for r in rows}), len(rows)

    full = point(train)  # both curves end here
    print(f"{len(train)} training utterances of {full[2]} recordings; test: {len(test)} utterances; "
          f"locator on block {layer}; L2 {args.reg}; {args.draws} draws a point\n", flush=True)
    print("| kept | fraction | recordings | utterances | recording-held-out accuracy | test packs |")
    print("|---|---|---|---|---|---|", flush=True)
    for axis in ("recordings", "utterances"):
        for fraction in FRACTIONS:
            points = [full] if fraction == 1.0 else [
                point(subsets(train, axis, fraction, random.Random(f"{axis}/{fraction}/{draw}")))
                for draw in range(args.draws)]
            cvs, accs, recordings, rows = zip(*points)
            spread = f" ± {(max(accs) - min(accs)) / 2:.1%}" if len(points) > 1 else ""
            cv = f"{mean(cvs):.1%}" if None not in cvs else "–"
            print(f"| {axis} | {fraction:g} | {mean(recordings):.0f} | {mean(rows):.0f} | {cv} | "
                  f"{mean(accs):.1%}{spread} |", flush=True)


if __name__ == "__main__":
    main()
