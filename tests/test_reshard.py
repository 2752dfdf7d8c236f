"""Resharding's index math, one process: a checkpoint written by any TP size, read for every rank of any other.

Synthetic checkpoints hold the four kinds of parameter a model has: a padded vocabulary split by rows, a weight
split by rows (column-parallel), one split by columns (row-parallel) and a replicated one, plus AdamW moments and a
scalar step count. Every rank's part must equal the padded whole tensor's chunk for that rank, exactly; the
multi-rank and end-to-end checks are in test_tensor_parallel_checkpoint.py and test_train_cli.py.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from engine.parallel.layers import padded_vocab_size
from engine.training.reshard import CheckpointError, CheckpointTensors, FullTensors, local_part, read_whole

VOCAB, HIDDEN, FFN = 257, 8, 24
WHOLE = {"emb": torch.randn(VOCAB, HIDDEN, generator=torch.Generator().manual_seed(0)),
         "up": torch.randn(FFN, HIDDEN, generator=torch.Generator().manual_seed(1)),
         "down": torch.randn(HIDDEN, FFN, generator=torch.Generator().manual_seed(2)),
         "norm": torch.randn(HIDDEN, generator=torch.Generator().manual_seed(3))}
SPLIT = {"emb": 0, "up": 0, "down": 1}  # and "norm" replicated


def padded(name: str, tp: int, divisor: int) -> torch.Tensor:
    """The whole tensor as a TP run holds it, vocabulary padding rows (zero) included."""
    t = WHOLE[name]
    if name == "emb":
        t = torch.cat([t, t.new_zeros(padded_vocab_size(VOCAB, tp, divisor) - VOCAB, HIDDEN)])
    return t


def parameter(name: str, tp: int, divisor: int) -> torch.nn.Parameter:
    """An empty parameter of one rank's shape, with the layout attributes the TP layers give it."""
    t = padded(name, tp, divisor)
    p = torch.nn.Parameter(torch.empty_like(t.chunk(tp, SPLIT[name])[0] if name in SPLIT else t))
    if name in SPLIT and tp > 1:
        p.tp_dim = SPLIT[name]
    if name == "emb":
        p.tp_vocab = VOCAB
    return p


def write(step_dir: Path, tp: int, divisor: int) -> dict:
    """Model and optimizer files as TP ranks would write them; returns meta.json's layout fields."""
    step_dir.mkdir(parents=True)
    for t in range(tp):
        part = {n: (padded(n, tp, divisor).chunk(tp, SPLIT[n])[t] if n in SPLIT else WHOLE[n]).contiguous()
                for n in WHOLE}
        save_file(part, step_dir / f"model-pp00-tp{t:02d}.safetensors")
        moments = {f"{n}.exp_avg": 2 * v for n, v in part.items()}
        save_file({**moments, **{f"{n}.step": torch.tensor(7.0) for n in part}},
                  step_dir / f"optimizer-pp00-tp{t:02d}.safetensors")
    layout = {n: {"dim": SPLIT.get(n) if tp > 1 else None, "vocab": VOCAB if n == "emb" else False}
              for n in WHOLE if (n in SPLIT and tp > 1) or n == "emb"}
    return {"tp": tp, "pp": 1, "tp_layout": layout}


SAVED = [(1, 1), (2, 1), (4, 128), (1, 64)]  # (tp, model.make_vocab_size_divisible_by)
LOADED = [(1, 1), (2, 64), (3, 1), (4, 1), (8, 128)]  # TP 8 x 128: ranks 3-7 hold padding rows only


@pytest.mark.parametrize(("saved", "loaded"), list(itertools.product(SAVED, LOADED)),
                         ids=lambda x: f"tp{x[0]}-div{x[1]}")
def test_every_rank_reads_exactly_its_part(tmp_path, saved, loaded):
    """Weights and moments from files (each rank reading its rows) and from whole tensors in memory (a transformers
    import): every rank's part is the padded whole tensor's chunk, bit for bit; the step count is copied."""
    meta = write(tmp_path / "step", *saved)
    tp, divisor = loaded
    model = CheckpointTensors(tmp_path / "step", "model", meta)
    optimizer = CheckpointTensors(tmp_path / "step", "optimizer", meta)
    in_memory = FullTensors(dict(WHOLE), "memory")
    assert read_whole(model).keys() == WHOLE.keys()
    for name, want in WHOLE.items():
        assert torch.equal(read_whole(model)[name], want), name
    for rank, name in itertools.product(range(tp), WHOLE):
        p = parameter(name, tp, divisor)
        want = padded(name, tp, divisor)
        want = want.chunk(tp, SPLIT[name])[rank] if name in SPLIT else want
        for source, key, scale in [(model, name, 1), (in_memory, name, 1), (optimizer, f"{name}.exp_avg", 2)]:
            got = local_part(source, key, p, rank, tp)
            assert got.shape == p.shape and torch.equal(got, scale * want), (source.where, key, rank)
        assert optimizer.read(f"{name}.step").item() == 7.0 and optimizer.shape(f"{name}.step") == ()


def test_a_different_vocabulary_or_shape_is_an_error_naming_it(tmp_path):
    """A model with another vocabulary, or another hidden size, is refused with the name and both shapes."""
    meta = write(tmp_path / "step", 2, 1)
    source = CheckpointTensors(tmp_path / "step", "model", meta)
    bigger = torch.nn.Parameter(torch.empty(300, HIDDEN))
    bigger.tp_vocab = 300
    with pytest.raises(CheckpointError, match=r"emb has 257 vocabulary rows there, the model 300"):
        local_part(source, "emb", bigger, 0, 1)
    with pytest.raises(CheckpointError, match=r"down is \(8, 24\) there \(unsplit, unpadded\), but \(8, 48\)"):
        local_part(source, "down", torch.nn.Parameter(torch.empty(HIDDEN, 2 * FFN)), 0, 1)


def test_a_tensor_missing_from_one_file_is_a_checkpoint_error(tmp_path):
    """A TP file that lacks a tensor the others hold (a damaged checkpoint) says so, naming the tensor and file."""
    meta = write(tmp_path / "step", 2, 1)
    part = dict(WHOLE)
    part.pop("up")
    save_file({n: t.contiguous() for n, t in part.items()}, tmp_path / "step" / "model-pp00-tp01.safetensors")
    with pytest.raises(CheckpointError, match="up cannot be read from its tensor-parallel file 1"):
        CheckpointTensors(tmp_path / "step", "model", meta).read("up")
