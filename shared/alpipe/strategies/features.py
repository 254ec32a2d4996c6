"""Label-free features for the cold start: what TypiClust clusters before any model exists."""

import numpy as np

# Images are reduced to at most this many pixels a side first (block means): the layout of a 224-px
# photo survives, and 150k numbers per image would make PCA slow and memory-hungry.
MAX_SIDE = 32
# Principal components kept. Measured on mnist5k (TypiClust's 20 first labels, 3 seeds): see the README.
PCA_COMPONENTS = 50


def label_free_features(inputs: np.ndarray, *, seed: int = 0, components: int = PCA_COMPONENTS) -> np.ndarray:
    """(n, components) float32 features of a pool: pixels (uint8 (n, C, H, W)) or backbone embeddings
    ((n, d)), each row standardized, then reduced with PCA (clustering and neighbours in a few dozen
    dimensions are fast and, for pixels, less dominated by noise)."""
    x = np.asarray(inputs)
    if x.ndim == 4:
        x = shrink(x).reshape(len(x), -1)
    if x.ndim != 2:
        raise ValueError(f"expected images (n, C, H, W) or embeddings (n, d), got shape {x.shape}")
    x = x.astype(np.float32)
    # Per-row standardization, as the embedding head does: brightness and contrast stop dominating.
    x = (x - x.mean(axis=1, keepdims=True)) / (x.std(axis=1, keepdims=True) + 1e-6)
    k = min(components, x.shape[1], len(x))
    if k < 1:
        return x
    from sklearn.decomposition import PCA

    return PCA(n_components=k, random_state=seed, svd_solver="randomized").fit_transform(x).astype(np.float32)


def shrink(images: np.ndarray, max_side: int = MAX_SIDE) -> np.ndarray:
    """(n, C, H, W) images as block means with at most max_side pixels a side (float32)."""
    n, c, h, w = images.shape
    f = max(1, -(-max(h, w) // max_side))
    if f == 1:
        return images.astype(np.float32)
    h2, w2 = h // f, w // f
    return images[:, :, :h2 * f, :w2 * f].reshape(n, c, h2, f, w2, f).mean(axis=(3, 5), dtype=np.float32)
