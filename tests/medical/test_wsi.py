"""Slide reading, tissue mask, tiling with level-0 coords read back, stain densities, feature extraction."""
import cv2
import numpy as np
import pytest
import tifffile
import torch

from ssmkit.errors import DataError
from ssmkit.medical.data import read_bag, read_bag_attrs
from ssmkit.medical.wsi import (EMBEDDED_SLIDE, FeatureExtractor, extract_slide, open_slide, read_tile,
                                slide_mpp, stain_density, tile_slide, tissue_mask)

H, W = 512, 768


def synthetic_image():
    """White glass on the right half; on the left, saturated 'tissue' whose pixels encode their position."""
    img = np.full((H, W, 3), 240, np.uint8)
    y, x = np.mgrid[0:H, 0:384]
    img[:, :384, 0] = 150 + x % 100
    img[:, :384, 1] = 40 + y % 100
    img[:, :384, 2] = 120
    return img


def write_pyramid(path, img, mpp=0.5):
    """Tiled pages, the reduced one with subfiletype=1, and resolution tags: what every reader agrees on."""
    level1 = cv2.resize(img, (img.shape[1] // 2, img.shape[0] // 2), interpolation=cv2.INTER_AREA)
    with tifffile.TiffWriter(path) as tif:
        for i, level in enumerate((img, level1)):
            res = 1e4 / (mpp * 2 ** i)
            tif.write(level, tile=(64, 64), photometric="rgb", compression="zlib", subfiletype=1 if i else 0,
                      resolution=(res, res), resolutionunit="CENTIMETER")
    return level1


@pytest.fixture(scope="module")
def slide_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("slides") / "synthetic.tif"
    img = synthetic_image()
    level1 = write_pyramid(path, img)
    return path, img, level1


def test_tiles_are_level0_and_match_the_pixels_read_back(slide_file):
    path, img, level1 = slide_file
    slide = open_slide(path)
    assert slide_mpp(slide) == pytest.approx(0.5) and slide.level_count == 2
    tiling = tile_slide(slide, patch_size=128, target_mpp=0.5, min_tissue=0.5)
    expected = [(x, y) for y in range(0, H - 127, 128) for x in (0, 128, 256)]  # row-major, tissue only
    assert [tuple(c) for c in tiling.coords] == expected
    assert (tiling.level, tiling.size0, tiling.read_size) == (0, 128, 128)
    for x, y in tiling.coords[[0, 5, -1]]:
        np.testing.assert_array_equal(read_tile(slide, (x, y), tiling), img[y:y + 128, x:x + 128])
    coarse = tile_slide(slide, patch_size=64, target_mpp=1.0, min_tissue=0.5)  # read from level 1
    assert (coarse.level, coarse.size0, coarse.read_size) == (1, 128, 64)
    x, y = coarse.coords[4]
    np.testing.assert_array_equal(read_tile(slide, (x, y), coarse), level1[y // 2:y // 2 + 64, x // 2:x // 2 + 64])


def test_tissue_mask_separates_stained_tissue_from_glass():
    mask = tissue_mask(synthetic_image())
    assert mask[:, :370].mean() > 0.95 and mask[:, 400:].mean() < 0.01


def test_bad_slides_are_named(tmp_path):
    with pytest.raises(DataError, match="missing.svs"):
        open_slide(tmp_path / "missing.svs")
    (tmp_path / "corrupt.svs").write_bytes(b"II*\x00garbage")
    with pytest.raises(ValueError, match="corrupt.svs is not a readable slide"):
        open_slide(tmp_path / "corrupt.svs")
    tifffile.imwrite(tmp_path / "nompp.tif", synthetic_image(), tile=(64, 64), photometric="rgb")
    with pytest.raises(ValueError, match="no microns-per-pixel metadata"):
        tile_slide(open_slide(tmp_path / "nompp.tif"), slide_path=tmp_path / "nompp.tif")
    assert len(tile_slide(open_slide(tmp_path / "nompp.tif"), 128, 0.5, mpp_override=0.5).coords) == 12
    with pytest.raises(ValueError, match=r"nompp.tif is not pyramidal: one level of \d+x\d+ pixels"):
        open_slide(tmp_path / "nompp.tif", max_flat_side=100)


def test_embedded_slide_tiles():
    slide = open_slide(EMBEDDED_SLIDE)
    assert slide.dimensions == (2220, 2967) and slide_mpp(slide) == pytest.approx(0.499)
    assert len(tile_slide(slide, 256, 0.5, 0.5).coords) == 33  # 256-px tiles > 50 % tissue (data.md)


def test_stain_density_recovers_known_concentrations():
    """Tiles rendered from known haematoxylin / eosin amounts (Beer-Lambert) deconvolve back to them."""
    stains = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]])
    stains /= np.linalg.norm(stains, axis=1, keepdims=True)
    for h, e in ((0.6, 0.1), (0.1, 0.5)):
        od = h * stains[0] + e * stains[1]
        tile = np.broadcast_to(np.round(255 * 10 ** -od), (1, 4, 4, 3)).astype(np.uint8)
        np.testing.assert_allclose(stain_density(tile)[0], [h, e, 0.0], atol=0.01)


def test_feature_extraction_writes_clam_bags(slide_file, tmp_path):
    path = slide_file[0]
    encoder = FeatureExtractor("resnet10t", random_init=True, image_size=32, seed=0)
    h5, n = extract_slide(path, tmp_path, encoder, patch_size=128, batch_size=5, progress=False)
    feats, coords = read_bag(h5)
    pt_feats, _ = read_bag(tmp_path / "pt_files" / "synthetic.pt")
    slide = open_slide(path)
    tiling = tile_slide(slide, 128, 0.5, 0.5)
    assert n == 12 and feats.shape == (12, encoder.dim) and torch.equal(feats, pt_feats)
    np.testing.assert_array_equal(coords.numpy(), tiling.coords)
    assert read_bag_attrs(h5)["patch_size"] == 128
    tiles = np.stack([read_tile(slide, xy, tiling) for xy in tiling.coords])
    torch.testing.assert_close(feats, encoder(tiles))


def test_backbone_weights_only_from_a_local_file(tmp_path):
    with pytest.raises(ValueError, match="--random-init"):
        FeatureExtractor("resnet10t")
    with pytest.raises(DataError, match="nowhere.pth"):
        FeatureExtractor("resnet10t", weights=str(tmp_path / "nowhere.pth"))
    source = FeatureExtractor("resnet10t", random_init=True, image_size=32, seed=5)
    torch.save(source.model.state_dict(), tmp_path / "r10.pth")
    loaded = FeatureExtractor("resnet10t", weights=str(tmp_path / "r10.pth"), image_size=32, seed=9)
    tiles = np.random.default_rng(0).integers(0, 255, (2, 32, 32, 3), dtype=np.uint8)
    torch.testing.assert_close(loaded(tiles), source(tiles))
