"""Training data: check indexed datasets up front, build GPT datasets, resume their order exactly.

Three steps, in the order training calls them:

1. `validate_indexed_dataset` reads each ``.idx`` and scans each ``.bin`` before the first step,
   so a missing file, a truncated file or a token id outside the vocabulary stops the run with
   one line naming the file (megatron-core itself would fail later with a bare assert, or
   silently index past the embedding table).
2. `build_datasets` builds the train / valid / test splits through megatron-core's
   `BlendedMegatronDatasetBuilder` and `GPTDataset` (weighted blends, a split string, a seed),
   caching the sample indices under ``<output_dir>/data_cache``. It runs in a plain single CPU
   process as well as under torch.distributed (gloo or NCCL); see `build_datasets`.
3. `build_data_loader` serves a DP rank its micro-batches from any global step on. The order
   is fixed by the dataset (GPTDataset has already shuffled it with the seed), so resuming is
   only an offset: step k starts at sample ``k * global_batch_size``.
"""

from __future__ import annotations

import contextlib
import os
import struct
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch

# .idx layout written by megatron-core's IndexedDatasetBuilder (indexed_dataset.py):
#   9-byte magic | u64 version (1) | u8 dtype code | u64 num sequences n | u64 num documents d
#   | int32 lengths[n] | int64 byte pointers[n] | int64 document boundaries[d]
_IDX_MAGIC = b"MMIDIDX\x00\x00"
_IDX_HEADER_BYTES = 9 + 8 + 1 + 8 + 8
_DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64,
                6: np.float64, 7: np.float32, 8: np.uint16}


class DataValidationError(ValueError):
    """A dataset on disk is missing, inconsistent or holds ids outside the vocabulary."""


@dataclass(frozen=True)
class IndexedDatasetInfo:
    """What `validate_indexed_dataset` found in one ``.bin``/``.idx`` pair."""

    prefix: str
    dtype: np.dtype
    num_sequences: int
    num_documents: int
    num_tokens: int
    max_token_id: int


def validate_indexed_dataset(
    prefix: str, vocab_size: int, chunk_tokens: int = 1 << 24
) -> IndexedDatasetInfo:
    """Check one indexed dataset: files present, index well formed, sizes agree, ids in range.

    Args:
        prefix: path prefix of ``<prefix>.bin`` and ``<prefix>.idx``.
        vocab_size: every token id must be below this.
        chunk_tokens: tokens scanned per step (memory stays bounded for any file size).

    Returns:
        An `IndexedDatasetInfo` with the counts, the dtype and the largest token id.

    Raises:
        DataValidationError: with one line naming the file and what is wrong.
    """
    bin_path, idx_path = prefix + ".bin", prefix + ".idx"
    for path in (idx_path, bin_path):
        if not os.path.isfile(path):
            raise DataValidationError(f"dataset file not found: {path}")

    idx_size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as f:
        header = f.read(_IDX_HEADER_BYTES)
    if len(header) < _IDX_HEADER_BYTES or header[:9] != _IDX_MAGIC:
        raise DataValidationError(f"{idx_path}: not a Megatron index file (bad header)")
    version, code, n, d = struct.unpack("<QBQQ", header[9:])
    if version != 1:
        raise DataValidationError(f"{idx_path}: index version {version}, expected 1")
    if code not in _DTYPE_CODES:
        raise DataValidationError(f"{idx_path}: unknown token dtype code {code}")
    dtype = np.dtype(_DTYPE_CODES[code])
    if dtype.kind not in "iu":
        raise DataValidationError(f"{idx_path}: token dtype {dtype} is not an integer type")
    expected_idx = _IDX_HEADER_BYTES + 12 * n + 8 * d
    if idx_size != expected_idx:
        raise DataValidationError(
            f"{idx_path}: {idx_size} bytes, but its header ({n} sequences, {d} document "
            f"boundaries) needs {expected_idx}: the index is truncated or corrupt"
        )

    index = np.memmap(idx_path, mode="r", dtype=np.uint8)
    lengths = np.frombuffer(index, np.int32, n, _IDX_HEADER_BYTES)
    pointers = np.frombuffer(index, np.int64, n, _IDX_HEADER_BYTES + 4 * n)
    doc_bounds = np.frombuffer(index, np.int64, d, _IDX_HEADER_BYTES + 12 * n)
    if n and lengths.min() < 0:
        raise DataValidationError(f"{idx_path}: negative sequence length")
    ends = np.cumsum(lengths, dtype=np.int64)
    if n and (pointers[0] != 0 or not np.array_equal(pointers[1:], ends[:-1] * dtype.itemsize)):
        raise DataValidationError(f"{idx_path}: sequence pointers do not follow the lengths")
    if d == 0 or doc_bounds[0] != 0 or doc_bounds[-1] != n or np.any(np.diff(doc_bounds) < 0):
        raise DataValidationError(f"{idx_path}: document boundaries are not 0..{n} ascending")

    num_tokens = int(ends[-1]) if n else 0
    expected_bin = num_tokens * dtype.itemsize
    bin_size = os.path.getsize(bin_path)
    if bin_size != expected_bin:
        raise DataValidationError(
            f"{bin_path} has {bin_size} bytes but {idx_path} describes {num_tokens} {dtype} "
            f"tokens = {expected_bin} bytes: the pair is truncated or mismatched"
        )

    max_id = _scan_token_ids(bin_path, dtype, num_tokens, vocab_size, ends, doc_bounds,
                             chunk_tokens)
    return IndexedDatasetInfo(prefix, dtype, n, d - 1, num_tokens, max_id)


def _scan_token_ids(bin_path, dtype, num_tokens, vocab_size, ends, doc_bounds, chunk) -> int:
    """Largest id in the file; raise at the first id outside [0, vocab_size)."""
    if num_tokens == 0:
        return -1
    tokens = np.memmap(bin_path, mode="r", dtype=dtype, shape=(num_tokens,))
    max_id = -1
    for start in range(0, num_tokens, chunk):
        block = tokens[start:start + chunk]
        hi, lo = int(block.max()), int(block.min())
        if hi >= vocab_size or lo < 0:
            pos = start + int(np.argmax((block >= vocab_size) | (block < 0)))
            seq = int(np.searchsorted(ends, pos, side="right"))
            doc = int(np.searchsorted(doc_bounds, seq, side="right")) - 1
            offset = pos - (int(ends[seq - 1]) if seq else 0)
            raise DataValidationError(
                f"{bin_path}: token id {int(tokens[pos])} at token {pos} (document {doc}, "
                f"offset {offset}) is outside the vocabulary of {vocab_size}: was the data "
                "tokenized with another tokenizer?"
            )
        max_id = max(max_id, hi)
    return max_id


# ---------------------------------------------------------------------------- datasets


@dataclass(frozen=True)
class Datasets:
    """The splits built by `build_datasets`; a split with weight 0 is None."""

    train: Optional[torch.utils.data.Dataset]
    valid: Optional[torch.utils.data.Dataset]
    test: Optional[torch.utils.data.Dataset]


def parse_blend(blend: Union[str, Sequence]) -> tuple[list[str], Optional[list[float]]]:
    """Read ``[w1, p1, w2, p2, ...]`` or ``[p1, p2, ...]`` (or the same, space separated).

    Returns:
        (prefixes, weights), weights None when none were given (then megatron-core weighs each
        prefix by its size).

    Raises:
        ValueError: for an empty blend, a non-positive weight or a mix of both forms.
    """
    items = blend.split() if isinstance(blend, str) else list(blend)
    if not items:
        raise ValueError("the data blend is empty: give prefixes or weight/prefix pairs")

    def as_weight(x) -> Optional[float]:
        try:
            return float(x)
        except (TypeError, ValueError):  # a prefix (str or PathLike)
            return None

    if all(as_weight(x) is None for x in items):
        return [os.fspath(x) for x in items], None
    if len(items) % 2 or any(as_weight(w) is None for w in items[0::2]) or any(
            as_weight(p) is not None for p in items[1::2]):
        raise ValueError(f"data blend {items} must be [weight, prefix, weight, prefix, ...] "
                         "or [prefix, prefix, ...]")
    weights = [as_weight(w) for w in items[0::2]]
    if any(w <= 0 for w in weights):
        raise ValueError(f"data blend weights must be positive, got {weights}")
    return [os.fspath(p) for p in items[1::2]], weights


def num_samples_per_split(
    train_iters: int, global_batch_size: int, eval_iters: int, eval_interval: int
) -> list[int]:
    """Samples each split must provide, as Megatron-LM counts them.

    Train: every step's global batch. Valid: ``eval_iters`` batches at each evaluation (every
    ``eval_interval`` steps, plus one at the end). Test: one evaluation.
    """
    num_evals = train_iters // eval_interval + 1 if eval_interval > 0 else 1
    return [train_iters * global_batch_size,
            num_evals * eval_iters * global_batch_size,
            eval_iters * global_batch_size]


def build_datasets(
    blend: Union[str, Sequence],
    split: str,
    seq_length: int,
    seed: int,
    tokenizer,
    train_iters: int,
    global_batch_size: int,
    eval_iters: int,
    eval_interval: int,
    output_dir: str,
    validate: bool = True,
    is_built_on_rank: Optional[Callable[[], bool]] = None,
    eod_mask_loss: bool = False,
) -> Datasets:
    """Build the train / valid / test GPT datasets of a (weighted) blend, on every rank.

    Call it on all ranks together when torch.distributed is initialized: rank 0 validates the
    files and builds the cached indices first, the others wait at a barrier and then load them
    from the cache (``output_dir`` must be on a file system all ranks see). In a single
    process without a process group it just builds.

    Args:
        blend: ``[w1, p1, w2, p2, ...]`` or ``[p1, ...]`` (see `parse_blend`).
        split: train/valid/test weights, e.g. ``"98,2,0"``; each prefix is split by documents.
        seq_length: tokens per sample (each sample reads ``seq_length + 1`` tokens).
        seed: seed of megatron-core's document and sample shuffles.
        tokenizer: a `SentencePieceTokenizer` (vocab_size, eod, pad, unique_identifiers).
        train_iters, global_batch_size, eval_iters, eval_interval: sizes of the splits
            (see `num_samples_per_split`).
        output_dir: the run directory; the index cache goes to ``<output_dir>/data_cache``.
        validate: run `validate_indexed_dataset` on every prefix first (on rank 0; the error
            reaches every rank).
        is_built_on_rank: which ranks build datasets; default all.
        eod_mask_loss: zero the loss on end-of-document targets.

    Returns:
        `Datasets`; each sample is a dict of ``tokens``, ``labels`` (int64 ``[seq_length]``),
        ``loss_mask`` (float32) and ``position_ids`` (int64), plus ``dataset_id`` for blends.
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    prefixes, weights = parse_blend(blend)
    if validate:
        _validate_on_rank_zero(prefixes, tokenizer.vocab_size)
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=(prefixes, weights),
        split=split,
        path_to_cache=os.path.join(output_dir, "data_cache"),
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=eod_mask_loss,
        # Attention is causal inside the model (SDPA); a [1, s, s] mask per sample is waste.
        create_attention_mask=False,
    )
    sizes = num_samples_per_split(train_iters, global_batch_size, eval_iters, eval_interval)
    builder = BlendedMegatronDatasetBuilder(
        GPTDataset, sizes, is_built_on_rank or (lambda: True), config
    )
    with _rank_zero_without_process_group():
        train, valid, test = builder.build()
    return Datasets(train, valid, test)


def _validate_on_rank_zero(prefixes: list[str], vocab_size: int) -> None:
    """Validate on rank 0 only (one scan of the data, not one per rank); every rank raises."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    error = [None]
    if not distributed or torch.distributed.get_rank() == 0:
        try:
            for prefix in prefixes:
                validate_indexed_dataset(prefix, vocab_size)
        except DataValidationError as err:
            if not distributed:
                raise
            error[0] = str(err)
    if distributed:
        torch.distributed.broadcast_object_list(error, src=0)
        if error[0] is not None:
            raise DataValidationError(error[0])


@contextlib.contextmanager
def _rank_zero_without_process_group() -> Iterator[None]:
    """Let megatron-core's BlendedDataset build in a process with no process group.

    megatron-core 0.16.1 `BlendedDataset._build_indices` (blended_dataset.py, line 153) calls
    `torch.distributed.get_rank()` without checking `is_initialized()` whenever a cache path
    is set, which raises in a plain single process; everything else there checks first. For the
    duration of the build, and only when no process group exists, the rank reads as 0.
    """
    if torch.distributed.is_initialized():
        yield
        return
    original = torch.distributed.get_rank
    torch.distributed.get_rank = lambda group=None: 0
    try:
        yield
    finally:
        torch.distributed.get_rank = original


# ------------------------------------------------------------------------------- loading


class ResumableBatchSampler(torch.utils.data.Sampler):
    """Megatron-LM's `MegatronPretrainingSampler`, re-written small: the order is an offset.

    Samples are taken in index order from `consumed_samples` on, ``micro_batch_size *
    data_parallel_size`` at a time; rank r gets the r-th slice of ``micro_batch_size``. With
    gradient accumulation the micro-batches of one step simply follow each other, so after k
    steps of global batch G exactly ``k * G`` samples are consumed and a resumed run continues
    with the very batches the uninterrupted run would have seen. A last incomplete group is
    dropped. Shuffling is the dataset's business (GPTDataset's seeded shuffle index).

    Args:
        total_samples: length of the dataset.
        consumed_samples: samples all ranks together consumed before this sampler starts.
        micro_batch_size: samples per rank per micro-batch.
        data_parallel_rank, data_parallel_size: this rank's place in the DP group.
    """

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 data_parallel_rank: int = 0, data_parallel_size: int = 1) -> None:
        if micro_batch_size < 1 or not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"bad sampler shape: micro_batch_size {micro_batch_size}, DP rank "
                             f"{data_parallel_rank} of {data_parallel_size}")
        if not 0 <= consumed_samples < total_samples:
            raise ValueError(f"no data left: {consumed_samples} samples consumed of a dataset of "
                             f"{total_samples} (raise train_iters when building the datasets)")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.rank = data_parallel_rank
        self.group = micro_batch_size * data_parallel_size

    def __len__(self) -> int:
        return (self.total_samples - self.consumed_samples) // self.group

    def __iter__(self) -> Iterator[list[int]]:
        for begin in range(self.consumed_samples, self.total_samples - self.group + 1, self.group):
            first = begin + self.rank * self.micro_batch_size
            yield list(range(first, first + self.micro_batch_size))


def collate_batch(samples: list[dict]) -> dict[str, torch.Tensor]:
    """Stack a list of dataset samples into one dict of tensors with a leading batch dim.

    Returns:
        ``tokens``, ``labels``, ``position_ids``: int64 ``[b, s]``; ``loss_mask``: float32
        ``[b, s]``; ``dataset_id`` (blends only): int64 ``[b]``.
    """
    batch = {}
    for key in samples[0]:
        values = [sample[key] for sample in samples]
        if isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack(values)
        else:
            batch[key] = torch.as_tensor(np.asarray(values)).long()
    return batch


def build_data_loader(
    dataset: torch.utils.data.Dataset,
    global_step: int,
    global_batch_size: int,
    micro_batch_size: int,
    data_parallel_rank: int = 0,
    data_parallel_size: int = 1,
    num_workers: int = 0,
) -> torch.utils.data.DataLoader:
    """A loader of this DP rank's micro-batches, starting where step `global_step` starts.

    Args:
        dataset: a split from `build_datasets`.
        global_step: optimizer steps already taken (0 for a fresh run).
        global_batch_size: samples per optimizer step over all DP ranks; a multiple of
            ``micro_batch_size * data_parallel_size`` (the rest is gradient accumulation).
        micro_batch_size: samples per rank per forward pass.
        data_parallel_rank, data_parallel_size: this rank's place in the DP group.
        num_workers: loader worker processes (the order does not depend on it).

    Returns:
        A DataLoader yielding `collate_batch` dicts of ``[micro_batch_size, seq_length]``.
    """
    if global_batch_size % (micro_batch_size * data_parallel_size):
        raise ValueError(
            f"global batch size {global_batch_size} is not a multiple of micro batch size "
            f"{micro_batch_size} x data-parallel size {data_parallel_size}"
        )
    sampler = ResumableBatchSampler(len(dataset), global_step * global_batch_size,
                                    micro_batch_size, data_parallel_rank, data_parallel_size)
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate_batch, num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )
