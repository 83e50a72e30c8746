"""Training data: splits, held-out classes, the outlier pool, image loading and transforms."""
