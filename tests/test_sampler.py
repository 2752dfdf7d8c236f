"""Data-parallel batch sampling: rank shares tile the global batch, resuming continues the stream, real gloo ranks."""

from __future__ import annotations

import os

import numpy as np
import pytest

from engine.data.gpt_dataset import GPTDataset
from engine.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from engine.data.sampler import BatchSampler
from tests.distributed import run_checks

TOTAL = 400
CONSUMED = [0, 1, 3, 16, 17, 100, 255, TOTAL - 16 - 1, TOTAL - 16]
# (global batch, micro batch) pairs valid for every dp size in (1, 2, 4).
BATCHES = [(16, 2), (16, 1), (16, 4), (8, 2), (24, 3), (32, 8)]


def samplers(total: int, g: int, m: int, dp: int) -> list[BatchSampler]:
    return [BatchSampler(total, g, m, dp_rank=r, dp_size=dp) for r in range(dp)]


@pytest.mark.parametrize(("g", "m"), BATCHES)
@pytest.mark.parametrize("dp", [1, 2, 4])
def test_rank_shares_tile_the_global_batch(g, m, dp):
    """The ranks' shares, in rank order, are the DP=1 share: samples [c, c+G) for every consumed_samples c."""
    single = BatchSampler(TOTAL, g, m)
    ranks = samplers(TOTAL, g, m, dp)
    for c in [*CONSUMED, TOTAL - g]:
        if c + g > TOTAL:
            continue
        whole = single.rank_share(c)
        np.testing.assert_array_equal(whole, np.arange(c, c + g))
        shares = [s.rank_share(c) for s in ranks]
        assert all(len(s) == g // dp for s in shares)
        np.testing.assert_array_equal(np.concatenate(shares), whole, err_msg=f"c={c}")


@pytest.mark.parametrize(("g", "m"), BATCHES)
@pytest.mark.parametrize("dp", [1, 2, 4])
def test_micro_batches_split_the_share(g, m, dp):
    """micro_batches cuts the share into accumulation_steps = G/(m*dp) consecutive pieces of m samples."""
    for s in samplers(TOTAL, g, m, dp):
        assert s.accumulation_steps == g // (m * dp)
        for c in (0, 5, 48):
            micro = s.micro_batches(c)
            assert len(micro) == s.accumulation_steps
            assert all(len(mb) == m and mb.dtype == np.int64 for mb in micro)
            np.testing.assert_array_equal(np.concatenate(micro), s.rank_share(c))


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_resume_yields_the_tail(dp):
    """from_consumed(k*G) yields exactly batches k, k+1, ... of from_consumed(0), ending at the last full batch."""
    g, m, total = 16, 2, 200  # 12 full global batches, 8 samples left over
    for s in samplers(total, g, m, dp):
        full = list(s.from_consumed(0))
        assert len(full) == total // g
        for k in range(len(full) + 1):
            tail = list(s.from_consumed(k * g))
            assert len(tail) == len(full) - k
            for got, want in zip(tail, full[k:], strict=True):
                for a, b in zip(got, want, strict=True):
                    np.testing.assert_array_equal(a, b)


def global_stream(total: int, g: int, m: int, dp: int, consumed: int) -> np.ndarray:
    """The global sample stream from `consumed` on: each batch's rank shares concatenated in rank order."""
    per_rank = [list(s.from_consumed(consumed)) for s in samplers(total, g, m, dp)]
    batches = [np.concatenate([np.concatenate(r[b]) for r in per_rank]) for b in range(len(per_rank[0]))]
    return np.concatenate(batches) if batches else np.zeros(0, np.int64)


@pytest.mark.parametrize(("dp_before", "dp_after"), [(1, 2), (2, 4), (4, 1), (4, 2), (2, 2)])
def test_resume_with_another_dp_size(dp_before, dp_after):
    """Stopping after k batches at one dp size and resuming at another continues the identical global stream."""
    g, m, total = 16, 2, 208
    reference = global_stream(total, g, m, 1, 0)
    np.testing.assert_array_equal(reference, np.arange(total // g * g))
    for k in (0, 1, 5, 13):
        before = global_stream(total, g, m, dp_before, 0)[: k * g]
        after = global_stream(total, g, m, dp_after, k * g)
        np.testing.assert_array_equal(np.concatenate([before, after]), reference)


def test_indivisible_global_batch_rejected():
    """A global batch that is not a multiple of micro batch x dp size raises ValueError naming the numbers."""
    with pytest.raises(ValueError, match=r"global batch 16 .*micro batch 3 .*data-parallel size 2"):
        BatchSampler(100, 16, 3, dp_rank=0, dp_size=2)
    with pytest.raises(ValueError, match=r"global batch 12 .*micro batch 2 .*data-parallel size 4"):
        BatchSampler(100, 12, 2, dp_rank=1, dp_size=4)


@pytest.mark.parametrize(("g", "m", "rank", "dp"), [(16, 2, 2, 2), (16, 2, -1, 2), (16, 2, 4, 4), (0, 1, 0, 1),
                                                    (16, 0, 0, 1), (16, 2, 0, 0)])
def test_bad_sizes_and_ranks_rejected(g, m, rank, dp):
    """A dp_rank outside [0, dp) and non-positive sizes raise ValueError."""
    with pytest.raises(ValueError):
        BatchSampler(100, g, m, dp_rank=rank, dp_size=dp)


def test_batch_past_the_end_raises():
    """A global batch running past total_samples raises IndexError; the last full one does not."""
    s = BatchSampler(100, 16, 2, dp_rank=1, dp_size=2)
    assert len(s.rank_share(84)) == 8
    with pytest.raises(IndexError):
        s.rank_share(85)
    with pytest.raises(IndexError):
        s.micro_batches(100)
    assert list(s.from_consumed(85)) == []
    assert list(BatchSampler(10, 16, 2).from_consumed(0)) == []
    with pytest.raises(ValueError, match="non-negative"):
        s.rank_share(-16)


# ------------------------------------------------------------------------------------------- real gloo ranks

SHARD_ENV = "WEFT_TEST_SAMPLER_SHARD"
SEQ_LEN, NUM_SAMPLES, G, M = 12, 160, 16, 2
RANK_CONSUMED = [0, 16, 37, 80, 144]


def open_dataset(shard_dir: str, log=None) -> GPTDataset:
    indexed = IndexedDataset(os.path.join(shard_dir, "shard"))
    return GPTDataset(indexed, (0, indexed.num_documents), SEQ_LEN, NUM_SAMPLES, seed=9,
                      cache_dir=os.path.join(shard_dir, "cache"), log=log)


def check_shares_gather_to_global_batch(rank, world_size):
    """Every rank's share, gathered in rank order, is the DP=1 global batch."""
    import torch.distributed as dist

    sampler = BatchSampler(NUM_SAMPLES, G, M, dp_rank=rank, dp_size=world_size)
    single = BatchSampler(NUM_SAMPLES, G, M)
    for c in RANK_CONSUMED:
        gathered = [None] * world_size
        dist.all_gather_object(gathered, sampler.rank_share(c).tolist())
        assert [i for share in gathered for i in share] == single.rank_share(c).tolist(), f"consumed_samples={c}"


def check_ranks_read_the_global_batch(rank, world_size):
    """Every rank's micro-batches of token samples, gathered in rank order, equal the single-process batch."""
    import torch.distributed as dist

    shard_dir = os.environ[SHARD_ENV]
    logs: list[str] = []
    ds = open_dataset(shard_dir, log=logs.append)
    assert not [m for m in logs if "building" in m], "a rank rebuilt the cached index"
    expected = np.load(os.path.join(shard_dir, "expected.npy"))
    sampler = BatchSampler(NUM_SAMPLES, G, M, dp_rank=rank, dp_size=world_size)
    for b, c in enumerate(RANK_CONSUMED):
        mine = np.stack([np.stack([ds[int(i)] for i in mb]) for mb in sampler.micro_batches(c)])
        assert mine.shape == (sampler.accumulation_steps, M, SEQ_LEN + 1)
        gathered = [None] * world_size
        dist.all_gather_object(gathered, mine)
        batch = np.concatenate([g.reshape(-1, SEQ_LEN + 1) for g in gathered])
        np.testing.assert_array_equal(batch, expected[b], err_msg=f"consumed_samples={c}")


def test_gloo_ranks_read_the_single_process_batches(tmp_path, monkeypatch):
    """Four real gloo ranks: shares and token micro-batches gathered across ranks equal the DP=1 global batches."""
    rng = np.random.default_rng(0)
    with IndexedDatasetBuilder(tmp_path / "shard", np.uint16) as b:
        for _ in range(50):
            b.add_document(rng.integers(0, 60_000, size=int(rng.integers(1, 40))))
    ds = open_dataset(str(tmp_path))  # builds the cache the ranks then read
    single = BatchSampler(NUM_SAMPLES, G, M)
    expected = np.stack([np.stack([ds[int(i)] for i in single.rank_share(c)]) for c in RANK_CONSUMED])
    assert len(np.unique(expected.reshape(-1, SEQ_LEN + 1), axis=0)) > len(RANK_CONSUMED) * G // 2
    np.save(tmp_path / "expected.npy", expected)
    monkeypatch.setenv(SHARD_ENV, str(tmp_path))
    run_checks(4, [check_shares_gather_to_global_batch, check_ranks_read_the_global_batch], timeout=120)
