"""Training step time, fp32 vs bf16 autocast, side by side in one run (forward + backward of a stage config).

    python benchmarks/train_step_precision.py                                  # osum-tiny stage 1, batch 16 x 3.5 s
    python benchmarks/train_step_precision.py --config recipes/osum-tiny/stage2.yaml --steps 5

The batch is fixed (random log-mels, one transcript-plus-tag target) so both precisions do the same work; the
first `--warmup` steps of each are not timed (one-off kernel and allocator set-up). The last line says whether
this CPU computes bf16 natively (AVX512-BF16 or AMX) and what `precision: auto` (the osum-tiny recipe's) picks.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from osum.config import load_train_config
from osum.model.speech_llm import SpeechLLM
from osum.train.loop import cpu_has_native_bf16, resolve_precision


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="recipes/osum-tiny/stage1.yaml", help="training stage config")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=3.5, help="audio per utterance")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per precision")
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()

    torch.manual_seed(0)
    cfg = load_train_config(args.config, [])
    model = SpeechLLM(cfg.model).train()
    frames = int(args.seconds * 100)
    features = torch.randn(args.batch_size, frames, cfg.model.audio.n_mels)
    lens = torch.full((args.batch_size,), frames)
    prompts = ["Transcribe the speech and tell me the speaker's gender."] * args.batch_size
    targets = ["the quick brown fox jumps over the lazy dog and runs far away<female>"] * args.batch_size

    times: dict[str, list[float]] = {}
    for precision in ("fp32", "bf16"):
        times[precision] = []
        for step in range(args.warmup + args.steps):
            ctx = (torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16"
                   else contextlib.nullcontext())
            start = time.perf_counter()
            with ctx:
                loss = model(features, lens, prompts, targets).loss
            loss.backward()
            model.zero_grad(set_to_none=True)
            if step >= args.warmup:
                times[precision].append(time.perf_counter() - start)
    fp32, bf16 = statistics.median(times["fp32"]), statistics.median(times["bf16"])
    print(f"{args.config}: batch {args.batch_size} x {args.seconds} s, {torch.get_num_threads()} threads")
    print(f"fp32 {fp32:.2f} s/step · bf16 autocast {bf16:.2f} s/step · bf16 speed-up over fp32 {fp32 / bf16:.2f}x")
    print(f"native bf16 on this CPU: {cpu_has_native_bf16()} · precision auto picks "
          f"{resolve_precision('auto', torch.device('cpu'))}")


if __name__ == "__main__":
    main()
