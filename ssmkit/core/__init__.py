"""The math of ssmkit in readable PyTorch: selective scans and the state-space mixers built on them."""
from ssmkit.core.mamba import (FlipOrder, Mamba, MambaBlock, MambaCache, MambaLM, RMSNorm, SequenceOrder,
                               StridedOrder)
from ssmkit.core.scan import selective_scan, selective_state_update

__all__ = ["selective_scan", "selective_state_update", "Mamba", "MambaBlock", "MambaCache", "MambaLM",
           "RMSNorm", "SequenceOrder", "FlipOrder", "StridedOrder"]
