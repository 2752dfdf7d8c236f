"""Blending datasets by weight: per-prefix proportions, component order, determinism, and the data.prefix blend."""

from __future__ import annotations

import numpy as np
import pytest

from engine.data.blended_dataset import BlendedDataset, blend_index, build_blend_index, normalise_weights
from engine.data.builder import build_datasets, parse_prefix
from engine.data.gpt_dataset import GPTDataset, split_documents
from engine.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder, ShardFormatError

WEIGHTS = [[0.5, 0.5], [0.3, 0.7], [0.2, 0.3, 0.5], [0.1, 0.1, 0.8], [1, 2, 3]]

# Shard s's tokens are SHARD_BASE * s + document id, so a sample tells which shard it came from.
SHARD_BASE = 10_000


def counts_per_prefix(dataset_index: np.ndarray, k: int) -> np.ndarray:
    """counts[n-1, d]: how many of the first n samples dataset d serves."""
    return np.eye(k, dtype=np.int64)[np.asarray(dataset_index, dtype=np.int64)].cumsum(axis=0)


def write_shard(prefix, shard_id: int, n_docs: int, seed: int) -> IndexedDataset:
    rng = np.random.default_rng(seed)
    with IndexedDatasetBuilder(prefix, np.uint16) as b:
        for d in range(n_docs):
            b.add_document(np.full(int(rng.integers(1, 30)), SHARD_BASE * shard_id + d, np.uint16))
    return IndexedDataset(prefix)


@pytest.fixture
def shards(tmp_path):
    """Two shards, 40 and 25 documents, with disjoint token values."""
    return [write_shard(tmp_path / "a" / "a", 1, 40, 1), write_shard(tmp_path / "b" / "b", 2, 25, 2)]


# ---------------------------------------------------------------------------------------------- the blend index


@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("n", [1, 7, 1000, 9999])
def test_final_counts_within_one_of_share(weights, n):
    """Each dataset serves within one sample of N * w of the N samples."""
    w = np.asarray(weights, dtype=np.float64) / sum(weights)
    index = build_blend_index(weights, n)
    assert index["dataset_index"].shape == index["dataset_sample"].shape == (n,)
    counts = np.bincount(index["dataset_index"], minlength=len(weights))
    assert len(counts) == len(weights) and counts.sum() == n
    assert (np.abs(counts - n * w) <= 1).all(), (counts, n * w)


@pytest.mark.parametrize("weights", WEIGHTS)
def test_every_prefix_within_one_of_share(weights):
    """For 2-3 datasets, at every prefix n the count of each dataset is strictly within one of n * w."""
    n = 9999
    w = np.asarray(weights, dtype=np.float64) / sum(weights)
    counts = counts_per_prefix(build_blend_index(weights, n)["dataset_index"], len(weights))
    deviation = np.abs(counts - np.arange(1, n + 1)[:, None] * w)
    assert deviation.max() < 1, f"prefix {int(deviation.max(axis=1).argmax()) + 1} deviates by {deviation.max()}"


@pytest.mark.parametrize("weights", WEIGHTS)
def test_component_samples_used_once_in_order(weights):
    """dataset_sample counts 0, 1, 2, ... within each dataset: every component sample used once, in order."""
    index = build_blend_index(weights, 1000)
    for d in range(len(weights)):
        picked = index["dataset_sample"][index["dataset_index"] == d]
        np.testing.assert_array_equal(picked, np.arange(len(picked)))


def test_deterministic_and_prefix_consistent(tmp_path):
    """The index is a pure function of the weights, and the index for N2 > N1 samples starts with the one for N1."""
    for weights in WEIGHTS:
        small, big = build_blend_index(weights, 777), build_blend_index(weights, 5000)
        again = build_blend_index(weights, 777)
        for name in ("dataset_index", "dataset_sample"):
            np.testing.assert_array_equal(small[name], again[name])
            np.testing.assert_array_equal(big[name][:777], small[name])
        cached = blend_index(weights, 777, tmp_path / "c")
        for name in ("dataset_index", "dataset_sample"):
            assert isinstance(cached[name], np.memmap)
            np.testing.assert_array_equal(cached[name], small[name])


def test_unnormalised_weights_blend_like_normalised():
    """Scaling the weights does not change their final shares: [1,2,3] serves 1/6, 2/6, 3/6."""
    counts = np.bincount(build_blend_index([1, 2, 3], 600)["dataset_index"])
    np.testing.assert_array_equal(counts, [100, 200, 300])
    np.testing.assert_allclose(normalise_weights([1, 2, 3]), [1 / 6, 2 / 6, 3 / 6])


@pytest.mark.parametrize("weights", [[], [0, 1], [0.0, 0.0], [-1, 2], [float("nan"), 1], [float("inf"), 1]])
def test_bad_weights_rejected(weights, tmp_path):
    """Empty, zero, negative and non-finite weights raise ValueError."""
    with pytest.raises(ValueError, match="blend weights"):
        normalise_weights(weights)
    with pytest.raises(ValueError):
        build_blend_index(weights, 10)
    with pytest.raises(ValueError):
        blend_index(weights, 10, tmp_path / "c")


# ------------------------------------------------------------------------------------------ BlendedDataset


def test_blended_dataset_serves_components(tmp_path, shards):
    """Item i of the blend is exactly datasets[d][j] with (d, j) from the blend index, from the right shard."""
    n = 300
    weights = [0.3, 0.7]
    need = np.bincount(build_blend_index(weights, n)["dataset_index"], minlength=2)
    parts = [GPTDataset(s, (0, s.num_documents), 8, int(c), seed=3, cache_dir=tmp_path / "c", log=None)
             for s, c in zip(shards, need, strict=True)]
    blend = BlendedDataset(parts, weights, n, cache_dir=tmp_path / "c")
    assert len(blend) == n and blend.samples_per_dataset() == need.tolist()
    taken = [[] for _ in parts]
    for i in range(n):
        d, j = int(blend.dataset_index[i]), int(blend.dataset_sample[i])
        item = blend[i]
        np.testing.assert_array_equal(item, parts[d][j])
        assert item.dtype == np.int64 and item.shape == (9,)
        assert (item // SHARD_BASE == d + 1).all(), f"item {i} has tokens from the wrong shard"
        taken[d].append(j)
    assert taken == [list(range(int(c))) for c in need]
    with pytest.raises(IndexError):
        blend[n]


def test_blended_dataset_rejects_short_component(tmp_path, shards):
    """A component with fewer samples than the blend draws from it raises ValueError."""
    n = 100
    need = np.bincount(build_blend_index([0.5, 0.5], n)["dataset_index"], minlength=2)
    parts = [GPTDataset(s, (0, s.num_documents), 8, int(c) - (d == 1), seed=3, cache_dir=tmp_path / "c", log=None)
             for d, (s, c) in enumerate(zip(shards, need, strict=True))]
    with pytest.raises(ValueError, match="component 1"):
        BlendedDataset(parts, [0.5, 0.5], n, cache_dir=tmp_path / "c")
    with pytest.raises(ValueError):
        BlendedDataset(parts, [0.2, 0.3, 0.5], n, cache_dir=tmp_path / "c")


# --------------------------------------------------------------------------------------- data.prefix blends


def test_build_datasets_blend_from_prefix_list(tmp_path, shards):
    """A ["0.3", A, "0.7", B] data.prefix builds a BlendedDataset whose per-dataset counts match the weights."""
    a, b = (s.prefix for s in shards)
    n = {"train": 500, "valid": 37}
    out = build_datasets(["0.3", a, "0.7", b], "9,1", 8, n, seed=5, cache_dir=str(tmp_path / "c"))
    assert set(out) == {"train", "valid"}
    for name, blend in out.items():
        assert isinstance(blend, BlendedDataset) and len(blend) == n[name]
        counts = np.asarray(blend.samples_per_dataset())
        assert (np.abs(counts - n[name] * np.array([0.3, 0.7])) <= 1).all(), (name, counts)
        for d, (part, shard) in enumerate(zip(blend.datasets, shards, strict=True)):
            assert isinstance(part, GPTDataset) and len(part) >= counts[d]
            lo, hi = split_documents(shard.num_documents, "9,1")[name]
            items = np.stack([blend[i] for i in np.flatnonzero(blend.dataset_index == d)])
            assert (items // SHARD_BASE == d + 1).all()
            assert lo <= (items % SHARD_BASE).min() and (items % SHARD_BASE).max() < hi, f"{name} leaves its split"


def test_build_datasets_single_prefix_list_is_not_a_blend(tmp_path, shards):
    """A one-element prefix list is a plain GPTDataset over that shard."""
    out = build_datasets([shards[0].prefix], "1", 8, {"train": 20}, seed=5, cache_dir=str(tmp_path / "c"))
    assert isinstance(out["train"], GPTDataset) and len(out["train"]) == 20


def test_parse_prefix():
    """A prefix string, a one-element list and weight/prefix pairs parse; weights become floats."""
    assert parse_prefix("data/x") == [(1.0, "data/x")]
    assert parse_prefix(["data/x"]) == [(1.0, "data/x")]
    assert parse_prefix(["0.3", "a", 2, "b"]) == [(0.3, "a"), (2.0, "b")]


@pytest.mark.parametrize(("prefix", "match"), [(["0.3", "a", "0.7"], "pairs"), (["0.3", "a", "0.7", "b", "c"], "pairs"),
                                             (["a", "b"], "should be a weight"),
                                             (["0.3", "a", "x", "b"], "should be a weight"),
                                             ([None, "a", "1", "b"], "should be a weight"),
                                             (["0", "a", "1", "b"], "positive"), (["-1", "a", "2", "b"], "positive"),
                                             (["nan", "a", "1", "b"], "positive")])
def test_parse_prefix_rejects_bad_blends(prefix, match):
    """Odd-length lists, non-numeric, zero, negative and nan weights raise ValueError saying what is wrong."""
    with pytest.raises(ValueError, match=match):
        parse_prefix(prefix)


def test_numbered_shards_without_bare_prefix(tmp_path):
    """A bare prefix with only PREFIX_00000.idx on disk raises ShardFormatError pointing at merge_shards."""
    write_shard(tmp_path / "corpus_00000", 1, 5, 0)
    with pytest.raises(ShardFormatError, match="merge_shards"):
        build_datasets(str(tmp_path / "corpus"), "1", 8, {"train": 4}, seed=0, cache_dir=str(tmp_path / "c"))
    with pytest.raises(ShardFormatError, match="no such file"):
        build_datasets(str(tmp_path / "nothing"), "1", 8, {"train": 4}, seed=0, cache_dir=str(tmp_path / "c"))


def test_build_datasets_blend_with_tied_weights(tmp_path, shards):
    """Weights whose shares tie exactly (0.11/0.09 at N=10) still build a blend whose components suffice."""
    a, b = (s.prefix for s in shards)
    out = build_datasets(["0.11", a, "0.09", b], "1", 8, {"train": 10}, seed=0, cache_dir=str(tmp_path / "c"))
    blend = out["train"]
    counts = np.asarray(blend.samples_per_dataset())
    assert (np.abs(counts - 10 * np.array([0.55, 0.45])) <= 1).all()
    assert all(len(part) >= c for part, c in zip(blend.datasets, counts, strict=True))
