"""Image models (Vision Mamba, ViG, MaIR), scan orders, image data and metrics."""
