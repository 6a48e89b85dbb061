"""Tests of ssmkit.vision.scan_orders: hand-written golden paths, inverses, gather/merge adjointness,
and grid orders inside the Mamba mixer's second branch."""
import pytest
import torch
import torch.nn.functional as F

from ssmkit.core.mamba import Mamba
from ssmkit.core.scan import selective_scan
from ssmkit.vision.scan_orders import (NSS, SCAN_ORDERS, Flipped, GridOrder, GridSequenceOrder, Raster,
                                       Rotated180, Snake, Transposed, cross4, gather, get_scan_order, mair4,
                                       merge)


def _perm(steps):
    """Golden tables give the visit step of every cell; the permutation lists cells by step."""
    return torch.tensor(steps).flatten().argsort()


def _one(name, **opts):
    (order,) = get_scan_order(name, **opts)
    return order


# ------------------------------------------------------------------------------------------------
# golden paths, written out by hand (each cell holds the step at which the scan visits it)

GOLDEN = {
    # ---- 4x6
    ("raster", 4, 6, ()): [[0, 1, 2, 3, 4, 5],
                           [6, 7, 8, 9, 10, 11],
                           [12, 13, 14, 15, 16, 17],
                           [18, 19, 20, 21, 22, 23]],
    ("reverse", 4, 6, ()): [[23, 22, 21, 20, 19, 18],
                            [17, 16, 15, 14, 13, 12],
                            [11, 10, 9, 8, 7, 6],
                            [5, 4, 3, 2, 1, 0]],
    ("column", 4, 6, ()): [[0, 4, 8, 12, 16, 20],
                           [1, 5, 9, 13, 17, 21],
                           [2, 6, 10, 14, 18, 22],
                           [3, 7, 11, 15, 19, 23]],
    ("column_reverse", 4, 6, ()): [[23, 19, 15, 11, 7, 3],
                                   [22, 18, 14, 10, 6, 2],
                                   [21, 17, 13, 9, 5, 1],
                                   [20, 16, 12, 8, 4, 0]],
    ("snake", 4, 6, ()): [[0, 1, 2, 3, 4, 5],
                          [11, 10, 9, 8, 7, 6],
                          [12, 13, 14, 15, 16, 17],
                          [23, 22, 21, 20, 19, 18]],
    ("snake_column", 4, 6, ()): [[0, 7, 8, 15, 16, 23],
                                 [1, 6, 9, 14, 17, 22],
                                 [2, 5, 10, 13, 18, 21],
                                 [3, 4, 11, 12, 19, 20]],
    # ---- 5x5
    ("raster", 5, 5, ()): [[0, 1, 2, 3, 4],
                           [5, 6, 7, 8, 9],
                           [10, 11, 12, 13, 14],
                           [15, 16, 17, 18, 19],
                           [20, 21, 22, 23, 24]],
    ("reverse", 5, 5, ()): [[24, 23, 22, 21, 20],
                            [19, 18, 17, 16, 15],
                            [14, 13, 12, 11, 10],
                            [9, 8, 7, 6, 5],
                            [4, 3, 2, 1, 0]],
    ("column", 5, 5, ()): [[0, 5, 10, 15, 20],
                           [1, 6, 11, 16, 21],
                           [2, 7, 12, 17, 22],
                           [3, 8, 13, 18, 23],
                           [4, 9, 14, 19, 24]],
    ("column_reverse", 5, 5, ()): [[24, 19, 14, 9, 4],
                                   [23, 18, 13, 8, 3],
                                   [22, 17, 12, 7, 2],
                                   [21, 16, 11, 6, 1],
                                   [20, 15, 10, 5, 0]],
    ("snake", 5, 5, ()): [[0, 1, 2, 3, 4],
                          [9, 8, 7, 6, 5],
                          [10, 11, 12, 13, 14],
                          [19, 18, 17, 16, 15],
                          [20, 21, 22, 23, 24]],
    ("snake_column", 5, 5, ()): [[0, 9, 10, 19, 20],
                                 [1, 8, 11, 18, 21],
                                 [2, 7, 12, 17, 22],
                                 [3, 6, 13, 16, 23],
                                 [4, 5, 14, 15, 24]],
    # ---- MaIR NSS: 4x8, stripe 4 (a worked example, seq0)
    ("nss", 4, 8, (("stripe", 4),)): [[0, 1, 2, 3, 31, 30, 29, 28],
                                      [7, 6, 5, 4, 24, 25, 26, 27],
                                      [8, 9, 10, 11, 23, 22, 21, 20],
                                      [15, 14, 13, 12, 16, 17, 18, 19]],
    # 4x6, stripe 4 does not divide W: stripes [0,4) down, [4,6) up
    ("nss", 4, 6, (("stripe", 4),)): [[0, 1, 2, 3, 23, 22],
                                      [7, 6, 5, 4, 20, 21],
                                      [8, 9, 10, 11, 19, 18],
                                      [15, 14, 13, 12, 16, 17]],
    # 5x5, stripe 2, shift 1: stripes [0,1) down, [1,3) up, [3,5) down
    ("nss", 5, 5, (("stripe", 2), ("shift", 1))): [[0, 13, 14, 15, 16],
                                                   [1, 12, 11, 18, 17],
                                                   [2, 9, 10, 19, 20],
                                                   [3, 8, 7, 22, 21],
                                                   [4, 5, 6, 23, 24]],
    # 4x10, stripe 4, shift 2: stripes [0,2) down, [2,6) up, [6,10) down
    ("nss", 4, 10, (("stripe", 4), ("shift", 2))): [[0, 1, 23, 22, 21, 20, 24, 25, 26, 27],
                                                    [3, 2, 16, 17, 18, 19, 31, 30, 29, 28],
                                                    [4, 5, 15, 14, 13, 12, 32, 33, 34, 35],
                                                    [7, 6, 8, 9, 10, 11, 39, 38, 37, 36]],
}

# MaIR's four sequences (seq0..seq3 = NSS, rot180, transposed, rot180 of transposed)
MAIR_GOLDEN = {
    (4, 8, 4, 0): [
        GOLDEN[("nss", 4, 8, (("stripe", 4),))],
        [[19, 18, 17, 16, 12, 13, 14, 15],
         [20, 21, 22, 23, 11, 10, 9, 8],
         [27, 26, 25, 24, 4, 5, 6, 7],
         [28, 29, 30, 31, 3, 2, 1, 0]],
        [[0, 7, 8, 15, 16, 23, 24, 31],  # seq2 of the worked example
         [1, 6, 9, 14, 17, 22, 25, 30],
         [2, 5, 10, 13, 18, 21, 26, 29],
         [3, 4, 11, 12, 19, 20, 27, 28]],
        [[28, 27, 20, 19, 12, 11, 4, 3],
         [29, 26, 21, 18, 13, 10, 5, 2],
         [30, 25, 22, 17, 14, 9, 6, 1],
         [31, 24, 23, 16, 15, 8, 7, 0]],
    ],
    (4, 6, 4, 0): [
        GOLDEN[("nss", 4, 6, (("stripe", 4),))],
        [[17, 16, 12, 13, 14, 15],
         [18, 19, 11, 10, 9, 8],
         [21, 20, 4, 5, 6, 7],
         [22, 23, 3, 2, 1, 0]],
        [[0, 7, 8, 15, 16, 23],
         [1, 6, 9, 14, 17, 22],
         [2, 5, 10, 13, 18, 21],
         [3, 4, 11, 12, 19, 20]],
        [[20, 19, 12, 11, 4, 3],
         [21, 18, 13, 10, 5, 2],
         [22, 17, 14, 9, 6, 1],
         [23, 16, 15, 8, 7, 0]],
    ],
    (5, 5, 2, 1): [
        GOLDEN[("nss", 5, 5, (("stripe", 2), ("shift", 1)))],
        [[24, 23, 6, 5, 4],
         [21, 22, 7, 8, 3],
         [20, 19, 10, 9, 2],
         [17, 18, 11, 12, 1],
         [16, 15, 14, 13, 0]],
        [[0, 1, 2, 3, 4],  # row bands [0,1), [1,3), [3,5), read column by column
         [13, 12, 9, 8, 5],
         [14, 11, 10, 7, 6],
         [15, 18, 19, 22, 23],
         [16, 17, 20, 21, 24]],
        [[24, 21, 20, 17, 16],
         [23, 22, 19, 18, 15],
         [6, 7, 10, 11, 14],
         [5, 8, 9, 12, 13],
         [4, 3, 2, 1, 0]],
    ],
}


@pytest.mark.parametrize("key", list(GOLDEN), ids=lambda k: f"{k[0]}-{k[1]}x{k[2]}-{dict(k[3])}")
def test_golden_single_orders(key):
    name, h, w, opts = key
    order = _one(name, **dict(opts))
    assert torch.equal(order.perm(h, w), _perm(GOLDEN[key]))


@pytest.mark.parametrize("key", list(MAIR_GOLDEN), ids=lambda k: "{}x{}-s{}-shift{}".format(*k))
def test_golden_mair_sequences(key):
    h, w, stripe, shift = key
    orders = get_scan_order("mair_nss", stripe=stripe, shift=shift)
    assert orders == mair4(stripe, shift)
    for order, table in zip(orders, MAIR_GOLDEN[key]):
        assert torch.equal(order.perm(h, w), _perm(table)), order


def test_cross4_is_vmamba_routes():
    orders = get_scan_order("cross4")
    assert orders == cross4()
    for order, name in zip(orders, ("raster", "column", "reverse", "column_reverse")):
        for h, w in ((4, 6), (5, 5)):
            assert torch.equal(order.perm(h, w), _perm(GOLDEN[(name, h, w, ())]))
    # VMamba's route definitions on a (1, 1, H, W) map: row flatten, transposed flatten, their flips
    x = torch.arange(12.0).view(1, 1, 3, 4)
    seqs = gather(x, orders)[0, :, 0]
    k0, k1 = x.flatten(), x.transpose(-1, -2).flatten()
    assert torch.equal(seqs, torch.stack([k0, k1, k0.flip(0), k1.flip(0)]))


# ------------------------------------------------------------------------------------------------
# properties over all orders and awkward sizes

ALL_ORDERS = [o for name, f in SCAN_ORDERS.items() if name not in ("nss", "mair_nss") for o in f()]
ALL_ORDERS += [o for s, sh in ((1, 0), (2, 1), (3, 0), (3, 2), (4, 2), (8, 4)) for o in mair4(s, sh)]
SIZES = [(1, 1), (1, 7), (7, 1), (2, 3), (3, 5), (6, 4), (5, 9)]


@pytest.mark.parametrize("h,w", SIZES)
def test_every_order_is_a_bijection_and_inverse_round_trips(h, w):
    ar = torch.arange(h * w)
    for order in ALL_ORDERS:
        perm, inv = order.perm(h, w), order.inverse(h, w)
        assert torch.equal(perm.sort().values, ar), (order, h, w)
        assert torch.equal(perm[inv], ar) and torch.equal(inv[perm], ar), (order, h, w)
        assert order.perm(h, w) is perm  # cached per (order, H, W)


@pytest.mark.parametrize("h,w,stripe,shift", [(5, 9, 4, 0), (5, 9, 4, 2), (3, 2, 4, 1), (4, 9, 4, 0),
                                              (6, 10, 3, 1), (1, 5, 2, 0)])
def test_nss_continuity(h, w, stripe, shift):
    """4-connected everywhere when H is odd; one jump along the boundary row per stripe change otherwise."""
    perm = NSS(stripe, shift).perm(h, w)
    r, c = perm // w, perm % w
    dist = (r[1:] - r[:-1]).abs() + (c[1:] - c[:-1]).abs()
    widths = [shift] * (shift > 0) + [min(stripe, w - a) for a in range(shift, w, stripe)]
    if h % 2 == 1:
        assert bool((dist == 1).all())
    else:
        jumps = dist[dist != 1].tolist()
        assert jumps == [wd for wd in widths[:-1] if wd != 1]  # a jump crosses the stripe just finished


def test_wrappers_compose():
    h, w = 3, 5
    nss = NSS(2, 1)
    assert torch.equal(Rotated180(nss).perm(h, w), h * w - 1 - nss.perm(h, w))
    assert torch.equal(Flipped(nss).perm(h, w), nss.perm(h, w).flip(0))
    assert torch.equal(Transposed(Transposed(nss)).perm(h, w), nss.perm(h, w))
    assert Flipped(Raster()) == Flipped(Raster()) and hash(NSS(4, 2)) == hash(NSS(4, 2))
    assert Raster() != Snake()


# ------------------------------------------------------------------------------------------------
# gather / merge


@pytest.mark.parametrize("orders", [cross4(), mair4(3, 1), (Snake(),)], ids=["cross4", "mair4", "snake"])
def test_merge_is_adjoint_of_gather(orders):
    g = torch.Generator().manual_seed(0)
    h, w = 5, 7
    x = torch.randn(2, 3, h, w, generator=g, dtype=torch.float64)
    y = torch.randn(2, len(orders), 3, h * w, generator=g, dtype=torch.float64)
    gx = gather(x, orders)
    assert gx.shape == (2, len(orders), 3, h * w)
    torch.testing.assert_close((gx * y).sum(), (x * merge(y, orders, (h, w))).sum())
    torch.testing.assert_close(merge(gx, orders, (h, w)), len(orders) * x)
    for k, order in enumerate(orders):
        assert torch.equal(gx[:, k], x.flatten(2)[..., order.perm(h, w)])


def test_gather_merge_accept_single_order_and_backprop():
    x = torch.randn(1, 2, 3, 4, requires_grad=True)
    ys = gather(x, Snake())
    assert ys.shape == (1, 1, 2, 12)
    merge(ys, Snake(), (3, 4)).sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))


def test_validation_errors_name_shapes():
    with pytest.raises(ValueError, match=r"\(2, 3, 4\)"):
        gather(torch.zeros(2, 3, 4), cross4())
    with pytest.raises(ValueError, match=r"K=4.*\(1, 2, 3, 12\)"):
        merge(torch.zeros(1, 2, 3, 12), cross4(), (3, 4))
    with pytest.raises(ValueError, match=r"L=3\*5=15"):
        merge(torch.zeros(1, 4, 3, 12), cross4(), (3, 5))
    with pytest.raises(ValueError, match="unknown scan order 'zigzag'"):
        get_scan_order("zigzag")
    with pytest.raises(ValueError, match="bad options"):
        get_scan_order("raster", stripe=4)
    with pytest.raises(ValueError, match="shift"):
        NSS(4, 4)
    with pytest.raises(ValueError, match="grid size"):
        Raster().perm(0, 3)
    with pytest.raises(ValueError, match="GridOrder"):
        gather(torch.zeros(1, 1, 2, 2), ["raster"])


# ------------------------------------------------------------------------------------------------
# inside the Mamba mixer's second branch


def _branch(m, x, z, sfx):
    """One direction of the mixer from its submodules (x, z: (batch, d_inner, L))."""
    conv, x_proj, dt_proj = (getattr(m, n + sfx) for n in ("conv1d", "x_proj", "dt_proj"))
    a_log, d = getattr(m, "A_log" if sfx == "" else "A_b_log"), getattr(m, "D" + sfx)
    length = x.shape[-1]
    x = F.silu(F.conv1d(x, conv.weight, conv.bias, padding=m.d_conv - 1, groups=m.d_inner)[..., :length])
    dt, b, c = torch.einsum("bel,ke->bkl", x, x_proj.weight).split([m.dt_rank, m.d_state, m.d_state], dim=1)
    delta = torch.einsum("brl,er->bel", dt, dt_proj.weight)
    return selective_scan(x, delta, -torch.exp(a_log), b, c, D=d, z=z, delta_bias=dt_proj.bias,
                          delta_softplus=True, backend="ref")


@pytest.mark.parametrize("order", [NSS(2, 1), Transposed(Snake())], ids=repr)
def test_grid_order_in_mamba_branch(order):
    torch.manual_seed(0)
    h, w, d_model = 3, 5, 8
    m = Mamba(d_model, d_state=4, branch_order=order.sequence_order(h, w), dtype=torch.float64)
    x = torch.randn(2, h * w, d_model, dtype=torch.float64)  # the raster-flattened 3x5 image
    xs, z = torch.einsum("bld,kd->bkl", x, m.in_proj.weight).chunk(2, dim=1)
    perm = order.perm(h, w)
    y_b = torch.empty_like(xs)
    y_b[..., perm] = _branch(m, xs[..., perm], z[..., perm], "_b")
    expected = torch.einsum("bel,de->bld", (_branch(m, xs, z, "") + y_b) / 2, m.out_proj.weight)
    torch.testing.assert_close(m(x), expected)
    with pytest.raises(ValueError, match="length 15"):
        m(x[:, :-1])


def test_grid_sequence_order_rejects_non_grid_order():
    with pytest.raises(ValueError, match="GridOrder"):
        GridSequenceOrder("snake", 2, 2)
    assert isinstance(Raster(), GridOrder)
