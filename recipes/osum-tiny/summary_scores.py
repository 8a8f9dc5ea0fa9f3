"""The voice summary's own label probabilities for some clips, model by model: how sure each model (or training
checkpoint) is of a clip's gender, age, ... (`SpeechLLM.summary_probs`; fitted heads are not used).

    python recipes/osum-tiny/summary_scores.py examples/*.wav --models osum-tiny \
        exp/osum-tiny/stage2-open3/checkpoints/step_00000500 --field gender

The model card's table of the summary's male probability for `examples/espeak_male_finance.wav` across the
2-open3 checkpoints comes from this script.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

import osum
from osum import tasks
from osum.audio import load_audio, log_mel_spectrogram


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("clips", nargs="+", help="audio files")
    parser.add_argument("--models", nargs="+", required=True, help="model directories, released names or checkpoints")
    parser.add_argument("--field", default="gender", choices=sorted(tasks.LABELS))
    args = parser.parse_args()
    labels = tasks.LABELS[args.field]
    for name in args.models:
        model = osum.load(name).eval()
        print(name)
        for clip in args.clips:
            mel = log_mel_spectrogram(load_audio(clip), n_mels=model.config.audio.n_mels).T[None]
            probs = model.summary_probs(mel, torch.tensor([mel.shape[1]]), args.field)[0].tolist()
            shown = " ".join(f"{label}={p:.2f}" for label, p in zip(labels, probs))
            print(f"  {Path(clip).name}: {shown}")


if __name__ == "__main__":
    main()
