"""Several datasets mixed by weight: sample i comes from the dataset furthest below its share so far.

That greedy rule (Megatron's) keeps every dataset's count within about one sample of `weight * i` at every prefix,
is deterministic, and, like the datasets it mixes, does not depend on how many samples are asked for.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from engine.data.index_cache import cached_arrays, user_cache_dir


def normalise_weights(weights: Sequence[float]) -> np.ndarray:
    """Weights as fractions summing to one; every weight must be positive."""
    w = np.asarray(weights, dtype=np.float64)
    if len(w) == 0 or not np.all(np.isfinite(w)) or (w <= 0).any():
        raise ValueError(f"blend weights must be positive numbers, got {list(weights)}")
    return w / w.sum()


def build_blend_index(weights: Sequence[float], num_samples: int) -> dict[str, np.ndarray]:
    """For each sample, which dataset serves it and which of that dataset's samples it is."""
    w = normalise_weights(weights).tolist()
    counts = [0] * len(w)
    dataset_index = np.empty(num_samples, dtype=np.int16)
    dataset_sample = np.empty(num_samples, dtype=np.int64)
    # A plain loop: the rule is sequential, and with a handful of datasets this runs at ~2M samples/s, once per
    # (weights, num_samples), after which the result is cached.
    pairs = list(enumerate(w))
    for i in range(num_samples):
        target = i + 1
        best, best_err = 0, -1.0e300
        for d, wd in pairs:
            err = wd * target - counts[d]
            if err > best_err:
                best, best_err = d, err
        dataset_index[i] = best
        dataset_sample[i] = counts[best]
        counts[best] += 1
    return {"dataset_index": dataset_index, "dataset_sample": dataset_sample}


def blend_index(weights: Sequence[float], num_samples: int, cache_dir: str | os.PathLike | None = None) -> dict:
    """`build_blend_index`, cached (it depends on nothing but the weights and the sample count)."""
    return cached_arrays(cache_dir or user_cache_dir() / "index-cache", "blend",
                         {"weights": normalise_weights(weights).tolist(), "num_samples": num_samples},
                         ("dataset_index", "dataset_sample"), lambda: build_blend_index(weights, num_samples))


class BlendedDataset:
    """Item i is `datasets[dataset_index[i]][dataset_sample[i]]`."""

    def __init__(self, datasets: Sequence, weights: Sequence[float], num_samples: int,
                 cache_dir: str | os.PathLike | None = None):
        if len(datasets) != len(weights):
            raise ValueError(f"{len(datasets)} datasets but {len(weights)} weights")
        self.datasets, self.num_samples = list(datasets), num_samples
        # The weights as given, not re-normalised: builders size the components from this same index, and
        # normalising twice can move a float by one ulp and break a tie differently.
        arrays = blend_index(weights, num_samples, cache_dir)
        self.dataset_index, self.dataset_sample = arrays["dataset_index"], arrays["dataset_sample"]
        for d, (ds, n) in enumerate(zip(self.datasets, self.samples_per_dataset(), strict=True)):
            if len(ds) < n:
                raise ValueError(f"blend component {d} has {len(ds)} samples but the blend needs {n}")

    def samples_per_dataset(self) -> list[int]:
        """How many samples the blend draws from each dataset."""
        return np.bincount(self.dataset_index, minlength=len(self.datasets)).tolist()

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range for the blend ({self.num_samples} samples)")
        return self.datasets[int(self.dataset_index[i])][int(self.dataset_sample[i])]
