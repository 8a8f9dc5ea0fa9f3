"""Tag heads over the voice summary's pooled statistics: the linear fit, grouped cross-validation, installing a
head in a model, reading labels off it, saving and reloading it, and `osum export --fit-tag-heads`."""
from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch

from osum import tasks
from osum.audio import load_audio, log_mel_spectrogram
from osum.model.tag_heads import cross_validate, fit_linear, fit_model_head, pooled_stats
from tests.conftest import tiny_config


def _clusters(n: int, seed: int, dim: int = 12, classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows around three fixed centres; `seed` draws the noise only."""
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(0)) * 3
    y = torch.arange(n) % classes
    return centres[y] + torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), y


def test_fit_linear_separates_clusters_and_ignores_feature_scale():
    x, y = _clusters(90, seed=1)
    weight, bias = fit_linear(x, y, 3)
    assert weight.shape == (3, 12) and bias.shape == (3,)
    assert ((x @ weight.T + bias).argmax(-1) == y).all()
    held_x, held_y = _clusters(60, seed=2)  # new draws around the same centres: it generalises
    assert ((held_x @ weight.T + bias).argmax(-1) == held_y).float().mean() > 0.9
    # standardised first: features scaled by 0.01 to 1000 and shifted give the same decisions
    scaled = x * torch.linspace(0.01, 1000, 12) + 5.0
    w2, b2 = fit_linear(scaled, y, 3)
    assert torch.equal((scaled @ w2.T + b2).argmax(-1), (x @ weight.T + bias).argmax(-1))
    # a larger penalty keeps the weights smaller
    w_big, _ = fit_linear(x, y, 3, reg=1.0)
    assert w_big.norm() < weight.norm()
    with pytest.raises(ValueError, match="as many labels"):
        fit_linear(x, y[:5], 3)


def test_grouped_cross_validation_exposes_memorised_groups():
    """Labels that belong to groups (a clip each), not to anything the features share: per utterance, the other
    utterances of a group give the answer away; with groups held out together the fit is at chance."""
    g = torch.Generator().manual_seed(3)
    groups = [f"clip{i}" for i in range(40) for _ in range(6)]
    names = sorted(set(groups))
    group_vec = {name: torch.randn(128, generator=g) for name in names}
    group_label = {name: i % 2 for i, name in enumerate(names)}
    x = torch.stack([group_vec[name] + 0.1 * torch.randn(128, generator=g) for name in groups])
    y = torch.tensor([group_label[name] for name in groups])
    per_utterance = cross_validate(x, y, [str(i) for i in range(len(groups))], 2)
    grouped = cross_validate(x, y, groups, 2)
    assert per_utterance > 0.95
    assert grouped < 0.7
    assert cross_validate(x, y, ["one"] * len(groups), 2) is None  # one fold: nothing to hold out


def _write_clips(folder, n: int) -> list[dict]:
    """Clips of two kinds the tiny encoder tells apart: low tones ("laugh") and noise bursts ("cough")."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        t = np.arange(int(16000 * rng.uniform(0.6, 1.4))) / 16000
        if i % 2 == 0:
            wav, label = 0.3 * np.sin(2 * np.pi * rng.uniform(150, 300) * t), "laugh"
        else:
            wav, label = 0.3 * rng.standard_normal(len(t)), "cough"
        path = folder / f"c{i}.wav"
        sf.write(path, wav.astype(np.float32), 16000)
        rows.append({"key": f"c{i}", "audio": str(path), "event": label, "extra": {"clip": f"src{i // 2}"}})
    return rows


@pytest.fixture
def summary_model():
    from osum.model.speech_llm import SpeechLLM

    torch.manual_seed(0)
    return SpeechLLM(tiny_config("adaptor.summary_layers=[0,1]")).eval()


def test_fitted_head_is_installed_read_batched_and_reloaded_exactly(tmp_path, summary_model):
    from osum.model import checkpoint

    rows = _write_clips(tmp_path, 12)
    sf.write(tmp_path / "long.wav", np.zeros(16000 * 31, np.float32), 16000)
    bad = [{"key": "nolabel", "audio": rows[0]["audio"]}, {"key": "odd", "audio": rows[0]["audio"], "event": "bark"},
           {"key": "long", "audio": str(tmp_path / "long.wav"), "event": "laugh"}]
    fit = fit_model_head(summary_model, "event", rows + bad, reg=1e-3, group_by="extra.clip")
    assert fit.rows == 12 and fit.train_accuracy == 1.0 and fit.cv_accuracy is not None
    assert fit.cv_groups == "extra.clip"
    assert fit.skipped == {"no event label": 1, "event label not in the vocabulary": 1,
                           "longer than one encoder pass": 1}
    assert summary_model.config.adaptor.tag_heads == ["event"]
    assert not any(p.requires_grad for p in summary_model.summary.heads.parameters())

    def labels(model, batch: list[dict]) -> list[str]:
        mels = [log_mel_spectrogram(load_audio(r["audio"])).T for r in batch]
        lens = torch.tensor([m.shape[0] for m in mels])
        padded = torch.nn.utils.rnn.pad_sequence(mels, batch_first=True)
        return [out["event"] for out in model.summary_labels(padded, lens, ["event", "gender"])]

    together = labels(summary_model, rows)
    assert together == [r["event"] for r in rows]  # the head, not the position's own (untrained) scores
    assert [labels(summary_model, [r])[0] for r in rows] == together  # batch == one by one
    stats = pooled_stats(summary_model, rows[:5], batch_size=2, window=3)  # batched, two windows
    for row, batched in zip(rows[:5], stats):
        assert torch.allclose(batched, pooled_stats(summary_model, [row])[0], atol=1e-5)

    out = checkpoint.save(summary_model, tmp_path / "model")
    again = checkpoint.load(out).eval()
    assert again.config.adaptor.tag_heads == ["event"]
    for key, tensor in summary_model.summary.heads.state_dict().items():
        assert torch.equal(again.summary.heads.state_dict()[key], tensor)
    assert labels(again, rows) == together


def test_head_errors_name_what_is_wrong(tmp_path, summary_model):
    from osum.model.speech_llm import SpeechLLM

    rows = _write_clips(tmp_path, 4)
    with pytest.raises(ValueError, match="at least two labels"):
        fit_model_head(summary_model, "event", [r for r in rows if r["event"] == "laugh"])
    with pytest.raises(ValueError, match="not a tag field"):
        fit_model_head(summary_model, "mood", rows)
    with pytest.raises(ValueError, match="voice summary"):
        fit_model_head(SpeechLLM(tiny_config()).eval(), "event", rows)
    with pytest.raises(ValueError, match="summary_layers"):
        SpeechLLM(tiny_config("adaptor.tag_heads=[event]"))
    with pytest.raises(ValueError, match="not tag fields"):
        SpeechLLM(tiny_config("adaptor.summary_layers=[0]", "adaptor.tag_heads=[mood]"))


def test_export_fits_a_head_and_decodes_with_it(tmp_path, summary_model, capsys):
    from osum.cli import main
    from osum.infer.engine import Engine
    from osum.model import checkpoint

    rows = _write_clips(tmp_path, 10)
    data = tmp_path / "ved.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = checkpoint.save(summary_model, tmp_path / "ckpt")
    assert main(["export", str(source), "--keep-lora", "--dtype", "bfloat16", "--out", str(tmp_path / "out"),
                 "--fit-tag-heads", f"event={data}", "--tag-head-reg", "0.001",
                 "--tag-head-groups", "extra.clip"]) == 0
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes["summary.heads.event.weight"] == "F32" and dtypes["summary.proj.weight"] == "BF16"
    err = capsys.readouterr().err
    assert "event head fitted on 10 utterances" in err and "held out together: extra.clip" in err
    model_cfg = json.loads((tmp_path / "out" / "config.json").read_text())["model"]
    assert model_cfg["adaptor"]["tag_heads"] == ["event"]
    assert model_cfg["generation"]["summary_tags"] == ["event"]
    exported = checkpoint.load(tmp_path / "out").eval()
    results = Engine(exported, max_batch_size=4).run([r["audio"] for r in rows], task="asr+ved")
    assert [r["labels"]["event"] for r in results] == [r["event"] for r in rows]
    with pytest.raises(SystemExit, match="FIELD=LIST"):
        main(["export", str(source), "--out", str(tmp_path / "x"), "--fit-tag-heads", str(data)])


def test_event_pooling_script_matches_the_heads_fit(tmp_path, summary_model, monkeypatch, capsys):
    """recipes/osum-tiny/event_pooling.py: its row for the released head's pooling is the export's own
    clip-held-out cross-validation (fit_model_head), and the oracle row pools only the event's span."""
    import runpy
    import sys
    from pathlib import Path

    import osum

    rows = _write_clips(tmp_path, 16)
    for row in rows:
        row["extra"] = {"event": {"clip": row["extra"]["clip"], "span": [0.0, 0.4]}}
    for name, part in (("train", rows[:12]), ("test", rows[12:])):
        (tmp_path / f"{name}_synth_ved.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    fit = fit_model_head(summary_model, "event", rows[:12], group_by="extra.event.clip")
    # the oracle, pooled here by the voice summary's own masked pooling over the span's 20 encoder frames (0.4 s)
    summary, stats = summary_model.summary, []
    for row in rows[:12]:
        mel = log_mel_spectrogram(load_audio(row["audio"])).T[None]
        with torch.no_grad():
            _, _, hidden = summary_model.encoder.forward_layers(mel, torch.tensor([mel.shape[1]]), summary.layers)
            stats.append(summary.pool(hidden, torch.tensor([20]))[0])
    groups = [row["extra"]["event"]["clip"] for row in rows[:12]]
    labels = torch.tensor([tasks.LABELS["event"].index(row["event"]) for row in rows[:12]])
    oracle = cross_validate(torch.stack(stats), labels, groups, len(tasks.LABELS["event"]))
    monkeypatch.setattr(osum, "load", lambda name, **kw: summary_model)
    monkeypatch.setattr(sys, "argv", ["event_pooling.py", "--data", str(tmp_path)])
    runpy.run_path(str(Path(__file__).resolve().parents[1] / "recipes" / "osum-tiny" / "event_pooling.py"),
                   run_name="__main__")
    printed = capsys.readouterr().out
    assert "12 training utterances (6 clips), blocks [0, 1]" in printed
    assert f"| whole utterance, mean + std (the released head) | {fit.cv_accuracy:.1%} |" in printed
    assert printed.rstrip().endswith(f"| the event's span only, mean + std (oracle) | {oracle:.1%} | – |")
