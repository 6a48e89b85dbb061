"""The math of ssmkit in readable PyTorch: selective scans and the state-space mixers built on them."""
from ssmkit.core.convssm import ConvS5Layer, convssm_scan, convssm_step, hippo_n_init
from ssmkit.core.generation import Generation, sample, sample_next
from ssmkit.core.gla import gla, gla_step
from ssmkit.core.hydra import Hydra
from ssmkit.core.layers import DropPath, LayerNorm2d, RMSNorm, RMSNormGated, SwiGLU, causal_conv1d
from ssmkit.core.mamba import FlipOrder, Mamba, MambaBlock, MambaLM, MambaState, SequenceOrder, StridedOrder
from ssmkit.core.mamba2 import Mamba2
from ssmkit.core.scan import linear_scan, selective_scan, selective_state_update
from ssmkit.core.scan2d import Mamba2D, selective_scan_2d
from ssmkit.core.ssd import ssd_scan, ssd_state_update

__all__ = ["selective_scan", "selective_state_update", "linear_scan", "ssd_scan", "ssd_state_update", "Mamba2",
           "Hydra", "RMSNormGated", "selective_scan_2d", "Mamba2D",
           "convssm_scan", "convssm_step", "hippo_n_init", "ConvS5Layer", "gla", "gla_step", "Mamba", "MambaBlock",
           "MambaState", "MambaLM", "Generation", "sample", "sample_next", "RMSNorm", "LayerNorm2d", "SwiGLU",
           "DropPath", "SequenceOrder", "FlipOrder", "StridedOrder", "causal_conv1d"]
