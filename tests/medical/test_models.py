"""MambaMIL and the baselines: SR reorder, the permuted branch, bag-order behaviour, shapes, init,
reference checkpoints, long bags."""
import math

import pytest
import torch

import ssmkit
from ssmkit.core.mamba import Mamba, StridedOrder
from ssmkit.errors import CheckpointError
from ssmkit.medical.mambamil import MambaMIL, MambaMIL2D, grid_positions

NAMES = ("mambamil", "mambamil_2d", "abmil", "transmil_lite", "meanmil", "maxmil")
SMALL = {"mambamil": dict(d_model=16, n_layers=1), "mambamil_2d": dict(d_model=16, n_layers=1),
         "abmil": dict(d_model=16), "transmil_lite": dict(d_model=16, heads=2), "meanmil": dict(d_model=16),
         "maxmil": dict(d_model=16)}


def grid_coords(n, width=7, step=256):
    i = torch.arange(n)
    return torch.stack([i % width, i // width], 1) * step


def hand_order(length, rate):
    """The SR order written out: positions k*R + w for w in 0..R-1, then k in 0..K-1 (padded)."""
    rows = math.ceil(length / rate)
    return [k * rate + w for w in range(rate) for k in range(rows)]


@pytest.mark.parametrize("length,rate", [(7, 3), (9, 3), (2, 5), (5, 1), (10, 4)])
def test_sr_reorder_and_inverse(length, rate):
    order = StridedOrder(rate)
    assert order.index(length, "cpu").tolist() == hand_order(length, rate)
    if (length, rate) == (7, 3):
        assert hand_order(7, 3) == [0, 3, 6, 1, 4, 7, 2, 5, 8]
    x = torch.arange(1.0, length + 1).view(1, 1, length)
    gathered = order.gather(x)
    expected = [float(i + 1) if i < length else 0.0 for i in hand_order(length, rate)]
    assert gathered.view(-1).tolist() == expected
    assert torch.equal(order.scatter(gathered, length), x)


def test_permuted_branch_is_the_mixer_on_the_reordered_sequence():
    torch.manual_seed(0)
    L, R, d = 7, 3, 8
    sr = Mamba(d, d_state=4, branch_order=StridedOrder(R), divide_out=False).double()
    forward_only, branch_only = Mamba(d, d_state=4).double(), Mamba(d, d_state=4).double()
    shared = {k: v for k, v in sr.state_dict().items() if k.startswith(("in_proj", "out_proj"))}
    fwd = {k: v for k, v in sr.state_dict().items() if k.split(".")[0] in ("conv1d", "x_proj", "dt_proj", "A_log", "D")}
    bwd = {k.replace("_b", "").replace("A_b_log", "A_log"): v for k, v in sr.state_dict().items()
           if k.split(".")[0] in ("conv1d_b", "x_proj_b", "dt_proj_b", "A_b_log", "D_b")}
    bwd = {("A_log" if k == "A_b_log" else k): v for k, v in bwd.items()}
    forward_only.load_state_dict({**shared, **fwd})
    branch_only.load_state_dict({**shared, **bwd})
    x = torch.randn(1, L, d, dtype=torch.float64)
    padded = torch.cat([x, x.new_zeros(1, 9 - L, d)], 1)  # in_proj has no bias: zero rows = zero xz
    reordered = padded[:, hand_order(L, R)]
    y_branch = branch_only(reordered)
    inverse = torch.tensor([hand_order(L, R).index(i) for i in range(L)])
    expected = forward_only(x) + y_branch[:, inverse]
    torch.testing.assert_close(sr(x), expected)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("n", [1, 4, 23])
def test_registered_models_shapes(name, n):
    model = ssmkit.create_model(name, in_dim=12, n_classes=3, **SMALL[name]).eval()
    out = model(torch.randn(n, 12), grid_coords(n))
    assert out["logits"].shape == (1, 3)
    if out["scores"] is not None:
        assert out["scores"].shape == (n,)
    if name in ("mambamil", "mambamil_2d", "abmil"):
        torch.testing.assert_close(out["scores"].sum(), torch.tensor(1.0))


@pytest.mark.parametrize("name", NAMES)
def test_bag_order_sensitivity(name):
    torch.manual_seed(1)
    model = ssmkit.create_model(name, in_dim=12, n_classes=2, **SMALL[name]).eval()
    x, coords = torch.randn(21, 12), grid_coords(21)
    perm = torch.randperm(21)
    with torch.no_grad():
        a = model(x, coords)["logits"]
        b = model(x[perm], coords[perm])["logits"]
        c = model(x[perm], coords)["logits"]  # instances moved to other grid cells
    if name == "mambamil":  # scanned in the given order: order matters by design
        assert not torch.allclose(a, b, atol=1e-5)
    elif name == "mambamil_2d":  # placed by coords: invariant to listing order, not to the layout
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(a, c, atol=1e-5)
    elif name == "transmil_lite":  # PPEG lays the instances on a grid in listing order
        assert not torch.allclose(a, b, atol=1e-5)
    else:
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_feature_width_mismatch_names_both_numbers():
    model = ssmkit.create_model("mambamil", in_dim=1024, d_model=16, n_layers=1)
    with pytest.raises(ValueError, match=r"feature width 512 does not match the model's in_dim 1024"):
        model(torch.randn(5, 512))
    with pytest.raises(ValueError, match="empty bag"):
        model(torch.randn(0, 1024))
    with pytest.raises(ValueError, match="coords"):
        ssmkit.create_model("mambamil_2d", in_dim=8, d_model=8, n_layers=1)(torch.randn(3, 8))


def test_reference_parameter_count_and_init():
    model = ssmkit.create_model("mambamil")  # in_dim 1024, 2 SR layers, 2 classes, as published
    assert sum(p.numel() for p in model.parameters()) == 4_227_843
    dt_bias = model.layers[0][1].dt_proj.bias
    assert torch.count_nonzero(dt_bias) == 0  # the reference re-init zeroes Mamba's dt bias
    kept = MambaMIL(in_dim=8, d_model=16, n_layers=1, init="mamba").layers[0][1].dt_proj.bias
    assert (torch.nn.functional.softplus(kept) > 0.5e-3).all() and (torch.nn.functional.softplus(kept) < 0.11).all()


def test_reference_checkpoint_loads_from_local_file(tmp_path):
    """A state dict under the reference code's key names (DataParallel prefix included) loads unchanged."""
    d, e, n, r = 512, 1024, 16, 32
    keys = {"_fc1.0.weight": (d, 1024), "_fc1.0.bias": (d,), "norm.weight": (d,), "norm.bias": (d,),
            "attention.0.weight": (128, d), "attention.0.bias": (128,), "attention.2.weight": (1, 128),
            "attention.2.bias": (1,), "classifier.weight": (2, d), "classifier.bias": (2,)}
    for i in range(2):
        keys.update({f"layers.{i}.0.weight": (d,), f"layers.{i}.0.bias": (d,),
                     f"layers.{i}.1.in_proj.weight": (2 * e, d), f"layers.{i}.1.out_proj.weight": (d, e)})
        for s in ("", "_b"):
            keys.update({f"layers.{i}.1.conv1d{s}.weight": (e, 1, 4), f"layers.{i}.1.conv1d{s}.bias": (e,),
                         f"layers.{i}.1.x_proj{s}.weight": (r + 2 * n, e), f"layers.{i}.1.dt_proj{s}.weight": (e, r),
                         f"layers.{i}.1.dt_proj{s}.bias": (e,), f"layers.{i}.1.{'A_b_log' if s else 'A_log'}": (e, n),
                         f"layers.{i}.1.D{s}": (e,)})
    torch.manual_seed(0)
    state = {f"module.{k}": torch.randn(shape) for k, shape in keys.items()}
    torch.save(state, tmp_path / "s_0_checkpoint.pt")
    model = ssmkit.load_official(ssmkit.create_model("mambamil"), tmp_path / "s_0_checkpoint.pt")
    torch.testing.assert_close(model.layers[1][1].A_b_log, state["module.layers.1.1.A_b_log"])
    by_name = ssmkit.load_official("mambamil", tmp_path / "s_0_checkpoint.pt")
    torch.testing.assert_close(by_name.classifier.weight, state["module.classifier.weight"])
    with pytest.raises(CheckpointError, match=r"s_0_checkpoint.pt: does not fit mambamil \(n_layers=3\): missing"):
        ssmkit.load_official("mambamil", tmp_path / "s_0_checkpoint.pt", n_layers=3)


def test_grid_positions():
    coords = torch.tensor([[512, 256], [1024, 256], [512, 768]])
    cells, hw = grid_positions(coords, step=256)
    assert hw == (3, 3) and cells.tolist() == [[0, 0], [0, 2], [2, 0]]
    cells, hw = grid_positions(coords)  # inferred stride: the gcd of the offsets, 512 here
    assert hw == (2, 2) and cells.tolist() == [[0, 0], [0, 1], [1, 0]]
    with pytest.raises(ValueError, match="share one grid cell"):
        grid_positions(torch.tensor([[0, 0], [0, 0]]), step=256)


def test_100k_instance_bag_forward():
    """Bags of 10^5 instances run on CPU: the scan is linear in the bag length."""
    model = MambaMIL(in_dim=8, n_classes=2, d_model=8, n_layers=1, d_state=4).eval()
    with torch.no_grad():
        out = model(torch.randn(100_000, 8))
    assert out["logits"].shape == (1, 2) and torch.isfinite(out["logits"]).all()
    assert out["scores"].shape == (100_000,)


def test_mambamil_2d_on_a_sparse_tissue_grid_matches_dense_placement():
    """Instances on a grid with holes: the model sees empty cells as zeros, whatever the listing order."""
    torch.manual_seed(2)
    model = MambaMIL2D(in_dim=6, n_classes=2, d_model=8, n_layers=1, d_state=4).eval()
    coords = torch.tensor([[0, 0], [2, 0], [1, 1], [0, 2], [2, 2]]) * 128
    x = torch.randn(5, 6)
    with torch.no_grad():
        out = model(x, coords)
        shifted = model(x, coords + torch.tensor([4096, 1024]))  # the origin of the slide does not matter
    torch.testing.assert_close(out["logits"], shifted["logits"])


@pytest.mark.parametrize("mixer,count", [("sr", 4_227_843), ("mamba2", 3_802_275), ("hydra", 3_891_043)])
def test_ssd_mixers(mixer, count):
    from ssmkit.core.hydra import Hydra
    from ssmkit.core.mamba2 import Mamba2

    with torch.device("meta"):
        full = ssmkit.create_model("mambamil", mixer=mixer)
    assert sum(p.numel() for p in full.parameters()) == count
    kind = {"sr": Mamba, "mamba2": Mamba2, "hydra": Hydra}[mixer]
    assert isinstance(full.layers[0][1], kind)
    torch.manual_seed(0)
    model = ssmkit.create_model("mambamil", in_dim=8, d_model=16, n_layers=1, mixer=mixer, headdim=8)
    out = model(torch.randn(30, 8))
    assert out["logits"].shape == (1, 2) and out["scores"].shape == (30,)
    out["logits"].sum().backward()
    assert all(p.grad is not None for p in model.parameters())
