"""How far can a linear event head over the frozen encoder go? The measurement behind the model card's event limit.

An event head (osum/model/tag_heads.py) reads the mean and spread of whisper blocks, where a short vocal event
shares the frames with speech. This fits the same regularised head on several poolings of the same blocks: over
the whole utterance (release 5's head), weighted by the model's fitted frame locator (release 6 and 7's head, when
the model has one: `osum export --locate-tag-head event`; over the crop around its peak with `--locator-crop`,
release 8's statistics), and an oracle that pools only the frames of the inserted
event (its span is in the training rows' `extra.event`). It scores each by cross-validation with every event
recording's utterances held out together (what unseen clips meet; `extra.event.recording`, since two packs may
share one recording under two names) and on the held-out packs' test list:

    python recipes/osum-tiny/event_pooling.py --model osum-tiny --data data/osum-tiny
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

import osum
from osum import tasks
from osum.audio import ENCODER_FRAMES_PER_SECOND, load_audio, log_mel_spectrogram
from osum.model.tag_heads import cross_validate, fit_linear, pooled_stats

def block_frames(model, path: Path) -> list[torch.Tensor]:
    """Every block's output for one utterance, each (T', D), layer-normed as the voice summary pools it."""
    mel = log_mel_spectrogram(load_audio(str(path)), n_mels=model.config.audio.n_mels).T
    with torch.no_grad():
        _, _, hidden = model.encoder.forward_layers(mel[None], torch.tensor([mel.shape[0]]),
                                                    list(range(len(model.encoder.layers))))
    return [F.layer_norm(h[0].float(), h.shape[-1:]) for h in hidden]


def pooled(frames: list[torch.Tensor], blocks: list[int], kinds: tuple[str, ...],
           span: tuple[float, float] | None = None) -> torch.Tensor:
    """One row of features: each block's statistics over all frames, or over `span` (seconds) alone."""
    out = []
    for b in blocks:
        h = frames[b]
        if span is not None:
            start = min(int(span[0] * ENCODER_FRAMES_PER_SECOND), h.shape[0] - 1)
            h = h[start:max(start + 1, round(span[1] * ENCODER_FRAMES_PER_SECOND))]
        stats = {"mean": h.mean(0), "std": h.std(0, unbiased=False), "max": h.max(0).values}
        out += [stats[k] for k in kinds]
    return torch.cat(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="osum-tiny", help="model whose frozen encoder is pooled")
    ap.add_argument("--data", default="data/osum-tiny", help="an `osum synth` output folder")
    ap.add_argument("--reg", type=float, default=1e-2, help="the head's L2 penalty (osum export --tag-head-reg)")
    args = ap.parse_args()
    data = Path(args.data)
    model = osum.load(args.model).eval()
    blocks = list(model.config.adaptor.summary_layers)
    if not blocks:
        raise SystemExit(f"{args.model}: no voice summary (model.adaptor.summary_layers), so no event head to compare")
    vocab = tasks.LABELS["event"]
    train = [json.loads(line) for line in (data / "train_synth_ved.jsonl").read_text().splitlines()]
    test = [json.loads(line) for line in (data / "test_synth_ved.jsonl").read_text().splitlines()]
    train_frames = [block_frames(model, data / r["audio"]) for r in train]
    test_frames = [block_frames(model, data / r["audio"]) for r in test]
    y_train = torch.tensor([vocab.index(r["event"]) for r in train])
    y_test = torch.tensor([vocab.index(r["event"]) for r in test])
    groups = [r["extra"]["event"]["recording"] for r in train]
    all_blocks = list(range(len(model.encoder.layers)))
    variants = [  # name, blocks, statistics, pooled over the event's span only (test rows carry no span)
        ("whole utterance, mean + std (release 5's head)", blocks, ("mean", "std"), False),
        ("whole utterance, mean + std + max", blocks, ("mean", "std", "max"), False),
        ("whole utterance, mean + std, every block", all_blocks, ("mean", "std"), False),
        ("the event's span only, mean + std (oracle)", blocks, ("mean", "std"), True),
    ]
    print(f"event head on {len(train)} training utterances ({len(set(groups))} recordings), blocks {blocks}, "
          f"L2 {args.reg}\n")
    print("| pooling | recording-held-out 5-fold accuracy | test packs |\n|---|---|---|")
    for name, used, kinds, span in variants:
        x = torch.stack([pooled(f, used, kinds, tuple(r["extra"]["event"]["span"]) if span else None)
                         for f, r in zip(train_frames, train)])
        cv = cross_validate(x, y_train, groups, len(vocab), args.reg)
        test_acc = "–"
        if not span:
            weight, bias = fit_linear(x, y_train, len(vocab), args.reg)
            x_test = torch.stack([pooled(f, used, kinds) for f in test_frames])
            test_acc = f"{float(((x_test @ weight.T + bias).argmax(-1) == y_test).float().mean()):.1%}"
        print(f"| {name} | {cv:.1%} | {test_acc} |", flush=True)
    if model.summary.locator is not None:  # the export fits the head on these statistics (fit_model_head)
        x, x_test = (torch.stack(pooled_stats(model, [{**r, "audio": str(data / r["audio"])} for r in rows],
                                              located=True)) for rows in (train, test))
        cv = cross_validate(x, y_train, groups, len(vocab), args.reg)
        weight, bias = fit_linear(x, y_train, len(vocab), args.reg)
        test_acc = float(((x_test @ weight.T + bias).argmax(-1) == y_test).float().mean())
        crop = model.config.adaptor.locator_crop
        where = f", the {2 * crop + 1} frames around its peak" if crop else ""
        print(f"| weighted by the model's frame locator (block {model.config.adaptor.locator_layer}){where}, mean + "
              f"std (the export's L-BFGS fit) | {cv:.1%} | {test_acc:.1%} |", flush=True)


if __name__ == "__main__":
    main()
