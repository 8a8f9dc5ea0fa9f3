"""Whisper audio encoder for variable-length input, with Hugging Face `WhisperEncoder` parameter names.

HF's encoder insists on 3000 frames (30 s of padding); this one runs on the true length, masks padded keys
in a batch, and so gives each item the same output alone or batched.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from osum.config import EncoderConfig


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Whisper's position table: [sin | cos] concatenated (not interleaved)."""
    inc = torch.log(torch.tensor(max_timescale)) / (channels // 2 - 1)
    inv = torch.exp(-inc * torch.arange(channels // 2))
    t = torch.arange(length)[:, None] * inv[None, :]
    return torch.cat([t.sin(), t.cos()], dim=1)


def output_lengths(feature_lens: torch.Tensor) -> torch.Tensor:
    """Frames after the stride-2 conv stem: (T - 1) // 2 + 1 (50 Hz)."""
    return (feature_lens - 1) // 2 + 1


class EncoderLayer(nn.Module):
    def __init__(self, d: int, heads: int, ffn: int):
        super().__init__()
        self.self_attn = nn.Module()
        self.self_attn.q_proj = nn.Linear(d, d)
        self.self_attn.k_proj = nn.Linear(d, d, bias=False)
        self.self_attn.v_proj = nn.Linear(d, d)
        self.self_attn.out_proj = nn.Linear(d, d)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, ffn)
        self.fc2 = nn.Linear(ffn, d)
        self.final_layer_norm = nn.LayerNorm(d)
        self.heads = heads

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        B, T, D = x.shape
        a = self.self_attn
        h = self.self_attn_layer_norm(x)
        q, k, v = (proj(h).view(B, T, self.heads, -1).transpose(1, 2) for proj in (a.q_proj, a.k_proj, a.v_proj))
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, H, T, Dh)
        x = x + a.out_proj(h.transpose(1, 2).reshape(B, T, D))
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))


class WhisperAudioEncoder(nn.Module):
    def __init__(self, cfg: EncoderConfig, n_mels: int):
        super().__init__()
        d = cfg.d_model
        self.conv1 = nn.Conv1d(n_mels, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(cfg.max_positions, d)
        self.embed_positions.weight.data.copy_(sinusoids(cfg.max_positions, d))
        self.embed_positions.requires_grad_(False)
        self.layers = nn.ModuleList(EncoderLayer(d, cfg.num_heads, cfg.ffn_dim) for _ in range(cfg.num_layers))
        self.layer_norm = nn.LayerNorm(d)
        self.gradient_checkpointing = cfg.gradient_checkpointing

    @property
    def max_frames(self) -> int:
        return 2 * self.embed_positions.num_embeddings

    def forward(self, features: torch.Tensor, feature_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features (B, T, n_mels) zero-padded, feature_lens (B,) → encoder_out (B, T', D), encoder_lens (B,)."""
        out, lens, _ = self.forward_layers(features, feature_lens, ())
        return out, lens

    def forward_layers(self, features: torch.Tensor, feature_lens: torch.Tensor,
                       layers: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """`forward`, plus the outputs of the blocks numbered in `layers` (0 = the first; before the final norm)."""
        bad = [i for i in layers if not 0 <= i < len(self.layers)]
        if bad:
            raise ValueError(f"encoder blocks {bad} do not exist: the encoder has blocks 0-{len(self.layers) - 1}")
        B, T, _ = features.shape
        if T > self.max_frames:
            raise ValueError(
                f"encoder input has {T} frames ({T / 100:.1f} s); the encoder takes at most {self.max_frames}: "
                "split long audio first (osum.infer.segment)"
            )
        frame_mask = torch.arange(T, device=features.device)[None, :] < feature_lens[:, None]  # (B, T)
        x = F.gelu(self.conv1(features.transpose(1, 2)))  # (B, D, T)
        # Zero conv1 outputs past each item's end: alone, conv2 would see its zero padding there.
        x = x * frame_mask[:, None, :].to(x.dtype)
        x = F.gelu(self.conv2(x)).transpose(1, 2)  # (B, T', D)
        encoder_lens = output_lengths(feature_lens)
        x = x + self.embed_positions.weight[: x.shape[1]].to(x.dtype)
        keep = torch.arange(x.shape[1], device=x.device)[None, :] < encoder_lens[:, None]  # (B, T')
        attn_mask = None if bool(keep.all()) else keep[:, None, None, :]
        kept = {}
        for i, layer in enumerate(self.layers):
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, attn_mask, use_reentrant=False)
            else:
                x = layer(x, attn_mask)
            if i in layers:
                kept[i] = x
        return self.layer_norm(x), encoder_lens, [kept[i] for i in layers]
