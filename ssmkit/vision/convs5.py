"""ConvS5 next-frame predictor (Smith et al., "Convolutional State Space Models", NeurIPS 2023).

    frames (batch, L, C, H, W)
      -> frame encoder: 3×3 conv + `downsample` stride-2 3×3 convs (GELU)   -> (batch, L, d_model, H/2^s, W/2^s)
      -> n_layers × [ x += GELU(ConvS5(LN(x)));  x += W2·GLU(W1·LN(x)) ]     (LN over channels, per pixel)
      -> decoder: `downsample` stride-2 transposed convs + 3×3 conv          -> logits of the next frame

Everything but the ConvS5 scan acts on one frame at a time, so the model is causal in time:
prediction t depends on frames 0..t only. `forward` runs the ConvS5 layers in parallel over time
(`convssm_scan`, teacher forcing); `condition` returns each layer's last state as well; `init_state`
and `step` (the protocol of `ssmkit.core.generation`) advance every layer by one frame from its state
(`convssm_step`), so `rollout` generates each new frame in O(1) time and memory regardless of how many
frames came before.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ssmkit.core.convssm import ConvS5Layer
from ssmkit.registry import register_model

__all__ = ["ConvS5Config", "ConvS5Predictor", "ConvS5Block",
           "convs5_moving_digits", "convs5_moving_digits_tiny"]


@dataclass
class ConvS5Config:
    """Sizes of a `ConvS5Predictor`. ssm_size is ConvS5's state size P (one of each conjugate pair)."""

    in_channels: int = 1
    d_model: int = 32
    ssm_size: int = 32
    n_layers: int = 2
    downsample: int = 2  # stride-2 convs in the encoder (latent = frame / 2**downsample)
    ff_mult: int = 2
    k_B: int = 3
    k_C: int = 3
    k_D: int = 3
    selective: bool = False
    dropout: float = 0.0


class ChannelNorm(nn.Module):
    """LayerNorm over the channels of each pixel of (..., C, H, W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x):
        return self.norm(x.movedim(-3, -1)).movedim(-1, -3)


class ConvS5Block(nn.Module):
    """Pre-norm residual ConvS5 layer followed by a pre-norm residual pointwise GLU feed-forward."""

    def __init__(self, cfg: ConvS5Config):
        super().__init__()
        d = cfg.d_model
        self.norm1 = ChannelNorm(d)
        self.ssm = ConvS5Layer(d, cfg.ssm_size, cfg.k_B, cfg.k_C, cfg.k_D, selective=cfg.selective)
        self.norm2 = ChannelNorm(d)
        self.ff_in = nn.Conv2d(d, 2 * cfg.ff_mult * d, 1)
        self.ff_out = nn.Conv2d(cfg.ff_mult * d, d, 1)
        self.drop = nn.Dropout(cfg.dropout)

    def _ff(self, x):  # x (n, d, h, w)
        return self.drop(self.ff_out(F.glu(self.ff_in(x), dim=1)))

    def forward(self, x, state=None):
        """x (batch, L, d, h, w) -> (x, last_state)."""
        y, last = self.ssm(self.norm1(x), state)
        x = x + self.drop(F.gelu(y))
        x = x + self._ff(self.norm2(x).flatten(0, 1)).unflatten(0, x.shape[:2])
        return x, last

    def init_state(self, batch: int, *, device=None, dtype=None):
        return self.ssm.init_state(batch, device=device, dtype=dtype)

    def step(self, x_t, state):
        """x_t (batch, d, h, w) -> (x_t, state)."""
        y, state = self.ssm.step(self.norm1(x_t), state)
        x_t = x_t + self.drop(F.gelu(y))
        return x_t + self._ff(self.norm2(x_t)), state


class ConvS5Predictor(nn.Module):
    """Next-frame predictor: see the module docstring. `forward(frames)` returns, for every t, the
    predicted frame t+1 (probabilities in [0, 1]; `logits=True` for pre-sigmoid values)."""

    def __init__(self, cfg: ConvS5Config | None = None, **overrides):
        super().__init__()
        cfg = ConvS5Config(**{**(vars(cfg) if cfg else {}), **overrides})
        self.config = cfg
        d, c = cfg.d_model, cfg.in_channels
        widths = [max(8, d // 2 ** (cfg.downsample - i)) for i in range(cfg.downsample)] + [d]
        enc = [nn.Conv2d(c, widths[0], 3, padding=1), nn.GELU()]
        for a, b in zip(widths[:-1], widths[1:]):
            enc += [nn.Conv2d(a, b, 3, stride=2, padding=1), nn.GELU()]
        if cfg.downsample == 0:
            enc += [nn.Conv2d(widths[0], d, 1)]
        self.encoder = nn.Sequential(*enc)
        self.blocks = nn.ModuleList(ConvS5Block(cfg) for _ in range(cfg.n_layers))
        self.norm = ChannelNorm(d)
        dec = []
        for a, b in zip(widths[::-1][:-1], widths[::-1][1:]):
            dec += [nn.ConvTranspose2d(a, b, 4, stride=2, padding=1), nn.GELU()]
        dec += [nn.Conv2d(widths[0], c, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)

    def _check(self, frames, step=False):
        n = 4 if step else 5
        f = 2 ** self.config.downsample
        if frames.dim() != n or frames.shape[-3] != self.config.in_channels or frames.shape[-1] % f or frames.shape[-2] % f:
            what = "(batch, C, H, W)" if step else "(batch, L, C, H, W)"
            raise ValueError(f"ConvS5Predictor expects frames {what} with C={self.config.in_channels} and H, W "
                             f"divisible by {f}; got {tuple(frames.shape)}")

    def _encode(self, frames):  # (n, C, H, W) -> (n, d, h, w)
        return self.encoder(frames)

    def _decode(self, x, logits):
        out = self.decoder(self.norm(x))
        return out if logits else torch.sigmoid(out)

    def condition(self, frames, states=None, logits=False):
        """Teacher-forced pass over frames (batch, L, C, H, W), in parallel over time; returns
        (predictions of frames 1..L (batch, L, C, H, W), per-layer last states). `states` continues
        from earlier frames."""
        self._check(frames)
        b, L = frames.shape[:2]
        x = self._encode(frames.flatten(0, 1)).unflatten(0, (b, L))
        states = [None] * len(self.blocks) if states is None else list(states)
        new = []
        for block, s in zip(self.blocks, states):
            x, last = block(x, s)
            new.append(last)
        return self._decode(x.flatten(0, 1), logits).unflatten(0, (b, L)), new

    def forward(self, frames, logits=False):
        return self.condition(frames, logits=logits)[0]

    def init_state(self, batch: int, *, device=None, dtype=None) -> list[torch.Tensor]:
        """Every layer's zero state, for frames of any size."""
        return [block.init_state(batch, device=device, dtype=dtype) for block in self.blocks]

    def step(self, frame, state):
        """One frame (batch, C, H, W) -> (prediction of the next frame, new per-layer states); O(1) in
        the number of frames seen so far. `state`: from `init_state`, `condition` or an earlier step."""
        self._check(frame, step=True)
        x = self._encode(frame)
        new = []
        for block, s in zip(self.blocks, state):
            x, s = block.step(x, s)
            new.append(s)
        return self._decode(x, logits=False), new

    @torch.no_grad()
    def rollout(self, context, n_future):
        """Condition on context (batch, k, C, H, W) in parallel, then generate n_future frames one at a
        time, feeding each prediction back through `step`. Returns (batch, n_future, C, H, W)."""
        preds, states = self.condition(context)
        frame = preds[:, -1]
        out = [frame]
        for _ in range(n_future - 1):
            frame, states = self.step(frame, states)
            out.append(frame)
        return torch.stack(out[:n_future], 1)


# ----------------------------------------------------------------------------------------------
# SSIM


# ----------------------------------------------------------------------------------------------
# registered configurations


@register_model
def convs5_moving_digits(**overrides) -> ConvS5Predictor:
    """ConvS5's Moving-MNIST configuration: 64×64 frames to a 16×16 latent, d_model 256, 8 layers,
    ssm_size 256 (P = 128 kept of the conjugate pairs), k_B = k_C = k_D = 3."""
    return ConvS5Predictor(ConvS5Config(in_channels=1, d_model=256, ssm_size=128, n_layers=8, downsample=2),
                           **overrides)


@register_model
def convs5_moving_digits_tiny(**overrides) -> ConvS5Predictor:
    """The CPU default of `ssmkit video`: 32×32 frames to an 8×8 latent, d_model 32, P 32, 2 layers."""
    return ConvS5Predictor(ConvS5Config(), **overrides)
