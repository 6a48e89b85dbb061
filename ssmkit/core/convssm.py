"""ConvS5: a diagonal complex state-space recurrence over time whose states are feature maps.

Per state channel p and pixel, with Δ = exp(log_step):

    Λ̄ = exp(Λ·Δ),   B̄ = (Λ̄ - 1)/Λ · B̃                    (zero-order hold, as ConvS5)
    h_t = Λ̄ ⊙ h_{t-1} + B̄ ∗ u_t                           (h: complex (batch, P, H, W))
    y_t = 2·Re(C̃ ∗ h_t) + D ∗ u_t                          (∗: k×k 2-D convolution, "same" padding)

Only one of each conjugate pair of eigenvalues is kept, hence 2·Re. Layout is batch-major and
channels-first: u (batch, L, U, H, W). Because the ZOH factor is a per-(p, pixel) scalar,
B̄ ∗ u = ((Λ̄ - 1)/Λ) ⊙ (B̃ ∗ u), which also serves the selective variant, where log_step has the
full shape (batch, L, P, H, W) (computed from u by a convolution in `ConvS5Layer(selective=True)`).
The time scan is the complex elementwise `linear_scan` of core/scan.py (complex tensors,
differentiable through PyTorch's complex autograd), parallel over time; `convssm_step` is the
sequential form, used for generation and as the oracle.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ssmkit.core.scan import linear_scan
from ssmkit.util import shape_error

__all__ = ["convssm_scan", "convssm_step", "hippo_n_init", "ConvS5Layer"]


def _check(u, Lambda, B_kernel, C_kernel, log_step, D_kernel, state, step):
    """Check shapes for a sequence (u: (batch, L, U, H, W)) or one step (u: (batch, U, H, W))."""
    lead = u.shape[:2] if not step else u.shape[:1]
    if u.dim() != (4 if step else 5) or u.is_complex() or not u.is_floating_point():
        raise shape_error("convssm", "u", u, "real (batch, U, H, W)" if step else "real (batch, L, U, H, W)")
    U, H, W = u.shape[-3:]
    if Lambda.dim() != 1 or not Lambda.is_complex():
        raise shape_error("convssm", "Lambda", Lambda, "complex (P,)")
    P = Lambda.shape[0]
    for name, K, shape in (("B_kernel", B_kernel, (P, U)), ("C_kernel", C_kernel, (None, P))):
        if K.dim() != 4 or not K.is_complex() or K.shape[2] != K.shape[3] or K.shape[2] % 2 == 0 \
                or K.shape[1] != shape[1] or (shape[0] is not None and K.shape[0] != shape[0]):
            raise shape_error("convssm", name, K, f"complex ({shape[0] or 'U_out'}, {shape[1]}, k, k) with k odd")
    U_out = C_kernel.shape[0]
    if D_kernel is not None and (D_kernel.dim() != 4 or D_kernel.shape[:2] != (U_out, U)
                                 or D_kernel.shape[2] != D_kernel.shape[3] or D_kernel.shape[2] % 2 == 0):
        raise shape_error("convssm", "D_kernel", D_kernel, f"real ({U_out}, {U}, k, k) with k odd")
    full = (*lead, P, H, W)
    if log_step.shape != (P,) and log_step.shape != full:
        raise shape_error("convssm", "log_step", log_step, f"(P,) = ({P},), or selective {full}")
    if state is not None and state.shape != (lead[0], P, H, W):
        raise shape_error("convssm",
                          "initial_state" if not step else "state", state, f"complex ({lead[0]}, {P}, {H}, {W})")


def _conv_in(u, B_kernel):
    """B̃ ∗ u for real u (n, U, H, W) and complex B̃ (P, U, k, k): one real conv with 2P outputs."""
    w = torch.cat([B_kernel.real, B_kernel.imag]).to(u.dtype)
    re, im = F.conv2d(u, w, padding=B_kernel.shape[-1] // 2).chunk(2, dim=1)
    return torch.complex(re, im)


def _conv_out(h, C_kernel):
    """2·Re(C̃ ∗ h) for complex h (n, P, H, W) and C̃ (U_out, P, k, k): one real conv over (Re h, Im h)."""
    w = torch.cat([C_kernel.real, -C_kernel.imag], dim=1)
    return 2 * F.conv2d(torch.cat([h.real, h.imag], dim=1), w, padding=C_kernel.shape[-1] // 2)


def _discretize(Lambda, log_step):
    """(Λ̄, ZOH input factor (Λ̄ - 1)/Λ), broadcast to log_step's shape with P on dim -3."""
    lam = Lambda if log_step.dim() == 1 else Lambda[:, None, None]
    lam_bar = torch.exp(lam * torch.exp(log_step))
    if log_step.dim() == 1:
        lam_bar, lam = lam_bar[:, None, None], lam[:, None, None]
    return lam_bar, (lam_bar - 1) / lam


def _complex_dtype(u):
    return torch.complex128 if u.dtype == torch.float64 else torch.complex64


def convssm_scan(u, Lambda, B_kernel, C_kernel, log_step, D_kernel=None, initial_state=None):
    """Run the ConvS5 recurrence over u (batch, L, U, H, W) in parallel over time.

    Lambda: complex (P,), Re < 0. B_kernel: complex (P, U, k_B, k_B); C_kernel: complex
    (U_out, P, k_C, k_C); D_kernel: real (U_out, U, k_D, k_D) or None; kernel sizes odd.
    log_step: (P,) (ConvS5), or (batch, L, P, H, W) for the selective variant.
    initial_state: complex (batch, P, H, W) or None. Returns (y (batch, L, U_out, H, W) real,
    last_state (batch, P, H, W) complex). The input and output convolutions run on all frames at
    once; memory is O(batch·L·P·H·W) complex for the states (plus as much saved for backward).
    """
    _check(u, Lambda, B_kernel, C_kernel, log_step, D_kernel, initial_state, step=False)
    batch, L, U, H, W = u.shape
    cd = _complex_dtype(u)
    Lambda, B_kernel, C_kernel = Lambda.to(cd), B_kernel.to(cd), C_kernel.to(cd)
    lam_bar, zoh = _discretize(Lambda, log_step.to(u.dtype))
    Bu = _conv_in(u.flatten(0, 1), B_kernel).unflatten(0, (batch, L)) * zoh
    h = linear_scan(lam_bar, Bu, None if initial_state is None else initial_state.to(cd), dim=1)
    y = _conv_out(h.flatten(0, 1), C_kernel)
    if D_kernel is not None:
        y = y + F.conv2d(u.flatten(0, 1), D_kernel.to(u.dtype), padding=D_kernel.shape[-1] // 2)
    return y.unflatten(0, (batch, L)), h[:, -1]


def convssm_step(state, u_t, Lambda, B_kernel, C_kernel, log_step, D_kernel=None):
    """One step of `convssm_scan`: state (batch, P, H, W) complex, u_t (batch, U, H, W).

    log_step: (P,), or (batch, P, H, W) for the selective variant. Returns (y_t, new_state);
    the state is not modified in place.
    """
    _check(u_t, Lambda, B_kernel, C_kernel, log_step, D_kernel, state, step=True)
    cd = _complex_dtype(u_t)
    lam_bar, zoh = _discretize(Lambda.to(cd), log_step.to(u_t.dtype))
    state = lam_bar * state.to(cd) + zoh * _conv_in(u_t, B_kernel.to(cd))
    y = _conv_out(state, C_kernel.to(cd))
    if D_kernel is not None:
        y = y + F.conv2d(u_t, D_kernel.to(u_t.dtype), padding=D_kernel.shape[-1] // 2)
    return y, state


def hippo_n_init(P):
    """HiPPO-N eigenvalues and eigenvectors for a state of size 2P, keeping one of each conjugate pair.

    HiPPO-LegS A (A_nk = -sqrt(2n+1)·sqrt(2k+1) for n > k, -(n+1) on the diagonal) plus the rank-one
    term p·pᵀ with p_n = sqrt(n + 1/2) is normal: -1/2·I plus a skew-symmetric matrix S. Returns
    (Lambda (P,) complex128 with Re = -1/2, V (2P, P) complex128 unitary columns) as S5 / ConvS5.
    """
    n = torch.arange(2 * P, dtype=torch.float64)
    q = torch.sqrt(2 * n + 1)
    A = -torch.where(n[:, None] > n[None, :], q[:, None] * q[None, :], torch.diag(n + 1))
    p = torch.sqrt(n + 0.5)
    S = A + p[:, None] * p[None, :]
    re = torch.diagonal(S).mean()  # every diagonal entry is -1/2
    skew = S - torch.diag(torch.diagonal(S))
    im, V = torch.linalg.eigh(skew.to(torch.complex128) * -1j)  # ascending: the first P have Im < 0
    return torch.complex(re.expand(P).clone(), im[:P]), V[:, :P]


class ConvS5Layer(nn.Module):
    """ConvS5 parameters and both forms: `forward` (parallel over time) and `init_state` / `step` (one
    frame, the protocol of `ssmkit.core.generation`).

    Λ = Re + i·Im with Re clamped to ≤ -1e-4 (ConvS5's clip_eigs), HiPPO-N initialised;
    B̃ = V⁻¹·B and C̃ = C·V with B, C He-normal real kernels; log_step ~ U[ln dt_min, ln dt_max] per
    state; D a real k_D×k_D conv (k_D=0 for none). selective=True adds a k_B×k_B conv from u to
    log_step (bias-free, small init), so Δ varies per frame, pixel and state.
    u: (batch, L, U, H, W); states: complex (batch, P, H, W).
    """

    def __init__(self, U, P, k_B=3, k_C=3, k_D=3, dt_min=1e-3, dt_max=0.1, selective=False):
        super().__init__()
        for name, k in (("k_B", k_B), ("k_C", k_C)) + ((("k_D", k_D),) if k_D else ()):
            if k % 2 != 1:
                raise ValueError(f"ConvS5Layer: {name} must be odd for 'same' padding, got {k}")
        Lambda, V = hippo_n_init(P)
        self.Lambda_re = nn.Parameter(Lambda.real.float())
        self.Lambda_im = nn.Parameter(Lambda.imag.float())
        B = torch.randn(2 * P, U * k_B * k_B, dtype=torch.float64) * math.sqrt(2 / (U * k_B * k_B))
        B = (V.conj().t() @ B.to(V.dtype)).reshape(P, U, k_B, k_B)
        C = torch.randn(U, k_C, k_C, 2 * P, dtype=torch.float64) * math.sqrt(2 / (2 * P * k_C * k_C))
        C = (C.to(V.dtype) @ V).permute(0, 3, 1, 2)
        self.B_re, self.B_im = nn.Parameter(B.real.float()), nn.Parameter(B.imag.float())
        self.C_re, self.C_im = nn.Parameter(C.real.float()), nn.Parameter(C.imag.float())
        self.D = nn.Parameter(torch.randn(U, U, k_D, k_D) * math.sqrt(1 / (U * k_D * k_D))) if k_D else None
        self.log_step = nn.Parameter(torch.rand(P) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        self.step_conv = None
        if selective:
            self.step_conv = nn.Conv2d(U, P, k_B, padding=k_B // 2, bias=False)
            nn.init.normal_(self.step_conv.weight, std=0.02)

    def _params(self):
        Lambda = torch.complex(self.Lambda_re.clamp(max=-1e-4), self.Lambda_im)
        return (Lambda, torch.complex(self.B_re, self.B_im), torch.complex(self.C_re, self.C_im))

    def _log_step(self, u):
        """(P,), or log_step + conv(u) with P on dim -3 when selective (u: (..., U, H, W))."""
        if self.step_conv is None:
            return self.log_step
        s = self.step_conv(u.flatten(0, -4)).unflatten(0, u.shape[:-3])
        return self.log_step[:, None, None] + s

    def forward(self, u, initial_state=None):
        """u (batch, L, U, H, W) -> (y (batch, L, U, H, W), last_state (batch, P, H, W) complex);
        initial_state: a state of `step` or `init_state` (None: zeros)."""
        if u.dim() != 5:
            raise shape_error("convssm", "u", u, "(batch, L, U, H, W)")
        return convssm_scan(u, *self._params(), self._log_step(u), self.D, _over_frame(initial_state, u))

    def init_state(self, batch: int, *, device=None, dtype=None) -> torch.Tensor:
        """The zero state, (batch, P, 1, 1) complex, which spreads over the feature map of any frame: complex128
        for a float64 `dtype` (default: the layer's), else complex64."""
        real = self.log_step.dtype if dtype is None else dtype
        device = self.log_step.device if device is None else device
        return torch.zeros(batch, self.log_step.shape[0], 1, 1, device=device,
                           dtype=torch.complex128 if real == torch.float64 else torch.complex64)

    def step(self, u_t, state):
        """One frame u_t (batch, U, H, W) -> (y_t, new state (batch, P, H, W) complex); the given state
        is not modified."""
        if u_t.dim() != 4:
            raise shape_error("convssm", "u_t", u_t, "(batch, U, H, W)")
        return convssm_step(_over_frame(state, u_t), u_t, *self._params(), self._log_step(u_t), self.D)


def _over_frame(state, u):
    """`state` over the feature map of frames u (..., H, W): the (batch, P, 1, 1) zero state of
    `ConvS5Layer.init_state` spreads to (batch, P, H, W); other states are passed on as they are."""
    if state is None or state.dim() != 4 or state.shape[-2:] != (1, 1):
        return state
    return state.expand(-1, -1, *u.shape[-2:])
