"""Training loop on the tiny model: loss goes down, exact resume, overfit to exact targets, schedules,
checkpoint rotation, averaging and LoRA-merged export."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
import torch

from osum import tasks
from osum.config import OptimConfig, TrainConfig
from osum.data.pipeline import AudioLayout
from osum.evaluate import metrics, normalize
from osum.model import checkpoint
from osum.train import state
from osum.train import loop
from osum.train.loop import Trainer, lr_factor, resolve_precision
from tests.conftest import tiny_config

TARGETS = [
    ("hello world", "male"), ("good morning", "female"), ("see you soon", "male"), ("thank you", "female"),
    ("it is raining", "male"), ("call me later", "female"), ("open the door", "male"), ("read a book", "female"),
]
SPEC = tasks.parse_spec("asr+sgc")
PROMPT = tasks.default_prompt(SPEC)


def fake_loader(batch_size: int = 4, voices: bool = False):
    """Deterministic stand-in for osum.data.pipeline.build_loader: 8 utterances of random features,
    shuffled per epoch, split across ranks. `voices`: each utterance's frames share a random offset of their
    own, as a voice colours every frame (pooled over time, plain noise looks the same in every utterance)."""

    def build(data, split, prompts, n_mels, epoch, rank, world_size, layout=None):
        feats = [torch.randn(60 + 7 * i, n_mels, generator=torch.Generator().manual_seed(i)) for i in range(len(TARGETS))]
        if voices:
            feats = [f + torch.randn(n_mels, generator=torch.Generator().manual_seed(100 + i)) for i, f in enumerate(feats)]
        order = torch.randperm(len(TARGETS), generator=torch.Generator().manual_seed(epoch)).tolist()
        if split == "valid":
            order = list(range(len(TARGETS)))
        order = order[rank::world_size]
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            target_ids = [
                prompts.target_ids(tasks.format_target(SPEC, tasks.Result(transcript=t, gender=g)))
                for t, g in (TARGETS[i] for i in idx)
            ]
            yield {
                "keys": [f"utt{i}" for i in idx],
                "features": torch.nn.utils.rnn.pad_sequence([feats[i] for i in idx], batch_first=True),
                "feature_lens": torch.tensor([feats[i].shape[0] for i in idx]),
                "prompt_ids": [prompts.prompt_ids(PROMPT) for _ in idx],
                "target_ids": target_ids,
                "transcript_ids": [prompts.encode(TARGETS[i][0]) for i in idx],
                "tasks": [str(SPEC)] * len(idx),
                "labels": [{"gender": TARGETS[i][1]} for i in idx],
                "audio_seconds": sum(feats[i].shape[0] for i in idx) / 100,
                "num_target_tokens": sum(len(t) for t in target_ids),
            }

    return build


@dataclass
class NoData:
    """Data settings for the fake loader, which ignores them."""

    valid: list = field(default_factory=list)


def train_config(tmp_path, *overrides: str, **kwargs) -> TrainConfig:
    optim = OptimConfig(lr=3e-3, warmup_steps=5, schedule="constant")
    base = dict(model=tiny_config(*overrides), data=NoData(), optim=optim,
                out_dir=str(tmp_path / "run"), max_steps=30, save_every=10, keep_last=2, log_every=1, tensorboard=False)
    return TrainConfig(**{**base, **kwargs})


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)  # bit-exact reruns: reductions do not depend on thread scheduling


def test_loss_drops_and_resume_is_exact(tmp_path):
    full = Trainer(train_config(tmp_path / "a"), fake_loader()).train()
    losses = [r["loss"] for r in full]
    assert len(losses) == 30 and losses[-1] <= 0.7 * losses[0], losses

    cfg = train_config(tmp_path / "b")
    first = Trainer(cfg, fake_loader()).train(until=10)
    assert [r["loss"] for r in first] == pytest.approx(losses[:10], abs=1e-6)
    resumed = Trainer(cfg, fake_loader())
    assert resumed.step == 10
    rest = resumed.train()
    assert [r["step"] for r in rest] == list(range(11, 31))
    assert max(abs(a["loss"] - b) for a, b in zip(rest, losses[10:])) <= 1e-6

    ckpts = [p.name for p in state.checkpoint_dirs(cfg.out_dir)]
    assert ckpts == ["step_00000020", "step_00000030"]  # keep_last=2
    events = [json.loads(line) for line in open(tmp_path / "b" / "run" / "metrics.jsonl")]
    assert any(e.get("event") == "resume" and e["step"] == 10 for e in events)


def test_overfit_generates_exact_targets(tmp_path):
    cfg = train_config(tmp_path, "adaptor.dropout=0.0", "lora.dropout=0.0", max_steps=120, save_every=0)
    cfg.optim.lr = 5e-3
    trainer = Trainer(cfg, fake_loader(batch_size=8))
    records = trainer.train()
    model = trainer.model.eval()
    batch = next(iter(fake_loader(batch_size=8)(None, "valid", model.prompts, 80, 0, 0, 1)))
    texts = model.generate(batch["features"], batch["feature_lens"], batch["prompt_ids"])
    expected = [tasks.format_target(SPEC, tasks.Result(transcript=t, gender=g)) for t, g in TARGETS]
    assert texts == expected, (records[-1], texts)
    assert [tasks.parse(t, SPEC).gender for t in texts] == [g for _, g in TARGETS]
    # validation also scores each target with another utterance's audio: a model that listens does worse there
    trainer.cfg.data = NoData(valid=["fake"])
    trainer.validate()
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["valid_loss_other_audio"] > last["valid_loss"] + 1.0, last


def test_ctc_weight_adds_the_adaptor_ctc_loss(tmp_path):
    """With ctc_weight the adaptor's CTC loss is logged and learned; the logged loss stays the LLM's alone."""
    cfg = train_config(tmp_path, max_steps=40, save_every=0, ctc_weight=1.0)
    cfg.optim.lr = 5e-3
    trainer = Trainer(cfg, fake_loader(batch_size=8))
    records = trainer.train()
    ctc = [r["ctc_loss"] for r in records]
    assert ctc[-1] < 0.5 * ctc[0], ctc
    batch = next(iter(fake_loader(batch_size=8)(None, "valid", trainer.model.prompts, 80, 0, 0, 1)))
    with torch.no_grad():
        out = trainer.model.eval()(batch["features"], batch["feature_lens"], batch["prompt_ids"], batch["target_ids"])
    assert out.ctc_loss is None  # only asked for with transcripts
    trainer.cfg.data = NoData(valid=["fake"])
    trainer.validate()
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0 < last["valid_ctc_loss"] < ctc[0], last
    assert 0 <= last["valid_ctc_wer"] <= 1.5, last  # word errors of the greedy CTC transcripts
    # ... the same as scoring the model's greedy CTC transcripts of the valid batches by hand
    errors = words = 0
    for b in fake_loader(batch_size=8)(None, "valid", trainer.model.prompts, 80, 0, 0, 1):
        with torch.no_grad():
            adaptor_out, lens = trainer.model.eval().embed_audio(b["features"], b["feature_lens"])
            hyps = trainer.model.ctc_greedy(trainer.model.ctc_logits(adaptor_out), lens)
        for ref, hyp in zip(b["transcript_ids"], hyps):
            ref_words = trainer.model.tokenizer.decode(ref).split()
            errors += metrics.edit_counts(ref_words, normalize.basic(trainer.model.tokenizer.decode(hyp)).split()).errors
            words += len(ref_words)
    assert last["valid_ctc_wer"] == pytest.approx(errors / words)
    with pytest.raises(ValueError, match="ctc_weight"):
        train_config(tmp_path, ctc_weight=-1.0)
    with pytest.raises(ValueError, match="nothing to train"):
        train_config(tmp_path, lm_weight=0.0)


def test_summary_weight_teaches_the_summary_position_the_tags(tmp_path):
    """With summary_weight the voice summary's loss is logged and learned: afterwards the summary position of
    each training utterance is nearest to the LLM's embedding of its own gender tag."""
    cfg = train_config(tmp_path, "adaptor.summary_layers=[0,1]", max_steps=40, save_every=0, summary_weight=1.0)
    layouts = set()

    def loader(*args):
        layouts.add(args[7])  # the model's layout, for the data pipeline's length counts
        return fake_loader(batch_size=8, voices=True)(*args)

    trainer = Trainer(cfg, loader)
    records = trainer.train()
    assert layouts == {AudioLayout((1, 2, 2), 3)}  # the summary adds a position to begin and end
    losses = [r["summary_loss"] for r in records]
    assert losses[-1] < 0.2 * losses[0], losses
    model = trainer.model.eval()
    batch = next(iter(fake_loader(batch_size=8, voices=True)(None, "valid", model.prompts, 80, 0, 0, 1)))
    with torch.no_grad():
        positions, _ = model.embed_audio(batch["features"], batch["feature_lens"])
        tags = model.tag_vectors("gender").float()
        guess = (positions[:, 0].float() @ (tags - tags.mean(0)).T).argmax(-1).tolist()
    assert [tasks.LABELS["gender"][g] for g in guess] == [g for _, g in TARGETS]
    # validation logs the summary's own accuracy per labelled field: here every utterance is right
    trainer.cfg.data = NoData(valid=["fake"])
    trainer.validate()
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["valid_summary_acc_gender"] == 1.0 and "valid_summary_acc_emotion" not in last, last
    with pytest.raises(ValueError, match="summary_layers"):
        train_config(tmp_path, summary_weight=1.0)


def test_ctc_only_warm_up_skips_the_llm(tmp_path):
    """lm_weight=0: the LLM never runs in a training step, the CTC loss drops, validation still scores the LLM."""
    with pytest.raises(ValueError, match="disable lora"):
        train_config(tmp_path, ctc_weight=1.0, lm_weight=0.0)  # the tiny preset has LoRA on
    cfg = train_config(tmp_path, "lora.enabled=false", max_steps=20, save_every=0, ctc_weight=1.0, lm_weight=0.0)
    trainer = Trainer(cfg, fake_loader(batch_size=8))
    calls = []
    decoder = trainer.model.base_llm.get_decoder()
    decoder.register_forward_hook(lambda *args: calls.append(1))
    records = trainer.train()
    assert calls == [] and all("loss" not in r for r in records)
    assert records[-1]["ctc_loss"] < 0.7 * records[0]["ctc_loss"], [r["ctc_loss"] for r in records]
    trainer.cfg.data = NoData(valid=["fake"])
    trainer.validate()
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert calls and last["valid_loss"] > 0 and last["valid_ctc_loss"] > 0


def test_lr_schedules():
    inv = lr_factor(OptimConfig(warmup_steps=4, schedule="inverse_sqrt"), 100)
    assert [inv(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert inv(15) == pytest.approx(0.5)  # sqrt(4 / 16)
    cos = lr_factor(OptimConfig(warmup_steps=0, schedule="cosine", min_lr_ratio=0.1), 10)
    assert cos(9) == pytest.approx(0.1) and cos(4) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(0.5 * torch.pi)).item()))
    with pytest.raises(ValueError, match="schedule"):
        lr_factor(OptimConfig(schedule="linear", warmup_steps=0), 10)(3)


def test_nothing_trainable_is_an_error(tmp_path):
    cfg = train_config(tmp_path, "adaptor.trainable=false", "lora.enabled=false")
    with pytest.raises(ValueError, match="nothing to train"):
        Trainer(cfg, fake_loader())


def test_init_from_average_and_export(tmp_path):
    cfg = train_config(tmp_path, max_steps=20, save_every=10)
    Trainer(cfg, fake_loader()).train()
    dirs = state.checkpoint_dirs(cfg.out_dir)
    assert len(dirs) == 2

    avg = state.average(dirs, tmp_path / "avg")
    with torch.no_grad():
        a, b, m = (checkpoint.load(d) for d in (*dirs, avg))
        for (name, pa), pb, pm in zip(a.trainable_parameters().items(), b.trainable_parameters().values(),
                                      m.trainable_parameters().values()):
            assert torch.allclose(pm, (pa + pb) / 2, atol=1e-6), name

    # Stage 2 starts from stage 1's weights: the next trainer's model equals the checkpoint before training.
    stage2 = train_config(tmp_path / "s2", "encoder.trainable=true", init_from=str(dirs[-1]), max_steps=1)
    t2 = Trainer(stage2, fake_loader())
    assert torch.equal(t2.model.adaptor.proj.weight, b.adaptor.proj.weight)

    # LoRA-merged export: a standalone directory whose outputs equal the unmerged model's.
    feats = torch.randn(2, 90, 80)
    lens = torch.tensor([90, 64])
    with torch.no_grad():
        before = b(feats, lens, ["p", "q"], ["hello world", "x"]).loss
    exported = state.export_merged(b, tmp_path / "export")
    meta = json.loads((exported / "config.json").read_text())
    assert meta["model"]["lora"]["enabled"] is False and "llm" in meta["stored_groups"] and "lora" not in meta["stored_groups"]
    merged = checkpoint.load(exported)
    with torch.no_grad():
        after = merged(feats, lens, ["p", "q"], ["hello world", "x"]).loss
    assert torch.allclose(before, after, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_losses(tmp_path):
    """Recomputing activations in the backward pass changes memory, not results."""
    common = ("adaptor.dropout=0.0", "lora.dropout=0.0", "encoder.trainable=true")
    plain = Trainer(train_config(tmp_path / "a", *common, max_steps=3, save_every=0), fake_loader()).train()
    ckpt = Trainer(train_config(tmp_path / "b", *common, "encoder.gradient_checkpointing=true",
                                "llm.gradient_checkpointing=true", max_steps=3, save_every=0), fake_loader()).train()
    assert [r["loss"] for r in ckpt] == pytest.approx([r["loss"] for r in plain], abs=1e-5)


def test_bf16_autocast_trains(tmp_path):
    fp32 = Trainer(train_config(tmp_path / "a", max_steps=6, save_every=0), fake_loader()).train()
    bf16 = Trainer(train_config(tmp_path / "b", max_steps=6, save_every=0, precision="bf16"), fake_loader()).train()
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in bf16)
    assert bf16[-1]["loss"] < bf16[0]["loss"]
    assert bf16[0]["loss"] == pytest.approx(fp32[0]["loss"], rel=0.02)  # same model, bf16 rounding only


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_follows_the_hardware(monkeypatch, native):
    """auto: bf16 only where it is computed natively; a CPU without it stays in fp32 (emulated bf16 matmuls are
    several times slower there), an older GPU gets fp16."""
    monkeypatch.setattr(loop, "cpu_has_native_bf16", lambda: native)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: native)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_precision("auto", cpu) == ("bf16" if native else "fp32")
    assert resolve_precision("auto", cuda) == ("bf16" if native else "fp16")
    assert [resolve_precision(p, cpu) for p in ("fp32", "bf16")] == ["fp32", "bf16"]  # an explicit choice is kept
    assert resolve_precision("fp16", cuda) == "fp16"
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        resolve_precision("fp16", cpu)
    with pytest.raises(ValueError, match="'half' is not one of auto, fp32, bf16, fp16"):
        resolve_precision("half", cpu)


def test_explicit_bf16_on_a_cpu_without_it_warns(monkeypatch, caplog):
    for native, warned in ((True, False), (False, True)):
        monkeypatch.setattr(loop, "cpu_has_native_bf16", lambda: native)
        caplog.clear()
        with caplog.at_level("WARNING", logger="osum.train.loop"):
            resolve_precision("bf16", torch.device("cpu"))
            resolve_precision("auto", torch.device("cpu"))
        # once, for the explicit bf16 alone: auto never warns
        assert sum("precision=auto picks fp32" in r.message for r in caplog.records) == int(warned)


def test_cpu_bf16_probe_reads_torch_and_defaults_to_no(monkeypatch):
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, name, lambda: False, raising=False)
    assert loop.cpu_has_native_bf16() is False
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert loop.cpu_has_native_bf16() is True
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.delattr(torch.cpu, name)
    assert loop.cpu_has_native_bf16() is False  # a torch without the private probes: fp32, the safe choice


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_trains_as_the_precision_it_picks(tmp_path, monkeypatch, native):
    monkeypatch.setattr(loop, "cpu_has_native_bf16", lambda: native)
    picked = "bf16" if native else "fp32"
    auto = Trainer(train_config(tmp_path / "a", max_steps=3, save_every=0, precision="auto"), fake_loader()).train()
    same = Trainer(train_config(tmp_path / "b", max_steps=3, save_every=0, precision=picked), fake_loader()).train()
    assert [r["loss"] for r in auto] == [r["loss"] for r in same]
    events = [json.loads(line) for line in open(tmp_path / "a" / "run" / "metrics.jsonl")]
    assert {"requested": "auto", "used": picked} == {k: events[0][k] for k in ("requested", "used")}


def test_exact_resume_on_the_real_pipeline_with_augmentation(tmp_path):
    """Shuffle buffer, speed perturbation and SpecAugment: replaying the epoch to the saved position and
    restoring the RNG states reproduces the uninterrupted run's losses."""
    from osum.config import DataConfig, DatasetConfig
    from tests.data_fixtures import make_dataset

    listing = make_dataset(tmp_path, n=12, tasks=("asr+sgc", "asr+ser"))
    data = DataConfig(train=[DatasetConfig(name="d", shards=str(listing))], speed_perturb=[0.9, 1.0, 1.1],
                      spec_augment=True, shuffle_buffer=8, sort_buffer=4, max_batch_size=3, max_batch_frames=4000)
    full = Trainer(train_config(tmp_path / "a", data=data, max_steps=12, save_every=6)).train()
    cfg = train_config(tmp_path / "b", data=data, max_steps=12, save_every=6)
    first = Trainer(cfg).train(until=6)
    rest = Trainer(cfg).train()
    losses = [r["loss"] for r in first + rest]
    assert max(abs(a - r["loss"]) for a, r in zip(losses, full)) <= 1e-6
    events = [json.loads(line) for line in open(tmp_path / "a" / "run" / "metrics.jsonl")]
    assert any(e.get("event") == "epoch_end" and e["data"] for e in events)  # the data summary is recorded


def test_init_from_a_stage_without_lora_into_one_with_it(tmp_path):
    """The tiny LLM is stored (random base): its tensors change names under peft and must still match."""
    cfg = train_config(tmp_path / "s1", "lora.enabled=false", "llm.trainable=true", max_steps=2, save_every=2)
    Trainer(cfg, fake_loader()).train()
    stage1 = state.latest(cfg.out_dir)
    stage2 = Trainer(train_config(tmp_path / "s2", init_from=str(stage1), max_steps=1), fake_loader())
    trained = checkpoint.load(stage1)
    assert torch.equal(stage2.model.base_llm.model.embed_tokens.weight, trained.base_llm.model.embed_tokens.weight)
    q_before = trained.base_llm.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(stage2.model.base_llm.model.layers[0].self_attn.q_proj.base_layer.weight, q_before)
