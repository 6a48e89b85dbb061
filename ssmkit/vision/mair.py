"""MaIR (CVPR 2025): image restoration with Mamba over nested S-shaped scans.

Layout of the published model (XLearning-SCU/2025-CVPR-MaIR, `mair_arch.py`):

    image - RGB mean -> conv_first 3x3 -> LayerNorm -> residual groups -> LayerNorm -> conv_after_body
    (+ long skip to conv_first) -> reconstruction (+ RGB mean)

A residual group is `depth` residual Mamba blocks and a 3x3 conv with a skip. A block is
    x = x * skip_scale1 + VMM(LN(x));   x = x * skip_scale2 + MLP(LN(x))
and VMM, the mixer, projects to (x, z), runs a depthwise 3x3 conv + SiLU on x, scans x along MaIR's
four nested S-shaped sequences (`ssmkit.vision.scan_orders.mair4`; odd blocks shift the stripes by
half a stripe) with one set of SSM parameters per sequence (one grouped `core.selective_scan` call),
weights the four outputs with Sequence Shuffle Attention (a sigmoid weight per image, channel and
sequence from the pooled outputs), sums them, then LayerNorm, gate with SiLU(z) and out_proj.

Reconstruction: "pixelshuffle" (classic SR: conv + LeakyReLU, conv + PixelShuffle per factor 2 or
one for 3, conv to RGB), "pixelshuffledirect" (lightweight SR: one conv + PixelShuffle) or "" (the
denoising model: the input plus a conv of the features). Inputs of any size are padded (reflect) to
a multiple of the stripe width and the output is cropped back.

`ssmkit.load_official("mair_sr_x2", path)` (or with a model in place of the name) loads a BasicSR
checkpoint of the official code (`params`; `weights_key="params_ema"` for the EMA weights), whose key
names `convert_official_mair` maps onto this module's.

ssmkit extensions (off in the published configs): `interp_init=True` initialises the model to output
bilinear upsampling of its input (the input itself for denoising), so short CPU runs learn a
correction; `VMM(scan="cross4", ssa=False)` is the MambaIR/VMamba peer mixer for comparisons.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

from ssmkit.core.layers import DropPath, drop_path_rates

from ssmkit.core.mamba import add_ssm_parameters
from ssmkit.core.scan import selective_scan
from ssmkit.registry import register_model, register_official
from ssmkit.vision.scan_orders import cross4, gather, mair4, merge

__all__ = ["MaIRConfig", "MaIR", "VMM", "MAIR_CONFIGS", "convert_official_mair"]

RGB_MEAN = (0.4488, 0.4371, 0.4040)  # DIV2K mean of the official models
UPSAMPLERS = ("pixelshuffle", "pixelshuffledirect", "")
_K = 4  # MaIR's four sequences


@dataclass
class MaIRConfig:
    """Hyper-parameters of a MaIR model (names as in the official options files)."""

    upscale: int = 2
    in_chans: int = 3
    embed_dim: int = 60
    depths: tuple[int, ...] = field(default=(6, 6, 6, 6))
    d_state: int = 16
    ssm_ratio: float = 1.5
    mlp_ratio: float = 2.0
    scan_len: int = 8  # NSS stripe width
    upsampler: str = "pixelshuffledirect"
    drop_path_rate: float = 0.1
    img_range: float = 1.0
    num_feat: int = 64  # channels of the classic-SR upsampler
    pad_to_stripe: bool = True
    interp_init: bool = False  # ssmkit extension: start as bilinear upsampling / the identity (see MaIR)
    backend: str | None = None  # selective-scan backend (None: the fastest available)

    def __post_init__(self):
        self.depths = tuple(int(d) for d in self.depths)
        if self.upsampler not in UPSAMPLERS:
            raise ValueError(f"MaIR upsampler must be one of {UPSAMPLERS}, got {self.upsampler!r}")
        if self.upsampler == "" and self.upscale != 1:
            raise ValueError(f"the denoising model (upsampler '') needs upscale 1, got {self.upscale}")
        if self.upsampler == "pixelshuffle" and self.upscale not in (2, 3, 4, 8):
            raise ValueError(f"upsampler 'pixelshuffle' supports upscale 2, 3, 4 or 8, got {self.upscale}")
        if self.upsampler == "pixelshuffledirect" and self.upscale < 1:
            raise ValueError(f"upscale must be at least 1, got {self.upscale}")
        if self.interp_init and self.upsampler == "pixelshuffle":
            raise ValueError("interp_init needs the 'pixelshuffledirect' upsampler or the denoising model")
        if self.scan_len < 2 or not self.depths or min(self.depths) < 1 or self.embed_dim < 1:
            raise ValueError(f"bad MaIR sizes: scan_len {self.scan_len} (>= 2), depths {self.depths}, "
                             f"embed_dim {self.embed_dim}")


class SequenceShuffleAttention(nn.Module):
    """MaIR's SSA: w[b, k, c] = sigmoid(sum_j W_c[k, j] * mean_hw(y_j[b, c]) + bias_c[k]).

    `proj` is the official grouped 1x1 conv (4E -> 4E, groups E) applied to the pooled outputs in
    channel-shuffled order (the four sequences' copies of channel c adjacent).
    """

    def __init__(self, d_inner: int):
        super().__init__()
        self.proj = nn.Conv2d(_K * d_inner, _K * d_inner, 1, groups=d_inner)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """pooled (batch, K, E) -> weights (batch, K, E)."""
        b, k, e = pooled.shape
        shuffled = pooled.transpose(1, 2).reshape(b, k * e, 1, 1)
        return torch.sigmoid(self.proj(shuffled)).view(b, e, k).transpose(1, 2)


class VMM(nn.Module):
    """MaIR's Mamba mixer on (batch, H, W, C) maps; see the module docstring.

    `scan="cross4"` with `ssa=False` turns it into the peer design, MambaIR's SS2D core (VMamba's
    four raster / column-major flattenings, outputs summed), for ablations and benchmarks.
    """

    def __init__(self, d_model: int, d_state: int = 16, expand: float = 2.0, d_conv: int = 3,
                 backend: str | None = None, scan: str = "nss", ssa: bool = True):
        super().__init__()
        if scan not in ("nss", "cross4"):
            raise ValueError(f"VMM scan must be 'nss' or 'cross4', got {scan!r}")
        self.scan = scan
        self.d_model, self.d_state = d_model, d_state
        self.d_inner = e = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16)
        self.backend = backend
        self.in_proj = nn.Linear(d_model, 2 * e, bias=False)
        self.conv2d = nn.Conv2d(e, e, d_conv, padding=(d_conv - 1) // 2, groups=e)
        # K sets of x_proj / dt_proj / A / D with mamba_ssm's init, stacked under the official names
        sets = []
        for _ in range(_K):
            holder = nn.Module()
            add_ssm_parameters(holder, ("x", "dt", "A", "D"), e, d_state, self.dt_rank, dt_min=1e-3, dt_max=0.1,
                               dt_init="random", dt_scale=1.0, dt_init_floor=1e-4,
                               factory={"device": None, "dtype": None})
            sets.append(holder)
        self.x_proj_weight = nn.Parameter(torch.stack([s.x.weight.detach() for s in sets]))  # (K, R+2N, E)
        self.dt_projs_weight = nn.Parameter(torch.stack([s.dt.weight.detach() for s in sets]))  # (K, E, R)
        self.dt_projs_bias = nn.Parameter(torch.stack([s.dt.bias.detach() for s in sets]))  # (K, E)
        self.A_logs = nn.Parameter(torch.cat([s.A.detach() for s in sets]))  # (K*E, N)
        self.Ds = nn.Parameter(torch.cat([s.D.detach() for s in sets]))  # (K*E,)
        for p in (self.A_logs, self.Ds):
            p._no_weight_decay = True
        self.ssa = SequenceShuffleAttention(e) if ssa else None
        self.out_norm = nn.LayerNorm(e)
        self.out_proj = nn.Linear(e, d_model, bias=False)

    def forward(self, x: torch.Tensor, shift: int, stripe: int) -> torch.Tensor:
        b, h, w, _ = x.shape
        xs, z = self.in_proj(x).chunk(2, dim=-1)
        xs = F.silu(self.conv2d(xs.permute(0, 3, 1, 2)))
        orders = mair4(stripe, shift) if self.scan == "nss" else cross4()
        seqs = gather(xs, orders)  # (b, K, E, L)
        length = h * w
        x_dbl = torch.einsum("bkel,kce->bkcl", seqs, self.x_proj_weight)
        dts, bs, cs = x_dbl.split([self.dt_rank, self.d_state, self.d_state], dim=2)
        dts = torch.einsum("bkrl,ker->bkel", dts, self.dt_projs_weight)
        ct = torch.promote_types(seqs.dtype, torch.float32)  # the scan runs in fp32 (fp64 for fp64 models)
        ys = selective_scan(
            seqs.reshape(b, -1, length).to(ct), dts.reshape(b, -1, length).to(ct),
            -torch.exp(self.A_logs.to(ct)), bs.to(ct), cs.to(ct), D=self.Ds.to(ct),
            delta_bias=self.dt_projs_bias.reshape(-1).to(ct), delta_softplus=True, backend=self.backend,
        ).view(b, _K, self.d_inner, length)
        if self.ssa is not None:
            weights = self.ssa(ys.mean(-1).to(self.ssa.proj.weight.dtype))  # the mean is order-independent
            ys = ys * weights.unsqueeze(-1)
        y = merge(ys, orders, (h, w)).permute(0, 2, 3, 1)
        y = self.out_norm(y.to(z.dtype)) * F.silu(z)
        return self.out_proj(y)


class ResidualMambaBlock(nn.Module):
    """x = x * skip_scale1 + drop_path(VMM(LN(x))); x = x * skip_scale2 + MLP(LN(x)) on (B, H, W, C)."""

    def __init__(self, dim: int, cfg: MaIRConfig, shift: int, drop_path: float):
        super().__init__()
        self.shift = shift
        self.norm1 = nn.LayerNorm(dim)
        self.mixer = VMM(dim, cfg.d_state, cfg.ssm_ratio, backend=cfg.backend)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.skip_scale1 = nn.Parameter(torch.ones(dim))
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * cfg.mlp_ratio)
        self.mlp = nn.Sequential()
        self.mlp.add_module("fc1", nn.Linear(dim, hidden))
        self.mlp.add_module("act", nn.GELU())
        self.mlp.add_module("fc2", nn.Linear(hidden, dim))
        self.skip_scale2 = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, stripe: int) -> torch.Tensor:
        x = x * self.skip_scale1 + self.drop_path(self.mixer(self.norm1(x), self.shift, stripe))
        return x * self.skip_scale2 + self.mlp(self.norm2(x))


class ResidualMambaGroup(nn.Module):
    """`depth` blocks (even ones with stripe shift 0, odd ones with stripe // 2), a 3x3 conv, a skip."""

    def __init__(self, dim: int, depth: int, cfg: MaIRConfig, drop_paths: list[float]):
        super().__init__()
        self.blocks = nn.ModuleList(
            ResidualMambaBlock(dim, cfg, 0 if i % 2 == 0 else cfg.scan_len // 2, drop_paths[i]) for i in range(depth))
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x: torch.Tensor, stripe: int) -> torch.Tensor:
        y = x
        for block in self.blocks:
            y = block(y, stripe)
        return self.conv(y.permute(0, 3, 1, 2)).permute(0, 2, 3, 1) + x


class MaIR(nn.Module):
    """MaIR restorer: (batch, in_chans, H, W) in [0, 1] -> (batch, in_chans, H*upscale, W*upscale)."""

    def __init__(self, config: MaIRConfig | None = None, **overrides):
        super().__init__()
        cfg = MaIRConfig(**{**asdict(config or MaIRConfig()), **overrides})
        self.config = cfg
        c, n_out = cfg.embed_dim, cfg.in_chans
        mean = RGB_MEAN if cfg.in_chans == 3 else (0.0,) * cfg.in_chans
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.conv_first = nn.Conv2d(cfg.in_chans, c, 3, padding=1)
        self.embed_norm = nn.LayerNorm(c)
        rates = drop_path_rates(cfg.drop_path_rate, sum(cfg.depths))
        starts = [sum(cfg.depths[:i]) for i in range(len(cfg.depths))]
        self.groups = nn.ModuleList(ResidualMambaGroup(c, d, cfg, rates[s:s + d]) for s, d in zip(starts, cfg.depths))
        self.norm = nn.LayerNorm(c)
        self.conv_after_body = nn.Conv2d(c, c, 3, padding=1)
        if cfg.upsampler == "pixelshuffle":
            self.conv_before_upsample = nn.Sequential(nn.Conv2d(c, cfg.num_feat, 3, padding=1),
                                                      nn.LeakyReLU(inplace=True))
            self.upsample = nn.Sequential(*_pixel_shuffle_stages(cfg.upscale, cfg.num_feat))
            self.conv_last = nn.Conv2d(cfg.num_feat, n_out, 3, padding=1)
        elif cfg.upsampler == "pixelshuffledirect":
            self.upsample = nn.Sequential(nn.Conv2d(c, cfg.upscale ** 2 * n_out, 3, padding=1),
                                          nn.PixelShuffle(cfg.upscale))
        else:
            self.conv_last = nn.Conv2d(c, n_out, 3, padding=1)
        self.apply(_init_weights)
        if cfg.interp_init:
            self._init_as_interpolation()

    @torch.no_grad()
    def _init_as_interpolation(self) -> None:
        """Make the untrained model output bilinear upsampling of its input (the input itself for
        denoising): conv_first copies the image into the first channels, conv_after_body starts at
        zero, and the last conv reads only those channels with bilinear taps per pixel-shuffle phase.
        Training then learns a correction instead of the whole mapping, which short CPU runs need."""
        n, s = self.config.in_chans, self.config.upscale
        self.conv_first.weight[:n].zero_()
        self.conv_first.bias[:n].zero_()
        self.conv_first.weight[:n, :, 1, 1] = torch.eye(n)
        nn.init.zeros_(self.conv_after_body.weight)
        nn.init.zeros_(self.conv_after_body.bias)
        last = self.upsample[0] if self.config.upsampler else self.conv_last
        last.weight.zero_()
        last.bias.zero_()
        if not self.config.upsampler:  # denoising: out = input + conv_last(...), so the conv starts at zero
            return
        taps = []
        for phase in range(s):
            offset = (phase + 0.5) / s - 0.5  # output sub-pixel centre relative to its input pixel
            taps.append([-offset, 1 + offset, 0.0] if offset < 0 else [0.0, 1 - offset, offset])
        taps = torch.tensor(taps)
        for c in range(n):
            for i in range(s):
                for j in range(s):
                    last.weight[c * s * s + i * s + j, c] = taps[i][:, None] * taps[j][None, :]

    @property
    def upscale(self) -> int:
        return self.config.upscale

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) features -> the deep features (B, C, H, W) before conv_after_body."""
        y = self.embed_norm(x.permute(0, 2, 3, 1))
        for group in self.groups:
            y = group(y, self.config.scan_len)
        return self.norm(y).permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if x.dim() != 4 or x.shape[1] != cfg.in_chans:
            raise ValueError(f"MaIR expects images of shape (batch, {cfg.in_chans}, H, W), got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if cfg.pad_to_stripe:
            x = _pad_to_multiple(x, cfg.scan_len)
        x = (x - self.mean) * cfg.img_range
        feat = self.conv_first(x)
        feat = self.conv_after_body(self.forward_features(feat)) + feat
        if cfg.upsampler == "pixelshuffle":
            out = self.conv_last(self.upsample(self.conv_before_upsample(feat)))
        elif cfg.upsampler == "pixelshuffledirect":
            out = self.upsample(feat)
        else:
            out = x + self.conv_last(feat)
        out = out / cfg.img_range + self.mean
        return out[..., : h * cfg.upscale, : w * cfg.upscale]


def _pixel_shuffle_stages(scale: int, num_feat: int) -> list[nn.Module]:
    if scale == 3:
        return [nn.Conv2d(num_feat, 9 * num_feat, 3, padding=1), nn.PixelShuffle(3)]
    stages = []
    for _ in range(int(math.log2(scale))):
        stages += [nn.Conv2d(num_feat, 4 * num_feat, 3, padding=1), nn.PixelShuffle(2)]
    return stages


def _pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad the bottom and right edges to a multiple (reflect where the image is large enough)."""
    h, w = x.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    if ph == 0 and pw == 0:
        return x
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)


def _init_weights(m: nn.Module) -> None:
    """The official init: Linear weights truncated normal (std 0.02), biases 0; LayerNorm 1 / 0."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------------------------------
# Official checkpoints

# official key pattern -> ssmkit key (applied in order, each at most once per key)
_KEY_MAP = (
    (r"^layers\.(\d+)\.residual_group\.blocks\.", r"groups.\1.blocks."),
    (r"^layers\.(\d+)\.conv\.", r"groups.\1.conv."),
    (r"^patch_embed\.norm\.", "embed_norm."),
    (r"\.self_attention\.gating\.gating\.1\.", ".mixer.ssa.proj."),
    (r"\.self_attention\.", ".mixer."),
    (r"\.conv_blk\.", ".mlp."),
    (r"\.ln_1\.", ".norm1."),
    (r"\.ln_2\.", ".norm2."),
    (r"\.skip_scale$", ".skip_scale1"),
)


def convert_official_mair(state_dict: dict[str, torch.Tensor], config: MaIRConfig) -> dict[str, torch.Tensor]:
    """Official MaIR weights (`mair_arch.py`, as BasicSR saves them) -> the state dict of a MaIR of `config`.

    Only the names differ (`_KEY_MAP`); the tensors are the same for every configuration, so `config` only
    completes the common converter signature (`ssmkit.load_official` checks the shapes against the model).
    """
    out = {}
    for key, value in state_dict.items():
        for pattern, repl in _KEY_MAP:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


register_official("mair", MaIR, convert_official_mair)


# ----------------------------------------------------------------------------------------------------
# Published configurations (options/train/*.yml of the official repository)

_CLASSIC = dict(embed_dim=180, depths=(6,) * 6, d_state=16, ssm_ratio=2.0, mlp_ratio=2.5, scan_len=8,
                upsampler="pixelshuffle")
_LIGHT = dict(embed_dim=60, depths=(6,) * 4, d_state=16, ssm_ratio=1.4, mlp_ratio=1.6, scan_len=4,
              upsampler="pixelshuffledirect")
_TINY = dict(embed_dim=60, depths=(6,) * 4, d_state=1, ssm_ratio=1.1, mlp_ratio=1.6, scan_len=8,
             upsampler="pixelshuffledirect")
_MICRO = dict(embed_dim=24, depths=(2,), d_state=2, ssm_ratio=1.5, mlp_ratio=2.0, scan_len=8,
              upsampler="pixelshuffledirect", drop_path_rate=0.0, interp_init=True)
MAIR_CONFIGS: dict[str, dict] = {
    **{f"mair_sr_x{s}": dict(_CLASSIC, upscale=s) for s in (2, 3, 4)},
    **{f"mair_light_sr_x{s}": dict(_LIGHT, upscale=s) for s in (2, 3, 4)},
    **{f"mair_tiny_sr_x{s}": dict(_TINY, upscale=s) for s in (2, 3, 4)},
    "mair_denoise": dict(embed_dim=180, depths=(6,) * 6, d_state=16, ssm_ratio=1.3, mlp_ratio=2.0, scan_len=4,
                         upsampler="", upscale=1),
    # ssmkit variants for CPU runs (the defaults of `ssmkit restore`), starting as bilinear upsampling
    **{f"mair_micro_sr_x{s}": dict(_MICRO, upscale=s) for s in (2, 3, 4)},
    "mair_micro_denoise": dict(_MICRO, upsampler="", upscale=1),
}
_DOCS = {
    "mair_sr": "classic SR (DF2K): C 180, 6x6 blocks, stripe 8; 19.4M parameters at x2",
    "mair_light_sr": "lightweight SR MaIR-S (DIV2K): C 60, 4x6 blocks, stripe 4; 1.36M parameters at x2",
    "mair_tiny_sr": "lightweight SR MaIR-T (DIV2K): C 60, 4x6 blocks, d_state 1, stripe 8; 0.88M parameters at x2",
    "mair_denoise": "colour Gaussian denoising (sigma 15/25/50): C 180, 6x6 blocks, stripe 4; 14.1M parameters",
    "mair_micro_sr": "ssmkit variant for CPU: C 24, 1x2 blocks, d_state 2, stripe 8, starting as bilinear upsampling",
    "mair_micro_denoise": "ssmkit variant for CPU denoising: C 24, 1x2 blocks, d_state 2, stripe 8, starting as the "
                          "identity",
}


def _register(name: str) -> None:
    def build(**overrides) -> MaIR:
        return MaIR(MaIRConfig(**{**MAIR_CONFIGS[name], **overrides}))

    build.__name__ = name
    build.__doc__ = f"MaIR {_DOCS[name.rsplit('_x', 1)[0]]}."
    register_model(build)


for _name in MAIR_CONFIGS:
    _register(_name)
