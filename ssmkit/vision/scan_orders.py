"""Scan orders: the ways a 2-D model flattens an H×W grid into a 1-D sequence.

A scan order is a permutation `perm` of the H·W grid cells, stored as row-major (raster) indices:
`perm[t]` is the cell visited at step t, so a sequence is `x.flatten(-2)[..., perm]` and
`inverse(H, W)` (`inv[perm[t]] = t`) puts a scanned sequence back. Orders are small hashable
`GridOrder` values; their permutations are built on CPU and cached per (order, H, W).

Leaf orders: `Raster`, `Snake` (continuous rows) and `NSS` (MaIR's nested S-shaped stripes).
Wrappers build the rest: `Flipped` (the sequence read backwards), `Rotated180` (the same path on the
180°-rotated image, `L-1-perm`) and `Transposed` (the path computed on the W×H transposed grid and
mapped back, e.g. column-major = `Transposed(Raster())`). Groups: `cross4()` (VMamba's SS2D cross scan)
and `mair4(stripe, shift)` (MaIR's four sequences). `get_scan_order(name, **opts)` gives any of them
by name as a tuple of orders; `gather` / `merge` move (batch, C, H, W) maps to (batch, K, C, L)
sequences and back; `GridSequenceOrder` lets `ssmkit.core.Mamba` run its second branch in a grid order.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Sequence, Union

import torch

from ssmkit.core.mamba import SequenceOrder

__all__ = [
    "GridOrder",
    "Raster",
    "Snake",
    "NSS",
    "Flipped",
    "Rotated180",
    "Transposed",
    "cross4",
    "mair4",
    "SCAN_ORDERS",
    "get_scan_order",
    "gather",
    "merge",
    "GridSequenceOrder",
]


def _check_size(H: int, W: int) -> None:
    if int(H) != H or int(W) != W or H < 1 or W < 1:
        raise ValueError(f"grid size must be two positive integers, got (H, W) = ({H!r}, {W!r})")


@functools.lru_cache(maxsize=256)
def _perm_cached(order: "GridOrder", H: int, W: int) -> torch.Tensor:
    perm = order._build(H, W).to(torch.long)
    if perm.shape != (H * W,) or not torch.equal(perm.sort().values, torch.arange(H * W)):
        raise ValueError(f"{order!r} did not build a permutation of the {H}x{W} grid")
    return perm


@functools.lru_cache(maxsize=256)
def _inverse_cached(order: "GridOrder", H: int, W: int) -> torch.Tensor:
    perm = _perm_cached(order, H, W)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(H * W)
    return inv


class GridOrder:
    """A permutation of the H×W grid in row-major indices; subclasses implement `_build(H, W)`.

    Subclasses are frozen dataclasses, so equal orders hash equal and share one cache entry. The
    cached tensors are shared: treat them as read-only.
    """

    def _build(self, H: int, W: int) -> torch.Tensor:
        raise NotImplementedError

    def perm(self, H: int, W: int) -> torch.Tensor:
        """(H·W,) LongTensor on CPU: `perm[t]` is the row-major index of the cell visited at step t."""
        _check_size(H, W)
        return _perm_cached(self, int(H), int(W))

    def inverse(self, H: int, W: int) -> torch.Tensor:
        """(H·W,) LongTensor on CPU with `inverse[perm[t]] = t` (the scatter back to raster order)."""
        _check_size(H, W)
        return _inverse_cached(self, int(H), int(W))

    def sequence_order(self, H: int, W: int) -> "GridSequenceOrder":
        """This order on an H×W grid as a `SequenceOrder` for `Mamba(branch_order=...)`."""
        return GridSequenceOrder(self, H, W)


@dataclass(frozen=True)
class Raster(GridOrder):
    """Row by row, each row left to right: `arange(H·W)`."""

    def _build(self, H, W):
        return torch.arange(H * W)


@dataclass(frozen=True)
class Snake(GridOrder):
    """Continuous rows (boustrophedon): even rows left to right, odd rows right to left (ViG's zigzag)."""

    def _build(self, H, W):
        grid = torch.arange(H * W).view(H, W)
        grid[1::2] = grid[1::2].flip(-1)
        return grid.reshape(-1)


@dataclass(frozen=True)
class NSS(GridOrder):
    """MaIR's nested S-shaped scan over vertical stripes of width `stripe`, with a stripe `shift`.

    The columns are cut into stripes: [0, shift) first when shift > 0, then full stripes of width
    `stripe`, then whatever is left. Stripe n (counting the narrow first one) visits its rows top to
    bottom when n is even and bottom to top when n is odd; the m-th row it visits runs left to right
    when m is even and right to left when m is odd. MaIR's odd blocks use shift = stripe // 2.
    """

    stripe: int
    shift: int = 0

    def __post_init__(self):
        if int(self.stripe) != self.stripe or self.stripe < 1:
            raise ValueError(f"NSS stripe must be a positive integer, got {self.stripe!r}")
        if int(self.shift) != self.shift or not 0 <= self.shift < self.stripe:
            raise ValueError(f"NSS shift must be an integer in [0, stripe={self.stripe}), got {self.shift!r}")

    def _build(self, H, W):
        starts = ([0] if self.shift > 0 else []) + list(range(self.shift, W, self.stripe))
        edges = starts + [W]
        out = []
        for n, (a, b) in enumerate(zip(edges[:-1], edges[1:])):
            rows = range(H) if n % 2 == 0 else range(H - 1, -1, -1)
            for m, r in enumerate(rows):
                cols = range(a, b) if m % 2 == 0 else range(b - 1, a - 1, -1)
                out.extend(r * W + c for c in cols)
        return torch.tensor(out, dtype=torch.long)


@dataclass(frozen=True)
class Flipped(GridOrder):
    """`base` read backwards (sequence reversal): `perm.flip(0)`."""

    base: GridOrder

    def _build(self, H, W):
        return self.base.perm(H, W).flip(0)


@dataclass(frozen=True)
class Rotated180(GridOrder):
    """`base`'s path on the 180°-rotated image: `H·W - 1 - perm` (not the reversed sequence)."""

    base: GridOrder

    def _build(self, H, W):
        return H * W - 1 - self.base.perm(H, W)


@dataclass(frozen=True)
class Transposed(GridOrder):
    """`base`'s path on the transposed W×H grid, mapped back: q -> (q mod H)·W + q div H."""

    base: GridOrder

    def _build(self, H, W):
        q = self.base.perm(W, H)
        return (q % H) * W + q // H


def cross4() -> tuple[GridOrder, ...]:
    """VMamba's SS2D cross scan: raster, column-major, reversed raster, reversed column-major."""
    column = Transposed(Raster())
    return (Raster(), column, Flipped(Raster()), Flipped(column))


def mair4(stripe: int, shift: int = 0) -> tuple[GridOrder, ...]:
    """MaIR's four sequences: NSS, its 180° rotation, NSS on the transposed grid, and its rotation."""
    nss = NSS(stripe, shift)
    return (nss, Rotated180(nss), Transposed(nss), Rotated180(Transposed(nss)))


SCAN_ORDERS: dict[str, Callable[..., tuple[GridOrder, ...]]] = {
    "raster": lambda: (Raster(),),
    "reverse": lambda: (Flipped(Raster()),),
    "column": lambda: (Transposed(Raster()),),
    "column_reverse": lambda: (Flipped(Transposed(Raster())),),
    "snake": lambda: (Snake(),),
    "snake_column": lambda: (Transposed(Snake()),),
    "bidirectional": lambda: (Raster(), Flipped(Raster())),
    "cross4": cross4,
    "nss": lambda stripe, shift=0: (NSS(stripe, shift),),
    "mair_nss": mair4,
}


def get_scan_order(name: str, **opts) -> tuple[GridOrder, ...]:
    """The orders registered as `name` in `SCAN_ORDERS`, always a tuple (K = 1 for single orders).

    "nss" and "mair_nss" take `stripe` and optional `shift`; the other names take no options.
    """
    if name not in SCAN_ORDERS:
        raise ValueError(f"unknown scan order {name!r}; choose one of {sorted(SCAN_ORDERS)}")
    try:
        return SCAN_ORDERS[name](**opts)
    except TypeError as err:
        raise ValueError(f"bad options {opts} for scan order {name!r}: {err}") from None


Orders = Union[GridOrder, Sequence[GridOrder]]


def _as_tuple(orders: Orders) -> tuple[GridOrder, ...]:
    orders = (orders,) if isinstance(orders, GridOrder) else tuple(orders)
    if not orders or not all(isinstance(o, GridOrder) for o in orders):
        raise ValueError(f"orders must be a GridOrder or a non-empty sequence of them, got {orders!r}")
    return orders


@functools.lru_cache(maxsize=256)
def _stacked(orders: tuple[GridOrder, ...], H: int, W: int, device: torch.device,
             inverse: bool) -> torch.Tensor:
    """(K, H·W) permutations (or inverses) of `orders` on `device`, cached so a forward pass moves none."""
    return torch.stack([o.inverse(H, W) if inverse else o.perm(H, W) for o in orders]).to(device)


def gather(x: torch.Tensor, orders: Orders) -> torch.Tensor:
    """(batch, C, H, W) -> (batch, K, C, H·W): the K scan sequences of `x`, one per order."""
    orders = _as_tuple(orders)
    if x.dim() != 4:
        raise ValueError(f"gather expects x of shape (batch, channels, H, W), got {tuple(x.shape)}")
    b, c, h, w = x.shape
    idx = _stacked(orders, h, w, x.device, False)
    seqs = x.reshape(b, c, h * w).index_select(2, idx.reshape(-1))
    return seqs.view(b, c, len(orders), h * w).transpose(1, 2)


def merge(ys: torch.Tensor, orders: Orders, size: tuple[int, int]) -> torch.Tensor:
    """(batch, K, C, L) -> (batch, C, H, W): put each sequence back in raster order and sum over K.

    `size` = (H, W) with H·W = L. This is VMamba's cross merge and the adjoint of `gather`.
    """
    orders = _as_tuple(orders)
    h, w = size
    _check_size(h, w)
    if ys.dim() != 4 or ys.shape[1] != len(orders) or ys.shape[3] != h * w:
        raise ValueError(f"merge expects ys of shape (batch, K={len(orders)}, channels, L={h}*{w}={h * w}), "
                         f"got {tuple(ys.shape)}")
    b, k, c, length = ys.shape
    inv = _stacked(orders, h, w, ys.device, True)
    back = torch.gather(ys, 3, inv[None, :, None, :].expand(b, k, c, length))
    return back.sum(1).view(b, c, h, w)


class GridSequenceOrder(SequenceOrder):
    """A grid order as a `SequenceOrder` for the second branch of `ssmkit.core.Mamba`.

    The mixer's sequence must be the raster-flattened H×W image (length H·W, token t = cell
    (t div W, t mod W)); the branch then scans it in `order`. Other lengths raise ValueError.
    """

    def __init__(self, order: GridOrder, H: int, W: int):
        if not isinstance(order, GridOrder):
            raise ValueError(f"GridSequenceOrder needs a GridOrder, got {order!r}")
        _check_size(H, W)
        self.order, self.H, self.W = order, int(H), int(W)

    def index(self, length: int, device: torch.device) -> torch.Tensor:
        if length != self.H * self.W:
            raise ValueError(f"{self!r} scans a raster-flattened {self.H}x{self.W} image of length "
                             f"{self.H * self.W}, but the sequence has length {length}")
        return self.order.perm(self.H, self.W).to(device)

    def __repr__(self) -> str:
        return f"GridSequenceOrder({self.order!r}, H={self.H}, W={self.W})"
