"""The training loop behind `osum train --config FILE.yaml [dotted.overrides=...]`.

One loop for every engine (single, torchrun DDP, FSDP2, DeepSpeed ZeRO): AdamW, warm-up then inverse-sqrt
or cosine decay, accumulation, clipping, autocast, periodic validation, atomic checkpoints and exact resume.
Resume rebuilds the data loader of the saved epoch and skips the batches already done: the loader is a
pure function of (seed, epoch, rank, world size), and the RNG states are restored after the skip.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from osum import tasks
from osum.config import OptimConfig, TrainConfig, save
from osum.evaluate import metrics, normalize
from osum.model import checkpoint
from osum.model.speech_llm import ForwardOutput, SpeechLLM
from osum.train import distributed, state

log = logging.getLogger(__name__)

LoaderFn = Callable[..., Any]  # (data, split, prompts, n_mels, epoch, rank, world_size, layout) -> batches


def lr_factor(optim: OptimConfig, max_steps: int) -> Callable[[int], float]:
    """Multiplier of optim.lr after `step` optimizer steps: linear warm-up, then the chosen decay."""
    warmup = max(optim.warmup_steps, 0)

    def factor(step: int) -> float:
        s = step + 1  # the first update already uses a non-zero rate
        if warmup and s <= warmup:
            return s / warmup
        if optim.schedule == "inverse_sqrt":
            return math.sqrt(max(warmup, 1) / s)
        if optim.schedule == "cosine":
            progress = min(1.0, (s - warmup) / max(1, max_steps - warmup))
            return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        if optim.schedule == "constant":
            return 1.0
        raise ValueError(f"optim.schedule {optim.schedule!r} is not one of inverse_sqrt, cosine, constant")

    return factor


def param_groups(model: SpeechLLM, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only; biases, norms and the speech-begin/end rows are not decayed."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 and name != "speech_embeds" else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("nothing to train: set encoder.trainable, adaptor.trainable, lora.enabled or llm.trainable")
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (x86 AVX512-BF16 or AMX). Without it, bf16 autocast on CPU
    converts to fp32 and back around every matmul: 5x slower matmuls than fp32 on a 2-core Xeon with AVX512 but
    no AVX512-BF16, where an EPYC with it ran a training step 2.1x faster in bf16 (README, Measured). Read through
    torch's private probes, so a torch without them counts as "no" and training stays in fp32."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def resolve_precision(precision: str, device: torch.device) -> str:
    """The autocast precision a run uses. "auto": bf16 on a GPU or CPU that computes in it natively, fp16 on an
    older GPU (with loss scaling), fp32 on any other CPU. An explicit choice is kept, with a warning where it is
    the slow one."""
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"precision {precision!r} is not one of auto, fp32, bf16, fp16")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision fp16 needs a CUDA device; use auto, bf16 or fp32 on CPU")
    if device.type == "cpu" and precision == "bf16" and not cpu_has_native_bf16():
        log.warning("precision bf16 on a CPU without AVX512-BF16 or AMX: autocast emulates bf16 matmuls, several "
                    "times slower than fp32 (benchmarks/train_step_precision.py); precision=auto picks fp32 here")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    return "fp32"


class Trainer:
    def __init__(self, cfg: TrainConfig, build_loader: LoaderFn | None = None):
        if build_loader is None:
            from osum.data.pipeline import build_loader
        self.cfg = cfg
        self.build_loader = build_loader
        self.info = distributed.setup(cfg.engine, cfg.device)
        self.out = Path(cfg.out_dir)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.precision = resolve_precision(cfg.precision, self.info.device)

        model = SpeechLLM(cfg.model)
        if cfg.init_from:
            groups = checkpoint.load_weights(model, cfg.init_from)
            log.info("initialised %s from %s", ", ".join(groups), cfg.init_from)
        self.resume_dir = state.latest(self.out)
        if self.resume_dir is not None:
            checkpoint.load_weights(model, self.resume_dir)
        self.model = model.to(self.info.device)
        self.step = self.epoch = self.batches_in_epoch = 0

        if self.info.engine == "fsdp2":
            # fully_shard swaps in sharded parameters: the optimizer must be built on those.
            mp = torch.bfloat16 if self.precision == "bf16" else None
            distributed.wrap_fsdp2(self.model, mp)
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(o, cfg.max_steps))
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        self.engine = self._wrap()
        if self.resume_dir is not None:
            self._resume()
        self.metrics_file = self.out / "metrics.jsonl"
        self.writer = self._tensorboard() if self.info.is_main else None

    # ---- setup --------------------------------------------------------------------------------

    def _wrap(self):
        engine = self.info.engine
        if engine == "ddp":
            return distributed.wrap_ddp(self.model, self.info)
        if engine == "deepspeed":
            import deepspeed

            c = self.cfg
            ds_cfg = distributed.deepspeed_config(c.deepspeed_stage, c.optim.lr, c.optim.grad_clip, c.optim.accum_steps,
                                                  1, self.precision)
            ds_cfg["zero_allow_untested_optimizer"] = True
            engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=self.model, optimizer=self.optimizer, lr_scheduler=self.scheduler, config=ds_cfg
            )
            return engine
        return self.model

    def _tensorboard(self):
        if not self.cfg.tensorboard:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.info("tensorboard is not installed; metrics go to %s only", self.out / "metrics.jsonl")
            return None
        return SummaryWriter(str(self.out / "tensorboard"))

    def _optimizer_state(self) -> dict:
        if self.info.engine == "fsdp2":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            return get_optimizer_state_dict(self.model, self.optimizer,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self.optimizer.state_dict()

    def _model_state(self) -> dict[str, torch.Tensor] | None:
        if self.info.engine == "fsdp2":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return None

    def _resume(self) -> None:
        saved = state.load_trainer_state(self.resume_dir)
        if saved["world_size"] != self.info.world_size:
            raise ValueError(
                f"{self.resume_dir} was written by {saved['world_size']} processes, this run has "
                f"{self.info.world_size}: the data position cannot be carried over exactly"
            )
        if self.info.engine == "fsdp2":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(self.model, self.optimizer, saved["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        elif self.info.engine == "deepspeed":
            raise NotImplementedError("resuming a DeepSpeed run is not supported yet; start it again or use ddp/fsdp2")
        else:
            self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        if self.scaler is not None and saved.get("scaler"):
            self.scaler.load_state_dict(saved["scaler"])
        self.step, self.epoch, self.batches_in_epoch = saved["step"], saved["epoch"], saved["batches_in_epoch"]
        self.rng_to_restore = saved["rng"][self.info.rank]
        log.info("resumed from %s at step %d (epoch %d, batch %d)", self.resume_dir, self.step, self.epoch,
                 self.batches_in_epoch)

    # ---- the loop -----------------------------------------------------------------------------

    def _loader(self, split: str, epoch: int):
        from osum.data.pipeline import AudioLayout

        return self.build_loader(self.cfg.data, split, self.model.prompts, self.model.config.audio.n_mels, epoch,
                                 self.info.rank, self.info.world_size, AudioLayout.of(self.model.config))

    def _batches(self) -> Iterator[dict]:
        """Training batches forever, epoch after epoch, from the saved position on."""
        while True:
            loader = self._loader("train", self.epoch)
            it = iter(loader)
            for _ in range(self.batches_in_epoch):
                if next(it, None) is None:
                    raise RuntimeError(f"epoch {self.epoch} has fewer batches than the checkpoint's position")
            rng = getattr(self, "rng_to_restore", None)
            if rng is not None:
                state.set_rng_state(rng)
                self.rng_to_restore = None
            produced = 0
            while True:
                batch = next(it, None)
                if not self._all_have(batch is not None):
                    leftover = (batch is not None) + sum(1 for _ in it)
                    if leftover:
                        log.warning("epoch %d: rank %d skips its last %d batches so that all ranks end the epoch "
                                    "together", self.epoch, self.info.rank, leftover)
                    break
                produced += 1
                self.batches_in_epoch += 1  # counted before the yield: a checkpoint after this step must skip it
                yield batch
            if produced == 0 and self.batches_in_epoch == 0:
                raise RuntimeError("the training data produced no batch: see the data summary for dropped samples")
            stats = getattr(loader, "stats", None)
            if stats is not None:
                from osum.data.stats import gather

                total = gather(stats)  # a collective: every rank reaches this line together
                if self.info.is_main:
                    log.info("epoch %d data: %s", self.epoch, total.summary())
                    self._log({"event": "epoch_end", "epoch": self.epoch, "data": total.to_dict()})
            self.epoch += 1
            self.batches_in_epoch = 0

    def _all_have(self, has: bool) -> bool:
        if self.info.world_size == 1:
            return has
        return distributed.all_reduce_sum([float(has)], self.info)[0] == self.info.world_size

    def _autocast(self):
        if self.precision == "fp32" or self.info.engine == "deepspeed":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.info.device.type, dtype=dtype)

    def _forward(self, batch: dict, ctc: bool = False, lm: bool = True) -> ForwardOutput:
        dev = self.info.device
        with self._autocast():
            return self.engine(batch["features"].to(dev), batch["feature_lens"].to(dev), batch["prompt_ids"],
                               batch["target_ids"], transcripts=batch["transcript_ids"] if ctc else None, lm=lm,
                               labels=batch["labels"] if self.cfg.summary_weight > 0 else None)

    def train(self, until: int | None = None) -> list[dict]:
        """Run to cfg.max_steps (or stop early after step `until`, with a checkpoint there); return step records."""
        cfg, info = self.cfg, self.info
        stop = min(cfg.max_steps, until) if until is not None else cfg.max_steps
        if info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            save(cfg, self.out / "train_config.yaml")
            self._log({"event": "precision", "requested": cfg.precision, "used": self.precision})
            if self.resume_dir is not None:
                self._log({"event": "resume", "step": self.step, "from": str(self.resume_dir)})
        records: list[dict] = []
        batches = self._batches()
        bar = self._progress(stop)
        self.engine.train()
        while self.step < stop:
            t0 = time.perf_counter()
            loss_sum = tokens = audio = ctc_sum = summary_sum = 0.0
            for _ in range(cfg.optim.accum_steps):
                batch = next(batches)
                out = self._forward(batch, ctc=cfg.ctc_weight > 0, lm=cfg.lm_weight > 0)
                loss = cfg.lm_weight * out.loss
                if out.ctc_loss is not None:
                    loss = loss + cfg.ctc_weight * out.ctc_loss
                    ctc_sum += out.ctc_loss.item() / cfg.optim.accum_steps
                if out.summary_loss is not None:
                    loss = loss + cfg.summary_weight * out.summary_loss
                    summary_sum += out.summary_loss.item() / cfg.optim.accum_steps
                if info.engine == "deepspeed":
                    self.engine.backward(loss)
                    self.engine.step()
                else:
                    scaled = loss / cfg.optim.accum_steps
                    (self.scaler.scale(scaled) if self.scaler else scaled).backward()
                loss_sum += out.loss.item() * batch["num_target_tokens"]
                tokens += batch["num_target_tokens"]
                audio += batch["audio_seconds"]
            lr = self.scheduler.get_last_lr()[0]  # the rate this update uses
            grad_norm = self._optimizer_step()
            self.step += 1
            loss_sum, tokens, audio, ctc_sum, summary_sum = distributed.all_reduce_sum(
                [loss_sum, tokens, audio, ctc_sum, summary_sum], info)
            dt = time.perf_counter() - t0
            record = {"step": self.step, "epoch": self.epoch, "loss": loss_sum / max(tokens, 1),
                      "lr": lr, "grad_norm": grad_norm,
                      "audio_s_per_s": audio / dt, "tokens_per_s": tokens / dt}
            if cfg.ctc_weight > 0:
                record["ctc_loss"] = ctc_sum / info.world_size
            if cfg.summary_weight > 0:
                record["summary_loss"] = summary_sum / info.world_size
            if cfg.lm_weight == 0:  # a CTC-only warm-up: no LLM loss, no LLM tokens
                del record["loss"], record["tokens_per_s"]
            records.append(record)
            if info.is_main and (self.step % cfg.log_every == 0 or self.step == stop):
                self._log(record)
            if bar is not None:
                bar.update(1)
                shown = {k: f"{record[k]:.3f}" for k in ("loss", "ctc_loss", "summary_loss") if k in record}
                shown.update(lr=f"{record['lr']:.2e}", aud=f"{record['audio_s_per_s']:.1f}s/s")
                if "tokens_per_s" in record:
                    shown["tok"] = f"{record['tokens_per_s']:.0f}/s"
                bar.set_postfix(**shown)
            if cfg.valid_every and self.step % cfg.valid_every == 0 and self.step < stop:
                self.validate()
            if (cfg.save_every and self.step % cfg.save_every == 0) or self.step == stop:
                self.save_checkpoint()
        if bar is not None:
            bar.close()
        if self.step >= cfg.max_steps:
            self.validate()
        return records

    def _optimizer_step(self) -> float:
        if self.info.engine == "deepspeed":
            norm = self.engine.get_global_grad_norm()
            return float(norm) if norm is not None else float("nan")
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.optim.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def _has_valid(self) -> bool:
        """Validation sets listed in `data.valid` or in the `data.mixture` file."""
        data = self.cfg.data
        if getattr(data, "valid", None):
            return True
        if getattr(data, "mixture", None):
            from osum.data import mixture

            return bool(mixture.datasets(data, "valid"))
        return False

    @torch.no_grad()
    def validate(self) -> float | None:
        """Token-weighted mean loss over the validation sets (None when there are none)."""
        if not self._has_valid():
            return None
        self.engine.eval()
        loss_sum = tokens = other_sum = other_tokens = ctc_sum = batches = ctc_errors = ctc_words = 0.0
        summary_sum = summary_batches = 0.0
        field_hits = {f: [0.0, 0.0] for f in tasks.TAG_FIELDS}  # the voice summary's right / labelled, per field
        for batch in self._loader("valid", 0):
            n = batch["num_target_tokens"]
            out = self._forward(batch, ctc=self.cfg.ctc_weight > 0)
            loss_sum += out.loss.item() * n
            tokens += n
            if out.summary_loss is not None:
                summary_sum += out.summary_loss.item()
                summary_batches += 1
            for f, (right, labelled) in (out.summary_hits or {}).items():
                field_hits[f][0] += right
                field_hits[f][1] += labelled
            if out.ctc_loss is not None:
                ctc_sum += out.ctc_loss.item()
                batches += 1
                decode = self.model.tokenizer.decode
                counts = metrics.corpus_counts(
                    "wer", [normalize.basic(decode(t)) for t in batch["transcript_ids"] if t],
                    [normalize.basic(decode(h)) for h, t in zip(out.ctc_greedy, batch["transcript_ids"]) if t])
                ctc_errors += counts.errors
                ctc_words += counts.ref_len
            # Each target again with the next item's audio: the gap to valid_loss is how much the model uses
            # the audio (a speech LLM can lower its loss a long way on the text prior alone). Every rank runs
            # this forward, so sharded engines stay in step; batches of one count for nothing.
            other = self._forward({**batch, "features": batch["features"].roll(1, 0),
                                   "feature_lens": batch["feature_lens"].roll(1, 0)}).loss.item()
            if len(batch["feature_lens"]) > 1:
                other_sum += other * n
                other_tokens += n
        (loss_sum, tokens, other_sum, other_tokens, ctc_sum, batches, ctc_errors, ctc_words, summary_sum,
         summary_batches, *hits) = distributed.all_reduce_sum(
            [loss_sum, tokens, other_sum, other_tokens, ctc_sum, batches, ctc_errors, ctc_words, summary_sum,
             summary_batches, *(n for f in tasks.TAG_FIELDS for n in field_hits[f])], self.info)
        self.engine.train()
        value = loss_sum / max(tokens, 1)
        if self.info.is_main:
            record = {"step": self.step, "valid_loss": value, "valid_tokens": tokens}
            if other_tokens:
                record["valid_loss_other_audio"] = other_sum / other_tokens
            if batches:
                record["valid_ctc_loss"] = ctc_sum / batches  # mean over batches
            if summary_batches:
                record["valid_summary_loss"] = summary_sum / summary_batches  # mean over batches
            for f, right, labelled in zip(tasks.TAG_FIELDS, hits[::2], hits[1::2]):
                if labelled:
                    record[f"valid_summary_acc_{f}"] = right / labelled  # the summary's own best tag
            if ctc_words:
                record["valid_ctc_wer"] = ctc_errors / ctc_words  # the adaptor's greedy CTC transcripts
            self._log(record)
        return value

    def save_checkpoint(self) -> Path | None:
        model_state = self._model_state()  # collective under FSDP: every rank takes part
        optim_state = self._optimizer_state() if self.info.engine != "deepspeed" else None
        rng = [None] * self.info.world_size
        if self.info.world_size > 1:
            torch.distributed.all_gather_object(rng, state.rng_state())
        else:
            rng = [state.rng_state()]
        path = None
        if self.info.is_main:
            trainer_state = {
                "step": self.step, "epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch,
                "world_size": self.info.world_size, "engine": self.info.engine, "optimizer": optim_state,
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict() if self.scaler else None,
                "rng": rng,
            }
            path = state.save_training_checkpoint(self.out, self.step, self.model, trainer_state, model_state,
                                                  self.cfg.keep_last)
            self._log({"event": "checkpoint", "step": self.step, "path": str(path)})
        distributed.barrier(self.info)
        return path

    def _progress(self, total: int):
        if not self.info.is_main:
            return None
        try:
            from tqdm import tqdm
        except ImportError:
            return None
        return tqdm(total=total, initial=self.step, desc="train", dynamic_ncols=True, mininterval=1.0)

    def _log(self, record: dict) -> None:
        record = {**record, "time": round(time.time(), 3)}
        with open(self.metrics_file, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None and "step" in record:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "time"):
                    self.writer.add_scalar(key, value, record["step"])
        log.info("%s", record)
