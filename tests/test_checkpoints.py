"""Reading checkpoint files (ssmkit.checkpoints): formats, containers, prefixes, code that must not run,
and one-line errors naming the file."""
import argparse
import os

import pytest
import torch
from safetensors.torch import save_file

from ssmkit.checkpoints import read_state_dict, unwrap_state_dict
from ssmkit.errors import CheckpointError

WEIGHTS = {"a.weight": torch.ones(2, 3), "b": torch.arange(4)}


class RunsCode:
    """A pickled object whose unpickling would run a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _same(state, expected=WEIGHTS):
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in expected)


@pytest.mark.parametrize("container", [
    lambda w: w, lambda w: {"state_dict": w, "epoch": 3}, lambda w: {"model": w, "optimizer": {"lr": 1.0}},
    lambda w: {"params": w}, lambda w: {"model": {"state_dict": w}},
    lambda w: {"model": {f"module.{k}": v for k, v in w.items()}}])
def test_torch_files_in_their_containers(tmp_path, container):
    torch.save(container(WEIGHTS), tmp_path / "w.pth")
    _same(read_state_dict(tmp_path / "w.pth"))


def test_safetensors_folders_and_weights_key(tmp_path):
    save_file(WEIGHTS, str(tmp_path / "model.safetensors"))
    _same(read_state_dict(tmp_path))
    torch.save({"state_dict": {"c": torch.zeros(1)}}, tmp_path / "weights.ckpt")
    assert list(read_state_dict(tmp_path)) == ["c"]  # weights.ckpt comes first in a folder
    ema = {k: v + 1 for k, v in WEIGHTS.items()}
    torch.save({"params": WEIGHTS, "params_ema": ema}, tmp_path / "basicsr.pth")
    _same(read_state_dict(tmp_path / "basicsr.pth"))
    _same(read_state_dict(tmp_path / "basicsr.pth", weights_key="params_ema"), ema)


def test_other_pickled_objects_are_inert(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"model": WEIGHTS, "args": argparse.Namespace(lr=1e-3), "payload": RunsCode(marker)},
               tmp_path / "train.pth")
    _same(read_state_dict(tmp_path / "train.pth"))
    assert not marker.exists(), "reading the checkpoint ran code from it"


def test_errors_are_one_line_naming_the_file(tmp_path):
    def refused(path, pattern, **kwargs):
        with pytest.raises(CheckpointError, match=pattern) as error:
            read_state_dict(path, **kwargs)
        assert str(error.value).startswith(f"{path}: ") and "\n" not in str(error.value)

    refused(tmp_path / "absent.pth", "no such file$")
    refused(tmp_path, "no weights.ckpt, model.safetensors, pytorch_model.bin in this folder$")
    (tmp_path / "junk.pth").write_text("not a checkpoint\nat all")
    refused(tmp_path / "junk.pth", r"not a readable PyTorch checkpoint \(UnpicklingError")
    (tmp_path / "junk.safetensors").write_text("not a checkpoint")
    refused(tmp_path / "junk.safetensors", "not a readable safetensors file")
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    refused(tmp_path / "list.pth", r"holds no state dict of tensors \(a list\)$")
    torch.save({"epoch": 3, "model": {"lr": 1.0}}, tmp_path / "empty.pth")
    refused(tmp_path / "empty.pth", r"holds no state dict of tensors \(entries lr\)$")
    torch.save({"params": WEIGHTS}, tmp_path / "basicsr.pth")
    refused(tmp_path / "basicsr.pth", r"no 'params_ema' entry \(entries params\)$", weights_key="params_ema")


def test_unwrap_takes_what_timm_read():
    _same(unwrap_state_dict({"model": {f"module.{k}": v for k, v in WEIGHTS.items()}, "epoch": 1}))
