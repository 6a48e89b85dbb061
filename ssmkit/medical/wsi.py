"""Whole-slide images: reading (tiffslide), HSV tissue mask, tiling at a target resolution, and feature
extraction with a timm backbone into CLAM bags.

Coordinates are always level-0 pixels, top-left (x, y), as OpenSlide and CLAM use them. Tiles are
written row-major (top to bottom, left to right), the order MambaMIL's authors say they scanned.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ssmkit.errors import ConfigError, DataError
from ssmkit.medical.data import write_bag

__all__ = ["EMBEDDED_SLIDE", "open_slide", "slide_mpp", "thumbnail", "tissue_mask", "Tiling", "tile_slide",
           "read_tile", "FeatureExtractor", "extract_slide", "stain_density"]

EMBEDDED_SLIDE = Path(__file__).parent / "data" / "cmu_small_region.svs"
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".scn", ".bif")
# a single-level image larger than this (pixels per side) is refused: its thumbnail and tissue mask would
# decode the whole level-0 image (a 100k x 100k slide is 30 GB of RGB)
MAX_FLAT_SIDE = 16384


def open_slide(path: str | Path, max_flat_side: int = MAX_FLAT_SIDE):
    """A `tiffslide.TiffSlide`, or a DataError naming the file and the problem (missing,
    corrupt, or a single-level image wider or taller than `max_flat_side`: not pyramidal)."""
    import tiffslide

    path = Path(path)
    if not path.is_file():
        raise DataError(f"slide {path} does not exist")
    try:
        slide = tiffslide.TiffSlide(path)
        slide.level_dimensions  # noqa: B018  (touches the pyramid: fails here on broken files)
    except Exception as e:
        raise DataError(f"{path} is not a readable slide (corrupt, or not a tiled TIFF/SVS): "
                        f"{type(e).__name__}: {e}") from None
    if slide.level_count == 1 and max(slide.dimensions) > max_flat_side:
        w, h = slide.dimensions
        raise DataError(f"{path} is not pyramidal: one level of {w}x{h} pixels (more than {max_flat_side} per "
                        "side would be decoded whole); convert it to a tiled pyramid first, e.g. "
                        "`vips tiffsave in.tif out.tif --tile --pyramid --compression jpeg`")
    return slide


def slide_mpp(slide, path: str | Path = "", override: float = 0.0) -> float:
    """Level-0 microns per pixel: `override` when > 0, else the slide's metadata."""
    if override > 0:
        return override
    mpp = slide.properties.get("tiffslide.mpp-x")
    if not mpp:
        raise DataError(f"slide {path} has no microns-per-pixel metadata; pass the level-0 resolution "
                        "(--slide-mpp, e.g. 0.25 for 40x, 0.5 for 20x)")
    return float(mpp)


def thumbnail(slide, max_side: int = 1024) -> np.ndarray:
    """RGB uint8 image of the whole slide with its longer side at most `max_side` pixels."""
    w, h = slide.dimensions
    scale = max_side / max(w, h)
    return np.asarray(slide.get_thumbnail((max(1, round(w * scale)), max(1, round(h * scale)))).convert("RGB"))


def tissue_mask(rgb: np.ndarray, sat_threshold: int = 15, median: int = 11, close: int = 2,
                min_area_frac: float = 0.001) -> np.ndarray:
    """Boolean tissue mask of an RGB thumbnail, following CLAM's recipe.

    HSV saturation, median blur (`median`, odd), binary threshold at `sat_threshold` (stained tissue is
    saturated, glass is grey-white), morphological closing (`close` px), then only the outer contours
    with an area above `min_area_frac` of the image are kept, filled."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"tissue_mask expects an RGB uint8 image (H, W, 3), got {rgb.dtype} {rgb.shape}")
    sat = cv2.medianBlur(cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[:, :, 1], median)
    _, binary = cv2.threshold(sat, sat_threshold, 255, cv2.THRESH_BINARY)
    if close > 0:
        binary = cv2.morphologyEx(binary, cv2.MORPH_CLOSE, np.ones((close, close), np.uint8))
    contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    mask = np.zeros_like(binary)
    min_area = min_area_frac * binary.size
    keep = [c for c in contours if cv2.contourArea(c) >= min_area]
    cv2.drawContours(mask, keep, -1, 255, thickness=cv2.FILLED)
    return (mask > 0) & (binary > 0)


@dataclass
class Tiling:
    """Tiles of one slide: level-0 top-left `coords` (N, 2) as (x, y), each covering `size0` level-0 pixels
    square, read at `level` as `read_size` pixels and resized to `patch_size` (the target resolution)."""

    coords: np.ndarray
    size0: int
    level: int
    read_size: int
    patch_size: int
    mpp: float
    tissue: np.ndarray  # tissue fraction of each tile


def tile_slide(slide, patch_size: int = 256, target_mpp: float = 0.5, min_tissue: float = 0.5,
               slide_path: str | Path = "", mpp_override: float = 0.0, mask: np.ndarray | None = None) -> Tiling:
    """Non-overlapping tiles of `patch_size` pixels at `target_mpp` µm/px that are at least `min_tissue`
    tissue, row-major. Reads from the coarsest level still at least as fine as the target (then
    resizes), so tiles have the same field of view whatever the scanner magnification."""
    mpp0 = slide_mpp(slide, slide_path, mpp_override)
    size0 = int(round(patch_size * target_mpp / mpp0))
    if size0 < 1:
        raise ValueError(f"patch_size {patch_size} at {target_mpp} µm/px is below one level-0 pixel")
    downs = [float(d) for d in slide.level_downsamples]
    level = max((i for i, d in enumerate(downs) if d * mpp0 <= target_mpp * 1.05), key=lambda i: downs[i],
                default=0)
    read_size = max(1, int(round(size0 / downs[level])))
    w, h = slide.dimensions
    if w < size0 or h < size0:
        raise DataError(f"slide {slide_path} ({w}x{h} px) is smaller than one tile ({size0} px at level 0)")
    if mask is None:
        mask = tissue_mask(thumbnail(slide))
    sy, sx = mask.shape[0] / h, mask.shape[1] / w
    coords, tissue = [], []
    for y in range(0, h - size0 + 1, size0):
        for x in range(0, w - size0 + 1, size0):
            window = mask[int(y * sy):max(int(y * sy) + 1, int((y + size0) * sy)),
                          int(x * sx):max(int(x * sx) + 1, int((x + size0) * sx))]
            fraction = float(window.mean())
            if fraction >= min_tissue:
                coords.append((x, y))
                tissue.append(fraction)
    return Tiling(np.asarray(coords, dtype=np.int64).reshape(-1, 2), size0, level, read_size, patch_size,
                  target_mpp, np.asarray(tissue))


def read_tile(slide, xy, tiling: Tiling) -> np.ndarray:
    """RGB uint8 (patch_size, patch_size, 3) tile at level-0 (x, y)."""
    region = np.asarray(slide.read_region((int(xy[0]), int(xy[1])), tiling.level,
                                          (tiling.read_size, tiling.read_size), as_array=True))[..., :3]
    if tiling.read_size != tiling.patch_size:
        region = cv2.resize(region, (tiling.patch_size, tiling.patch_size), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(region)


class FeatureExtractor:
    """A timm backbone as a tile encoder: RGB uint8 tiles -> (N, D) features (global-pooled, no head).

    Weights come from a local file (`weights`: safetensors or a torch state dict) — nothing is ever
    downloaded; random weights only with `random_init=True` (for demos and tests: colour and texture
    still separate, but the features are not those of any published extractor). Tiles are resized to
    `image_size` and normalised with the backbone's mean/std (ImageNet by default)."""

    def __init__(self, backbone: str = "resnet50", weights: str = "", random_init: bool = False,
                 image_size: int = 224, seed: int = 0, device: str = "cpu"):
        import timm

        if not timm.is_model(backbone):
            close = timm.list_models(f"*{backbone.split('_')[0]}*")[:5]
            raise ConfigError(f"--backbone {backbone!r} is not a timm model" + (f" (similar: {', '.join(close)})"
                                                                              if close else ""))
        if not weights and not random_init:
            raise ConfigError(f"feature extraction with {backbone} needs --weights (a local checkpoint file) or an "
                              "explicit --random-init; pretrained weights are never downloaded")
        if weights and not Path(weights).is_file():
            raise DataError(f"backbone weights {weights} do not exist")
        torch.manual_seed(seed)
        try:  # timm reads the file (safetensors or a torch state dict) and leaves the classifier out
            model = timm.create_model(backbone, pretrained=bool(weights), num_classes=0,
                                      **({"pretrained_cfg_overlay": {"file": str(weights)}} if weights else {}))
        except Exception as e:  # unreadable files and weights of another model surface as many error types
            raise DataError(f"backbone weights {weights} do not fit timm's {backbone}: "
                            f"{type(e).__name__}: {str(e).splitlines()[0][:300]}") from None
        self.model = model.eval().to(device)
        cfg = model.pretrained_cfg
        self.mean = torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406)), device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg.get("std", (0.229, 0.224, 0.225)), device=device).view(1, 3, 1, 1)
        self.image_size, self.device = image_size, device
        self.dim = model.num_features

    @torch.no_grad()
    def __call__(self, tiles: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(tiles).to(self.device).permute(0, 3, 1, 2).float() / 255
        if x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True,
                              align_corners=False)
        return self.model((x - self.mean) / self.std).float().cpu()


def extract_slide(slide_path: str | Path, out_root: str | Path, extractor: FeatureExtractor,
                  patch_size: int = 256, target_mpp: float = 0.5, min_tissue: float = 0.5,
                  batch_size: int = 32, mpp_override: float = 0.0, progress: bool = True) -> tuple[Path, int]:
    """Tile one slide, encode its tiles in batches and write `h5_files/<id>.h5` + `pt_files/<id>.pt`
    under `out_root` (id = file stem). Returns (h5 path, number of tiles)."""
    slide_path = Path(slide_path)
    slide = open_slide(slide_path)
    tiling = tile_slide(slide, patch_size, target_mpp, min_tissue, slide_path, mpp_override)
    if len(tiling.coords) == 0:
        raise DataError(f"slide {slide_path} has no tile with at least {min_tissue:.0%} tissue; lower "
                        "--min-tissue or check the slide")
    chunks = []
    for start in tqdm(range(0, len(tiling.coords), batch_size), desc=slide_path.stem, unit="batch",
                      disable=not progress):
        tiles = np.stack([read_tile(slide, xy, tiling) for xy in tiling.coords[start:start + batch_size]])
        chunks.append(extractor(tiles))
    attrs = {"patch_size": tiling.size0, "patch_level": 0, "target_mpp": target_mpp, "read_level": tiling.level}
    h5, _ = write_bag(out_root, slide_path.stem, torch.cat(chunks), torch.from_numpy(tiling.coords), attrs)
    return h5, len(tiling.coords)


# Ruifrok & Johnston's stain vectors (optical density of haematoxylin, eosin, DAB), rows normalised
_STAINS = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_UNMIX = np.linalg.inv(_STAINS / np.linalg.norm(_STAINS, axis=1, keepdims=True))


def stain_density(tiles: np.ndarray) -> np.ndarray:
    """Mean haematoxylin, eosin and DAB concentrations of RGB uint8 tiles (..., H, W, 3) by colour
    deconvolution (optical density times the inverse stain matrix): shape (..., 3)."""
    od = -np.log10(np.maximum(tiles.astype(np.float64), 1.0) / 255.0)
    return (od @ _UNMIX).mean(axis=(-3, -2))
