"""Adaptor from 50 Hz encoder frames to 12.5 Hz LLM positions (DESIGN.md §1).

Causal convs (left padding only, so padded frames never leak into valid ones) → Linear + LayerNorm →
scaled interleaved sinusoids → pre-LN transformer (ReLU FFN, biased q/k/v) → LayerNorm → Linear to the LLM width.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from osum.config import AdaptorConfig


def interleaved_sinusoids(length: int, d: int) -> torch.Tensor:
    """ESPnet/WeNet table: even channels sin, odd channels cos."""
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * (-math.log(10000.0) / d))
    pe = torch.zeros(length, d)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div)
    return pe


def conv_lengths(lens: torch.Tensor, strides: list[int]) -> torch.Tensor:
    """Positions after the causal convs: ceil(len / stride) per conv."""
    for s in strides:
        lens = (lens + s - 1) // s
    return lens


class AdaptorLayer(nn.Module):
    def __init__(self, d: int, heads: int, ffn: int, dropout: float):
        super().__init__()
        self.attn_norm = nn.LayerNorm(d)
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))
        self.ffn_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, ffn)
        self.fc2 = nn.Linear(ffn, d)
        self.heads = heads
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        B, T, D = x.shape
        h = self.attn_norm(x)
        q, k, v = (p(h).view(B, T, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask).transpose(1, 2).reshape(B, T, D)
        x = x + self.dropout(self.out_proj(h))
        h = self.fc2(self.dropout(F.relu(self.fc1(self.ffn_norm(x)))))
        return x + self.dropout(h)


class Adaptor(nn.Module):
    def __init__(self, cfg: AdaptorConfig, input_dim: int, output_dim: int):
        super().__init__()
        d, k = cfg.d_model, cfg.conv_kernel
        self.strides = list(cfg.conv_strides)
        self.kernel = k
        dims = [input_dim] + [d] * len(self.strides)
        self.convs = nn.ModuleList(nn.Conv1d(dims[i], d, k, stride=s) for i, s in enumerate(self.strides))
        self.input_proj = nn.Linear(d, d)
        self.input_norm = nn.LayerNorm(d)
        # Not a parameter (never trained); stored only when the config asks (see AdaptorConfig.store_positions).
        self.register_buffer("positions", interleaved_sinusoids(cfg.max_positions, d), persistent=cfg.store_positions)
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(AdaptorLayer(d, cfg.num_heads, cfg.ffn_dim, cfg.dropout) for _ in range(cfg.num_layers))
        self.norm = nn.LayerNorm(d)
        self.proj = nn.Linear(d, output_dim)
        self.scale = math.sqrt(d)

    def forward(self, encoder_out: torch.Tensor, encoder_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """encoder_out (B, T', D_enc), encoder_lens (B,) → adaptor_out (B, T'', D_llm), adaptor_lens (B,)."""
        x = encoder_out.transpose(1, 2)  # (B, D_enc, T')
        for conv in self.convs:
            x = F.gelu(conv(F.pad(x, (self.kernel - 1, 0))))
        x = x.transpose(1, 2)  # (B, T'', D)
        lens = conv_lengths(encoder_lens, self.strides)
        if x.shape[1] > self.positions.shape[0]:
            raise ValueError(f"adaptor input of {x.shape[1]} positions exceeds max_positions {self.positions.shape[0]}")
        x = self.input_norm(self.input_proj(x))
        x = self.dropout(x * self.scale + self.positions[: x.shape[1]].to(x.dtype))
        keep = torch.arange(x.shape[1], device=x.device)[None, :] < lens[:, None]  # (B, T'')
        attn_mask = None if bool(keep.all()) else keep[:, None, None, :]
        for layer in self.layers:
            x = layer(x, attn_mask)
        return self.proj(self.norm(x)), lens


class LayerMix(nn.Module):
    """Adds lower encoder blocks' outputs to the top one's: each normalised, then through its own projection.

    The projections start at zero, so an adaptor trained on the top output alone starts out unchanged and
    learns to take from the lower blocks what its losses ask for (the voice: gender, age).
    """

    def __init__(self, layers: list[int], dim: int):
        super().__init__()
        self.layers = list(layers)
        # skip_init: no draw from the random stream, so adding the mix leaves every other part's init as it was
        self.projs = nn.ModuleList(nn.utils.skip_init(nn.Linear, dim, dim, bias=False) for _ in self.layers)
        for proj in self.projs:
            nn.init.zeros_(proj.weight)

    def forward(self, encoder_out: torch.Tensor, hidden: list[torch.Tensor]) -> torch.Tensor:
        if len(hidden) != len(self.projs):
            raise ValueError(f"LayerMix takes blocks {self.layers}, got {len(hidden)} hidden states")
        for proj, h in zip(self.projs, hidden):
            encoder_out = encoder_out + proj(F.layer_norm(h, h.shape[-1:]))
        return encoder_out


def weighted_stats(hidden: list[torch.Tensor], weights: torch.Tensor, min_count: float) -> torch.Tensor:
    """Mean and spread of each (B, T, D) block, layer-normed, every frame weighted by (B, T) `weights` (zero on
    padding): (B, 2 * D * blocks), float32. The weights' sum is floored at `min_count`."""
    mask = weights[..., None]
    count = mask.sum(1).clamp(min=min_count)
    stats = []
    for h in hidden:
        h = F.layer_norm(h.float(), h.shape[-1:])
        mean = (h * mask).sum(1) / count
        var = (((h - mean[:, None]) ** 2) * mask).sum(1) / count
        stats += [mean, (var + 1e-6).sqrt()]  # the epsilon keeps the gradient finite for a one-frame input
    return torch.cat(stats, -1)


class VoiceSummary(nn.Module):
    """One LLM position from the whole utterance: each chosen block's output, normalised per frame, pooled to
    its mean and standard deviation over the valid frames, projected to the LLM width and normalised to the
    scale of its embeddings.

    The projection starts at zero, so the position begins as a learned constant (like speech-begin) and the
    pooled voice enters it as the tags' losses ask. Padding never reaches it: only valid frames are pooled.

    `heads` are linear classifiers over the same pooled statistics, one per tag field (name → number of
    labels), fitted after training (osum/model/tag_heads.py), not learned by it: the position's own tag scores
    follow what the training audio holds, and a field with few distinct sources (the vocal events: about a
    hundred clips) is learned by heart; a regularised linear fit on the frozen encoder's statistics generalises
    further. The statistics depend on the encoder alone, so a head stays valid while the encoder is frozen.

    `locator` (with `locator_layer`, one of `layers`) scores each frame of that block for a short sound (a vocal
    event); `pool(..., located=True)` weights the frames by its probabilities, so a head can read the sound's
    statistics rather than the whole utterance's. It is fitted after training too, on labelled sound spans.
    `located` names the field whose head reads those statistics, `located_dim` their width when they are not
    pooled from the summary's own blocks (a crop read by later blocks: SpeechLLM.located_stats).
    """

    def __init__(self, layers: list[int], enc_dim: int, llm_dim: int, heads: dict[str, int] | None = None,
                 locator_layer: int | None = None, located: str | None = None, located_dim: int | None = None):
        super().__init__()
        self.layers = list(layers)
        if locator_layer is not None and locator_layer not in self.layers:
            raise ValueError(f"the locator reads block {locator_layer}, which the summary does not pool "
                             f"(summary_layers {self.layers})")
        self.locator_layer = locator_layer
        self.stats_dim = 2 * enc_dim * len(self.layers)
        # skip_init: no draw from the random stream (see LayerMix); `base` and `norm` are set by the caller
        self.proj = nn.utils.skip_init(nn.Linear, self.stats_dim, llm_dim, bias=False)
        nn.init.zeros_(self.proj.weight)
        self.base = nn.Parameter(torch.zeros(llm_dim))
        self.norm = nn.LayerNorm(llm_dim)
        self.located = located
        self.located_dim = self.stats_dim if located_dim is None else located_dim
        self.heads = nn.ModuleDict({f: nn.utils.skip_init(nn.Linear, self.head_dim(f), n)
                                    for f, n in (heads or {}).items()})
        self.locator = None
        if locator_layer is not None:
            self.locator = nn.utils.skip_init(nn.Linear, enc_dim, 1)
        for head in [*self.heads.values(), *([self.locator] if self.locator is not None else [])]:
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def head_dim(self, field: str) -> int:
        """The width of the statistics `field`'s head reads."""
        return self.located_dim if field == self.located else self.stats_dim

    def forward(self, hidden: list[torch.Tensor], lens: torch.Tensor) -> torch.Tensor:
        """hidden: the blocks' outputs (B, T', D_enc) each, lens (B,) valid frames → (B, D_llm)."""
        return self.project(self.pool(hidden, lens))

    def project(self, stats: torch.Tensor) -> torch.Tensor:
        """(B, stats_dim) pooled statistics → (B, D_llm) the position."""
        return self.norm(self.proj(stats.to(self.proj.weight.dtype)) + self.base)

    def pool(self, hidden: list[torch.Tensor], lens: torch.Tensor, located: bool = False) -> torch.Tensor:
        """The pooled statistics the position is projected from: (B, 2 * D_enc * blocks), float32. `located`:
        each valid frame weighted by the locator's probability (`frame_weights`) instead of all alike."""
        if len(hidden) != len(self.layers):
            raise ValueError(f"VoiceSummary takes blocks {self.layers}, got {len(hidden)} hidden states")
        T = hidden[0].shape[1]
        weights = (torch.arange(T, device=lens.device)[None, :] < lens[:, None]).float()  # (B, T')
        if located:
            weights = weights * self.frame_weights(hidden, lens)
        # a frame count; located, the weights' sum, which may be far below one frame where nothing sounds like the
        # event (the weighted statistics are still those of the frames the locator weighs most)
        return weighted_stats(hidden, weights, min_count=torch.finfo(torch.float32).tiny if located else 1)

    def frame_weights(self, hidden: list[torch.Tensor], lens: torch.Tensor) -> torch.Tensor:
        """(B, T') the locator's score of each frame as a probability of belonging to the sound it was fitted on
        (calibrated to its fit, which saw twice as many frames outside the sound as inside); 0 past an item's end."""
        if self.locator is None:
            raise ValueError("this voice summary has no frame locator (adaptor.locator_layer)")
        h = hidden[self.layers.index(self.locator_layer)].float()
        scores = F.linear(F.layer_norm(h, h.shape[-1:]), self.locator.weight.float(), self.locator.bias.float())
        keep = torch.arange(h.shape[1], device=lens.device)[None, :] < lens[:, None]
        return torch.sigmoid(scores[..., 0]) * keep

    def crop(self, hidden: list[torch.Tensor], lens: torch.Tensor, window: int
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The locator block's frames within `window` of each item's highest-scoring frame (fewer at the item's
        edges), left-aligned: frames (B, W, D_enc), their locator weights (B, W, 0 where not valid) and which are
        valid (B, W), W = min(2 * window + 1, T')."""
        weights = self.frame_weights(hidden, lens)
        frames = hidden[self.layers.index(self.locator_layer)]
        peak = weights.argmax(-1)  # a valid frame: the weights are 0 past each item's end and above 0 before it
        first, last = (peak - window).clamp(min=0), torch.minimum(peak + window + 1, lens)
        index = first[:, None] + torch.arange(min(2 * window + 1, frames.shape[1]), device=lens.device)
        valid = index < last[:, None]
        index = index.clamp(max=frames.shape[1] - 1)
        picked = frames.gather(1, index[..., None].expand(-1, -1, frames.shape[-1]))
        return picked, weights.gather(1, index) * valid, valid

    def head_scores(self, stats: torch.Tensor, field: str) -> torch.Tensor:
        """(B, head_dim(field)) statistics → (B, labels) scores of the field's fitted head."""
        head = self.heads[field]  # in float32 whatever the model's dtype (see checkpoint._keep_fp32)
        return F.linear(stats.float(), head.weight.float(), head.bias.float())
