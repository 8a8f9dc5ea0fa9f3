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
from collections.abc import Callable

import torch

from osum.config import load_train_config
from osum.model.speech_llm import SpeechLLM
from osum.train.loop import cpu_has_native_bf16, resolve_precision


def model_and_batch(config: str, batch_size: int, seconds: float, overrides: list[str] | None = None
                    ) -> tuple[SpeechLLM, tuple]:
    """A stage config's model (with dotted `overrides`) in training mode (seed 0) and a fixed batch: random
    log-mels of `seconds` each, one prompt and one transcript-plus-tag target for every item."""
    torch.manual_seed(0)
    cfg = load_train_config(config, overrides or [])
    model = SpeechLLM(cfg.model).train()
    frames = int(seconds * 100)
    features = torch.randn(batch_size, frames, cfg.model.audio.n_mels)
    lens = torch.full((batch_size,), frames)
    prompts = ["Transcribe the speech and tell me the speaker's gender."] * batch_size
    targets = ["the quick brown fox jumps over the lazy dog and runs far away<female>"] * batch_size
    return model, (features, lens, prompts, targets)


def median_step_time(model: SpeechLLM, batch: tuple, steps: int, warmup: int,
                     context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> float:
    """Median seconds of a training step (forward inside `context()`, backward) over `steps` timed steps, after
    `warmup` untimed ones."""
    times = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        with context():
            loss = model(*batch).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def add_step_arguments(parser: argparse.ArgumentParser, batch_size: int, steps: int, warmup: int) -> None:
    """--config, --batch-size, --seconds, --steps and --warmup of a timed training step, with these defaults."""
    parser.add_argument("--config", default="recipes/osum-tiny/stage1.yaml", help="training stage config")
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--seconds", type=float, default=3.5, help="audio per utterance")
    parser.add_argument("--steps", type=int, default=steps, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=warmup, help="untimed steps first")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_arguments(parser, batch_size=16, steps=4, warmup=2)
    args = parser.parse_args()

    model, batch = model_and_batch(args.config, args.batch_size, args.seconds)
    fp32 = median_step_time(model, batch, args.steps, args.warmup)
    bf16 = median_step_time(model, batch, args.steps, args.warmup,
                            lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    print(f"{args.config}: batch {args.batch_size} x {args.seconds} s, {torch.get_num_threads()} threads")
    print(f"fp32 {fp32:.2f} s/step · bf16 autocast {bf16:.2f} s/step · bf16 speed-up over fp32 {fp32 / bf16:.2f}x")
    print(f"native bf16 on this CPU: {cpu_has_native_bf16()} · precision auto picks "
          f"{resolve_precision('auto', torch.device('cpu'))}")


if __name__ == "__main__":
    main()
