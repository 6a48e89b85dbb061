"""Image and video models (Vision Mamba, ViG, MaIR, ConvS5), scan orders, image data and metrics.

Importing this package registers the classifiers with ssmkit's registry (`vim_tiny`, `vig_small`, ...),
the restorers (`mair_sr_x2`, ..., `mair_denoise`), the next-frame predictor `convs5_moving_digits`,
and the classifiers with timm (`ssmkit_vim_tiny`, `ssmkit_vig_small`, ...), so `timm.create_model("ssmkit_vim_tiny")`
works afterwards.
"""
from ssmkit.vision import convs5, mair, vig, vim  # noqa: F401  (registers the model configs)
from ssmkit.vision.vig import ViG
from ssmkit.vision.vim import VisionMamba, resize_pos_embed_mid_cls

__all__ = ["VisionMamba", "ViG", "resize_pos_embed_mid_cls"]
