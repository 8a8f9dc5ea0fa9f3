"""Which Whisper encoder block carries the speaker's traits for voices never trained on?

For gender, age and vocal event, fit a linear probe per encoder block on mean+std-pooled outputs of training
utterances of the osum-tiny corpus (`osum synth`), and score it on the held-out voices' test lists. This is the
measurement behind `adaptor.encoder_layers` in the osum-tiny recipe:

    python recipes/osum-tiny/probe_layers.py --model osum-tiny --data data/osum-tiny
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

import osum
from osum.audio import load_audio, log_mel_batch

# trait -> (label field, synth family its training utterances come from (None: any), test list family)
TRAITS = {"gender": ("gender", None, "sgc"), "age": ("age", "sap", "sap"), "event": ("event", "ved", "ved")}


def pooled_blocks(encoder: torch.nn.Module, paths: list[Path], batch: int = 8) -> torch.Tensor:
    """(N, blocks + 1, 2 D): mean and std over time of every block's output, the last row the final output."""
    blocks = list(range(len(encoder.layers)))
    rows = []
    for i in range(0, len(paths), batch):
        wavs = [load_audio(str(p)) for p in paths[i:i + batch]]
        feats, lens = log_mel_batch(wavs)
        with torch.no_grad():
            out, out_lens, hidden = encoder.forward_layers(feats, lens, blocks)
        for j, n in enumerate(out_lens.tolist()):
            per = [torch.cat([h[j, :n].mean(0), h[j, :n].std(0)]) for h in (*hidden, out)]
            rows.append(torch.stack(per))
    return torch.stack(rows)


def probe_accuracy(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
                   classes: int, steps: int = 300) -> float:
    """Held-out accuracy of a logistic regression on standardised features (full-batch Adam)."""
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-5
    x_train, x_test = (x_train - mu) / sd, (x_test - mu) / sd
    torch.manual_seed(0)
    lin = torch.nn.Linear(x_train.shape[1], classes)
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2, weight_decay=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(lin(x_train), y_train).backward()
        opt.step()
    with torch.no_grad():
        return (lin(x_test).argmax(1) == y_test).float().mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="osum-tiny", help="model whose (frozen) encoder is probed")
    ap.add_argument("--data", default="data/osum-tiny", help="an `osum synth` output folder")
    ap.add_argument("--train", type=int, default=300, help="training utterances per trait")
    ap.add_argument("--test", type=int, default=200, help="at most this many test utterances per trait")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    data = Path(args.data)
    encoder = osum.load(args.model).encoder.eval()
    train = [json.loads(p.read_text())["sample"] for p in sorted((data / "audio" / "train").glob("*.json"))]
    rng = random.Random(args.seed)
    print("| trait | train / test utterances | " + " | ".join(
        [f"block {i}" for i in range(len(encoder.layers))] + ["final output"]) + " |")
    print("|---" * (len(encoder.layers) + 3) + "|")
    for trait, (field, family, test_family) in TRAITS.items():
        pool = [s for s in train if s.get(field) and family in (None, s["extra"]["family"])]
        rng.shuffle(pool)
        pool = pool[:args.train]
        lines = (data / f"test_synth_{test_family}.jsonl").read_text().splitlines()
        test = [r for r in map(json.loads, lines) if r.get(field)][:args.test]
        classes = sorted({s[field] for s in pool})
        test = [r for r in test if r[field] in classes]
        y_train = torch.tensor([classes.index(s[field]) for s in pool])
        y_test = torch.tensor([classes.index(r[field]) for r in test])
        x_train = pooled_blocks(encoder, [data / s["audio"] for s in pool])
        x_test = pooled_blocks(encoder, [data / r["audio"] for r in test])
        accs = [probe_accuracy(x_train[:, k], y_train, x_test[:, k], y_test, len(classes))
                for k in range(x_train.shape[1])]
        print(f"| {trait} ({len(classes)} classes) | {len(pool)} / {len(test)} | "
              + " | ".join(f"{a:.0%}" for a in accs) + " |", flush=True)


if __name__ == "__main__":
    main()
