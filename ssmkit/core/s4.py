"""S4 and S4D: linear time-invariant state-space layers with a convolution mode and a recurrent mode.

A layer maps each of H channels u (length L) through the discretised system
    x_t = Ā x_{t-1} + B̄ u_t,   y_t = 2·Re(C x_t) + D u_t
whose complex state x holds the N/2 stored modes (S4D: the conjugate half of the N-dimensional real state
is implied by the 2·Re) or all N modes (S4's DPLR, whose rank-1 term couples a mode with its conjugate). Training uses the convolution y = K * u + D u with the kernel K_l = 2·Re(C Āˡ B̄) of length
L = input length (never truncated, so convolution and recurrence are the same function); generation
uses `init_state` / `step` (the protocol of `ssmkit.core.generation`), which apply the same Ā, B̄, C one
sample at a time, in real arithmetic over the N/2 stored modes for both kernels.

Kernels (both share dt, C and D; `n_ssm` copies of the state matrix and B are shared over channels):
- `S4DKernel` (diagonal, the default): Λ with Re Λ = −exp(·) < 0, 'lin' or 'inv' initialisation
  (S4D paper), ZOH or bilinear discretisation; K by a Vandermonde product.
- `DPLRKernel` (S4): A = diag(Λ) − P Pᴴ with Re Λ = −exp(·), SaShiMi's "Hurwitz" form: A + Aᴴ ≺ 0, so
  every eigenvalue lies in the open left half-plane and the bilinear recurrence is stable. Initialised
  from the normal-plus-low-rank form of HiPPO-LegS (exactly LegS, up to the change of basis). K from its generating function at the L-th roots of
  unity (Cauchy sums + Woodbury identity), with C̃ = C(I − Āᴸ) accounting for the finite length.

The plain reference `kernel_reference` (powers of Ā) is the oracle the tests compare the kernels with;
the convolution is `ssmkit.core.fftconv.fft_causal_conv` (Hyena's), tested against a direct sum there.
dt is initialised log-uniformly in [dt_min, dt_max] as in the papers.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ssmkit.core.fftconv import fft_causal_conv

__all__ = ["S4DKernel", "DPLRKernel", "S4Conv", "S4State", "S4StepCoefficients", "kernel_reference",
           "hippo_legs_nplr"]


def _ssm_parameter(value: torch.Tensor) -> nn.Parameter:
    """A state-space parameter (dt, Λ, B, P): trained without weight decay, as in the papers."""
    p = nn.Parameter(value)
    p._no_weight_decay = True
    return p


def _complex(p: torch.Tensor) -> torch.Tensor:
    """A complex view of a real parameter stored with a trailing (re, im) dimension."""
    return torch.view_as_complex(p) if p.dtype in (torch.float32, torch.float64) else p


def _log_dt(d_model: int, dt_min: float, dt_max: float) -> torch.Tensor:
    if not 0 < dt_min <= dt_max:
        raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
    return torch.rand(d_model) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)


class _KernelBase(nn.Module):
    """Shared parameters: per-channel log dt and output matrix C (H, N/2); n_ssm state matrices."""

    def __init__(self, d_model: int, d_state: int, n_ssm: int | None, dt_min: float, dt_max: float):
        super().__init__()
        if d_state < 2 or d_state % 2:
            raise ValueError(f"d_state must be even and >= 2 (conjugate pairs), got {d_state}")
        n_ssm = d_model if n_ssm is None else n_ssm
        if n_ssm < 1 or d_model % n_ssm:
            raise ValueError(f"n_ssm ({n_ssm}) must divide d_model ({d_model})")
        self.d_model, self.d_state, self.n_ssm = d_model, d_state, n_ssm
        self.log_dt = _ssm_parameter(_log_dt(d_model, dt_min, dt_max))
        self.C = nn.Parameter(torch.view_as_real(torch.randn(d_model, d_state // 2, dtype=torch.cfloat)))

    def _expand(self, x: torch.Tensor) -> torch.Tensor:
        """(n_ssm, ...) -> (H, ...): each state matrix serves H / n_ssm consecutive channels."""
        return x.repeat_interleave(self.d_model // self.n_ssm, 0)

    def dt(self) -> torch.Tensor:
        return self.log_dt.exp()

    def state_eigenvalues(self) -> torch.Tensor:
        """Λ (n_ssm, N/2) = −exp(log_A_real) − i·A_imag: the diagonal part, Re < 0 by construction
        (the subclasses set log_A_real and A_imag)."""
        return torch.complex(-self.log_A_real.exp(), -self.A_imag)

    def output(self) -> torch.Tensor:
        """The complex output row (H, n) of the state the kernel and the step run on; y = 2·Re(C x)."""
        return _complex(self.C)


class S4DKernel(_KernelBase):
    """Diagonal state matrix Λ (S4D). init 'lin': Λ_n = −1/2 − iπn; 'inv': Λ_n = −1/2 − i(N/π)(N/(2n+1) − 1).
    disc 'zoh': Ā = exp(ΔΛ), B̄ = (exp(ΔΛ) − 1)/Λ·B; 'bilinear': Ā = (1 + ΔΛ/2)/(1 − ΔΛ/2), B̄ = Δ/(1 − ΔΛ/2)·B."""

    def __init__(self, d_model: int, d_state: int = 64, n_ssm: int | None = None, init: str = "lin",
                 disc: str = "zoh", dt_min: float = 1e-3, dt_max: float = 1e-1):
        super().__init__(d_model, d_state, n_ssm, dt_min, dt_max)
        if disc not in ("zoh", "bilinear"):
            raise ValueError(f"disc must be 'zoh' or 'bilinear', got {disc!r}")
        half = d_state // 2
        n = torch.arange(half, dtype=torch.float)
        if init == "lin":
            imag = math.pi * n
        elif init == "inv":
            imag = d_state / math.pi * (d_state / (2 * n + 1) - 1)
        else:
            raise ValueError(f"init must be 'lin' or 'inv', got {init!r}")
        self.disc = disc
        self.log_A_real = _ssm_parameter(torch.full((self.n_ssm, half), math.log(0.5)))
        self.A_imag = _ssm_parameter(imag.repeat(self.n_ssm, 1))
        self.B = _ssm_parameter(torch.view_as_real(torch.ones(self.n_ssm, half, dtype=torch.cfloat)))

    def discrete(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(Ā diagonal (H, N/2), B̄ (H, N/2), C (H, N/2)), complex."""
        lam = self._expand(self.state_eigenvalues())
        dt = self.dt()[:, None]
        b = self._expand(_complex(self.B))
        if self.disc == "zoh":
            dA = torch.exp(dt * lam)
            dB = (dA - 1) / lam * b
        else:
            dA = (1 + dt * lam / 2) / (1 - dt * lam / 2)
            dB = dt / (1 - dt * lam / 2) * b
        return dA, dB, _complex(self.C)

    def recurrence(self) -> tuple[torch.Tensor, None, None, torch.Tensor]:
        """(d, u, v, B̄) of Ā = diag(d) − u vᵀ with no low-rank term (u = v = None): S4D's Ā is diagonal."""
        dA, dB, _ = self.discrete()
        return dA, None, None, dB

    def forward(self, length: int) -> torch.Tensor:
        """The kernel K (H, length): K_l = 2·Re Σ_n C_n B̄_n Ā_nˡ, a Vandermonde product. With l = a·c + b
        (c ≈ √L) Ā_nˡ = Ā_n^(a·c) Ā_n^b, so K is a batched matrix product of two small Vandermonde
        matrices and the (H, N/2, L) tensor of powers is never formed."""
        dA, dB, C = self.discrete()
        log_dA = torch.log(dA)[..., None]
        block = math.isqrt(length - 1) + 1
        n_blocks = -(-length // block)
        steps = torch.arange(max(block, n_blocks), device=dA.device)
        outer = torch.exp(log_dA * (steps[:n_blocks] * block)) * (C * dB)[..., None]  # (H, N/2, blocks)
        inner = torch.exp(log_dA * steps[:block])  # (H, N/2, block)
        return 2 * (outer.transpose(1, 2) @ inner).real.reshape(self.d_model, -1)[:, :length]


def hippo_legs_nplr(d_state: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HiPPO-LegS in normal-plus-low-rank form, diagonalised: LegS = S − p pᵀ with S = V diag(Λ) Vᴴ
    normal (Re Λ = −1/2). Returns (Λ, P = Vᴴp, B = Vᴴq), each (N/2,) complex, for one eigenvalue of each
    conjugate pair (Im Λ < 0). With the mirror half, diag([Λ, Λ̄]) − [P, P̄][P, P̄]ᴴ is LegS itself in the
    eigenbasis of S: the DPLR initialisation of S4."""
    q = torch.sqrt(2 * torch.arange(d_state, dtype=torch.float64) + 1)
    # LegS A = S − p pᵀ with p = q/√2 and S = −I/2 + skew; the skew part is diagonalised by eigh
    skew = -0.5 * q[:, None] * q[None, :] * torch.sign(torch.arange(d_state)[:, None] - torch.arange(d_state))
    mu, V = torch.linalg.eigh(-1j * skew.to(torch.complex128))
    keep = mu < 0  # one of each ±μ pair
    lam = torch.complex(torch.full_like(mu[keep], -0.5), mu[keep])
    Vh = V[:, keep].conj().T
    p = (q / math.sqrt(2)).to(torch.complex128)
    return lam, Vh @ p, Vh @ q.to(torch.complex128)


def _cauchy_sums(weights: torch.Tensor, lam: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Σ_n w_kn / (g_l − Λ_n) for each row k of weights (K, H, n), nodes g (H, L'): (K, H, L')."""
    return torch.einsum("khn,hnl->khl", weights, 1 / (g[:, None, :] - lam[:, :, None]))


class DPLRKernel(_KernelBase):
    """S4 with A = diag(Λ) − P Pᴴ, Re Λ = −exp(log_A_real) (Hurwitz), bilinear discretisation, LegS init.

    As in S4 the state is the full conjugate-symmetric one: the N/2 stored modes and their conjugates,
    Λ_f = [Λ, Λ̄], P_f = [P, P̄], B_f = [B, B̄], with the rank-1 term P_f P_fᴴ coupling the two halves (at
    init A is exactly HiPPO-LegS), and the output row [C, C̄]/2 so that y = 2·Re(C_f x) = C x + C̄ x̄.

    `chunk`: the Cauchy sums run over blocks of this many frequency nodes, each recomputed in the backward
    pass instead of keeping its (H, N/2, nodes) complex reciprocals (at L = 16000 those were most of the
    training memory: ~10 GB for the 8-layer SC09 model at batch 1); 0: one block."""

    def __init__(self, d_model: int, d_state: int = 64, n_ssm: int | None = 1, dt_min: float = 1e-3,
                 dt_max: float = 1e-1, chunk: int = 2048):
        super().__init__(d_model, d_state, n_ssm, dt_min, dt_max)
        if chunk < 0:
            raise ValueError(f"chunk must be >= 0 (0: no chunking), got {chunk}")
        self.chunk = chunk
        lam, p, b = hippo_legs_nplr(d_state)
        rep = lambda x: x.to(torch.cfloat).repeat(self.n_ssm, 1)  # noqa: E731
        self.log_A_real = _ssm_parameter(torch.log(-lam.real).float().repeat(self.n_ssm, 1))
        self.A_imag = _ssm_parameter(-lam.imag.float().repeat(self.n_ssm, 1))
        self.P = _ssm_parameter(torch.view_as_real(rep(p)))
        self.B = _ssm_parameter(torch.view_as_real(rep(b)))

    def modes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Λ_f, P_f, B_f (n_ssm, N) of the full state: each stored mode followed by its conjugate."""
        both = lambda z: torch.cat([z, z.conj()], -1)  # noqa: E731
        return both(self.state_eigenvalues()), both(_complex(self.P)), both(_complex(self.B))

    def output(self) -> torch.Tensor:
        C = _complex(self.C)
        return torch.cat([C, C.conj()], -1) / 2

    def state_matrix(self) -> torch.Tensor:
        """A = diag(Λ_f) − P_f P_fᴴ (n_ssm, N, N): A + Aᴴ is negative definite, so A is Hurwitz."""
        lam, p, _ = self.modes()
        return torch.diag_embed(lam) - p[:, :, None] * p[:, None, :].conj()

    def discrete(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(Ā (H, N, N), B̄ (H, N), C_f (H, N)) of the bilinear discretisation, dense."""
        A = self._expand(self.state_matrix())
        dt = self.dt().to(A.dtype)[:, None, None]
        eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
        left = eye - dt / 2 * A
        dA = torch.linalg.solve(left, eye + dt / 2 * A)
        dB = torch.linalg.solve(left, dt[..., 0] * self._expand(self.modes()[2]))
        return dA, dB, self.output()

    def recurrence(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(d, u, v, B̄), each (H, N), with Ā = diag(d) − u vᵀ: the bilinear Ā = (I − Δ/2·A)⁻¹(I + Δ/2·A)
        equals 2M⁻¹ − I with M = I − Δ/2·A = E + Δ/2·P Pᴴ, E diagonal, and the Woodbury identity makes M⁻¹
        = E⁻¹ − (Δ/2·E⁻¹P)(Pᴴ E⁻¹) / (1 + Δ/2·Pᴴ E⁻¹ P) diagonal plus rank one, so Ā is never formed.
        A fixed-size form of the step (no data-dependent division) that `S4Conv.step` folds into real vectors."""
        lam, p, b = (self._expand(t) for t in self.modes())
        dt = self.dt().to(lam.dtype)[:, None]
        e_inv = 1 / (1 - dt / 2 * lam)
        q = dt / 2 * e_inv * p
        v = p.conj() * e_inv
        denom = 1 + (p.conj() * q).sum(-1, keepdim=True)  # 1 + Δ/2·Pᴴ E⁻¹ P
        dtB = dt * b
        dB = e_inv * dtB - q * (v * dtB).sum(-1, keepdim=True) / denom
        return 2 * e_inv - 1, 2 * q / denom, v, dB

    def forward(self, length: int) -> torch.Tensor:
        """The kernel K (H, length) from its generating function at the length-th roots of unity ω:
        Σ_l C Āˡ B̄ ωˡ = 2/(1+ω) · C̃ (g − A)⁻¹ B with g = 2/Δ·(1−ω)/(1+ω), C̃ = C(I − Āᴸ); the resolvent
        of diag(Λ) − P Pᴴ comes from Cauchy sums by the Woodbury identity."""
        dA, _, C = self.discrete()
        C_tilde = C - torch.einsum("hn,hnm->hm", C, torch.linalg.matrix_power(dA, length))
        lam, p, b = (self._expand(t) for t in self.modes())
        dt = self.dt()
        nodes = torch.arange(length, device=dt.device, dtype=torch.float64)
        omega = torch.exp(-2j * math.pi * nodes / length).to(lam.dtype)
        # at ω = −1 (even L) the formula is 0/0; evaluate elsewhere there and use the limit below
        at_minus_one = nodes == length // 2 if length % 2 == 0 else torch.zeros_like(nodes, dtype=torch.bool)
        omega = torch.where(at_minus_one, torch.zeros_like(omega), omega)
        g = 2 / dt[:, None] * (1 - omega) / (1 + omega)  # (H, L), purely imaginary on the unit circle
        # every weight is conjugate-symmetric ([w, w̄]) and g is imaginary (ḡ = −g, the node of ω̄), so the
        # conjugate half's sum at node l is the conjugate of the stored half's sum at node −l: sums over N/2
        n = lam.shape[-1] // 2
        weights = torch.stack([C_tilde * b, C_tilde * p, p.conj() * b, p.conj() * p])[..., :n]  # (4, H, N/2)
        chunk = self.chunk or length
        half = torch.cat([checkpoint(_cauchy_sums, weights, lam[:, :n], g[:, i:i + chunk], use_reentrant=False)
                          for i in range(0, length, chunk)], -1)
        k00, k01, k10, k11 = half + half[..., (-torch.arange(length, device=g.device)) % length].conj()
        generating = 2 / (1 + omega) * (k00 - k01 * k10 / (1 + k11))
        # ω = −1: Σ_l C Āˡ B̄ (−1)ˡ = C̃ (I + Ā)⁻¹ B̄, and for the bilinear Ā, B̄ that is C̃·Δ/2·B
        limit = torch.einsum("hn,hn->h", C_tilde, dt.to(b.dtype)[:, None] / 2 * b)
        generating = torch.where(at_minus_one, limit[:, None], generating)
        return 2 * torch.fft.ifft(generating, dim=-1).real


def kernel_reference(kernel: S4DKernel | DPLRKernel, length: int) -> torch.Tensor:
    """K_l = 2·Re(C Āˡ B̄) by repeated multiplication with Ā (diagonal or dense): the oracle of both kernels."""
    dA, dB, C = kernel.discrete()
    x, out = dB, []
    for _ in range(length):
        out.append(2 * (C * x).sum(-1).real)
        x = dA * x if dA.ndim == 2 else torch.einsum("hnm,hm->hn", dA, x)
    return torch.stack(out, -1)


class S4StepCoefficients(NamedTuple):
    """What `S4Conv.step` needs from the parameters, real, per channel: `read` (H, 1 or 2, 2, n) the rows
    read from the state, `same`/`swap` (H, 2, n) the rotation-scaling by Ā's diagonal, `b_bar` (H, 2, n),
    `low_rank` (H, 2, n) the rank-1 term (None for S4D), `direct` (H,) the input's direct path."""

    read: torch.Tensor
    same: torch.Tensor
    swap: torch.Tensor
    b_bar: torch.Tensor
    low_rank: torch.Tensor | None
    direct: torch.Tensor


class S4State(NamedTuple):
    """`S4Conv`'s recurrent state: x (batch, H, 2, n) = [Re; Im] of the n = N/2 stored modes, and the step
    coefficients of the weights it was started with."""

    x: torch.Tensor
    coefficients: S4StepCoefficients


class S4Conv(nn.Module):
    """One S4/S4D layer over (batch, H, L): y = K * u + D u (convolution), or the same by recurrence.

    kernel: 's4d' (diagonal) or 'dplr' (S4 with the Hurwitz DPLR state matrix); other keyword
    arguments go to the kernel class.

    The recurrence runs in real arithmetic on the N/2 stored modes. For S4D those are the whole state (the
    conjugates are implied by y = 2·Re(C x)). S4's DPLR step runs on the full state [x, x̄], whose rank-1
    term Ā = diag(d) − u vᵀ couples the halves; every vector of `recurrence()` is conjugate-symmetric
    ([z, z̄]), so for real inputs the state stays [x, x̄] and the half x is enough: vᵀ[x, x̄] = 2·Re(v_h x)
    =: s is real, x' = d_h x − u_h s + B̄_h u_t, y = 2·Re(C x') + D u_t. A step is r = read · x (s, and the
    output's state term), then x' = d ⊙ x (a 2x2 rotation-scaling per mode) + s·(−u_h) + u_t·B̄_h: products
    and sums over the state, no batched matmul (tiny bmm calls cost far more than their arithmetic), which
    torch.compile fuses into one update.
    """

    def __init__(self, d_model: int, d_state: int = 64, kernel: str = "s4d", **kernel_args):
        super().__init__()
        if kernel == "s4d":
            self.kernel = S4DKernel(d_model, d_state, **kernel_args)
        elif kernel == "dplr":
            self.kernel = DPLRKernel(d_model, d_state, **kernel_args)
        else:
            raise ValueError(f"kernel must be 's4d' or 'dplr', got {kernel!r}")
        self.D = nn.Parameter(torch.randn(d_model))

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """u (batch, H, L) -> y (batch, H, L), causal: y_t depends on u_{≤t}."""
        if u.ndim != 3 or u.shape[1] != self.kernel.d_model:
            raise ValueError(f"S4Conv expects (batch, {self.kernel.d_model}, length), got {tuple(u.shape)}")
        # the FFT runs in fp32 at least, also under bf16 autocast (bf16 FFTs are inexact and mostly unsupported)
        return fft_causal_conv(u, self.kernel(u.shape[-1]), self.D)

    def _step_coefficients(self, device, dtype: torch.dtype) -> S4StepCoefficients:
        """The step's coefficients from the current parameters, derived in float64 (see the class)."""
        kernel = self.kernel
        d, u, v, b = (None if t is None else t.to(torch.complex128) for t in kernel.recurrence())
        c = kernel.output().to(torch.complex128)
        half = kernel.d_state // 2
        if u is not None:  # DPLR, full state [x, x̄]: keep the stored half; 2·Re(C_f x_f) = 2·Re(2 C_f,h x)
            d, u, v, b, c = d[:, :half], u[:, :half], v[:, :half], b[:, :half], 2 * c[:, :half]
        pairs = lambda z: torch.stack([z.real, z.imag], -2)  # noqa: E731  (H, n) complex -> (H, 2, n)
        cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
        out_read = pairs((2 * c * d).conj())  # 2·Re(Σ C d x): Re(z x) = Σ pairs(z̄) ⊙ [Re x, Im x]
        read, low_rank = [out_read], None
        if u is not None:
            s_read = pairs(2 * v.conj())  # s = 2·Re(Σ v x)
            # the output's state term loses 2·Re(Σ C u)·s through the rank-1 term
            read = [s_read, out_read - 2 * (c * u).sum(-1, keepdim=True).real[..., None] * s_read]
            low_rank = cast(pairs(-u))
        return S4StepCoefficients(
            read=cast(torch.stack(read, 1)),
            same=cast(torch.stack([d.real, d.real], -2)),
            swap=cast(torch.stack([-d.imag, d.imag], -2)),
            b_bar=cast(pairs(b)),
            low_rank=low_rank,
            direct=cast(2 * (c * b).sum(-1).real + self.D.double()),
        )

    def init_state(self, batch: int, *, device=None, dtype=None) -> S4State:
        """The zero state with the step coefficients of the current parameters, in `dtype` (default: the
        layer's) on `device` (default: the layer's)."""
        coefficients = self._step_coefficients(self.D.device if device is None else device,
                                               self.D.dtype if dtype is None else dtype)
        return S4State(coefficients.same.new_zeros(batch, *coefficients.same.shape), coefficients)

    def step(self, u: torch.Tensor, state: S4State) -> tuple[torch.Tensor, S4State]:
        """One sample: u (batch, H) -> (y (batch, H), new state), O(H·N) for both kernels. The [Re, Im] flip
        (not a roll of one flat dimension) keeps every load contiguous, so inductor vectorises the update."""
        if u.ndim != 2 or u.shape[1] != self.kernel.d_model:
            raise ValueError(f"S4Conv.step expects (batch, {self.kernel.d_model}), got {tuple(u.shape)}")
        x, k = state
        r = (x[:, :, None] * k.read).sum((-2, -1))  # (batch, H, 1 or 2)
        y = r[..., -1] + k.direct * u
        x = x * k.same + x.flip(-2) * k.swap + u[..., None, None] * k.b_bar
        if k.low_rank is not None:
            x = x + r[..., 0, None, None] * k.low_rank
        return y, S4State(x, k)
