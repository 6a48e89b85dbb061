"""MambaMIL and baselines over whole-slide-image patch features, slide tiling, survival heads."""
