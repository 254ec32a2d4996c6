"""Label-free features: what TypiClust clusters before any model exists, and what `auto` clusters its most
uncertain images on (alpipe.strategies.representative)."""

import numpy as np

# Images are reduced to at most this many pixels a side first (block means): the layout of a 224-px
# photo survives, and 150k numbers per image would make PCA slow and memory-hungry.
MAX_SIDE = 32
# Principal components kept. Measured on mnist5k (TypiClust's 20 first labels, 3 seeds): see the README.
PCA_COMPONENTS = 50
# The principal axes that representative picks project onto come from at most this many of the shard's images.
BASIS_ROWS = 300


def label_free_features(inputs: np.ndarray, *, seed: int = 0, components: int = PCA_COMPONENTS) -> np.ndarray:
    """(n, components) float32 features of a pool: pixels (uint8 (n, C, H, W)) or backbone embeddings
    ((n, d)), each row standardized, then reduced with PCA (clustering and neighbours in a few dozen
    dimensions are fast and, for pixels, less dominated by noise)."""
    x = standardized_rows(inputs)
    k = min(components, x.shape[1], len(x))
    if k < 1:
        return x
    from sklearn.decomposition import PCA

    return PCA(n_components=k, random_state=seed, svd_solver="randomized").fit_transform(x).astype(np.float32)


def projected_features(inputs: np.ndarray, rows: np.ndarray, *, seed: int, components: int = PCA_COMPONENTS,
                       basis_rows: int = BASIS_ROWS) -> np.ndarray:
    """Label-free features of inputs[rows] on the principal axes of all the inputs (fitted on a seeded
    sample of basis_rows of them): a few candidates are compared along the directions in which the whole
    pool varies, not along their own few differences."""
    inputs = np.asarray(inputs)
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(len(inputs), size=min(basis_rows, len(inputs)), replace=False))
    x = standardized_rows(inputs[sample])
    mean = x.mean(axis=0)
    axes = principal_axes(x - mean, min(components, *x.shape), rng)
    return ((standardized_rows(inputs[rows]) - mean) @ axes.T).astype(np.float32)


def principal_axes(centred: np.ndarray, k: int, rng: np.random.Generator, power_iterations: int = 1) -> np.ndarray:
    """(k, d) top principal axes of centred rows by randomized SVD (Halko et al. 2011), in plain numpy:
    a few milliseconds for a few hundred rows, with no solver set-up."""
    sketch = centred @ rng.standard_normal((centred.shape[1], min(k + 10, min(centred.shape))), dtype=np.float32)
    for _ in range(power_iterations):
        sketch = centred @ (centred.T @ np.linalg.qr(sketch)[0])
    basis = np.linalg.qr(sketch)[0]
    return np.linalg.svd(basis.T @ centred, full_matrices=False)[2][:k]


def standardized_rows(inputs: np.ndarray) -> np.ndarray:
    """(n, d) float32: images block-averaged to MAX_SIDE and flattened (embeddings as they are), each row
    standardized, as the embedding head does: brightness and contrast stop dominating."""
    x = np.asarray(inputs)
    if x.ndim == 4:
        x = shrink(x).reshape(len(x), -1)
    if x.ndim != 2:
        raise ValueError(f"expected images (n, C, H, W) or embeddings (n, d), got shape {x.shape}")
    x = x.astype(np.float32)
    return (x - x.mean(axis=1, keepdims=True)) / (x.std(axis=1, keepdims=True) + 1e-6)


def shrink(images: np.ndarray, max_side: int = MAX_SIDE) -> np.ndarray:
    """(n, C, H, W) images as block means with at most max_side pixels a side (float32)."""
    n, c, h, w = images.shape
    f = max(1, -(-max(h, w) // max_side))
    if f == 1:
        return images.astype(np.float32)
    h2, w2 = h // f, w // f
    return images[:, :, :h2 * f, :w2 * f].reshape(n, c, h2, f, w2, f).mean(axis=(3, 5), dtype=np.float32)
