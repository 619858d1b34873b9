"""A SentencePiece tokenizer with the interface megatron-core's GPTDataset reads.

megatron-core 0.16 types `GPTDatasetConfig.tokenizer` as `MegatronTokenizerBase` (the legacy
`MegatronLegacyTokenizer` of `megatron/core/datasets/megatron_tokenizer.py` still works but logs
a deprecation warning on every construction). What the datasets actually read is:

- `vocab_size`: picks the token dtype code in `GPTDatasetConfig.__post_init__`;
- `eod`: the end-of-document id, used for loss and position masks;
- `pad`: masked out of the loss; it must differ from `eod`/`eos` or megatron-core ignores it;
- `unique_identifiers`: serialized into the dataset-cache hash, so two different tokenizers
  never share cached sample indices.

The ids are fixed by `tools/train_tokenizer.py`: pad 0, unk 1, bos 2, eos 3, and eod = eos.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict

from megatron.core.tokenizers import MegatronTokenizerBase


class SentencePieceTokenizer(MegatronTokenizerBase):
    """Wraps a SentencePiece ``.model`` file; ids are plain Python ints.

    Args:
        model_path: path to the ``<prefix>.model`` written by `tools/train_tokenizer.py`.
    """

    def __init__(self, model_path: str) -> None:
        import sentencepiece

        super().__init__(model_path, {"library": "sentencepiece"})
        with open(model_path, "rb") as f:
            proto = f.read()
        self._sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
        self._sha256 = hashlib.sha256(proto).hexdigest()
        if self._sp.eos_id() < 0:
            raise ValueError(
                f"tokenizer {model_path} defines no eos piece, so no end-of-document id: "
                "retrain it with tools/train_tokenizer.py"
            )

    def tokenize(self, text: str) -> list[int]:
        """Encode `text` to ids, without bos or eod."""
        return self._sp.encode(text)

    def detokenize(self, ids) -> str:
        """Decode ids (any int sequence or array) back to text."""
        return self._sp.decode([int(i) for i in ids])

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def vocab(self) -> dict[str, int]:
        return {self._sp.id_to_piece(i): i for i in range(self.vocab_size)}

    @property
    def inv_vocab(self) -> dict[int, str]:
        return {i: self._sp.id_to_piece(i) for i in range(self.vocab_size)}

    @property
    def eod(self) -> int:
        return self._sp.eos_id()

    @property
    def eos(self) -> int:
        return self._sp.eos_id()

    @property
    def bos(self) -> int:
        return self._sp.bos_id()

    @property
    def pad(self) -> int:
        return self._sp.pad_id()

    @property
    def unk(self) -> int:
        return self._sp.unk_id()

    @property
    def sha256(self) -> str:
        """Hash of the model file's bytes: identifies the tokenizer wherever the file lives."""
        return self._sha256

    @property
    def unique_identifiers(self) -> OrderedDict:
        # The content hash, not the path: moving the file keeps the dataset cache valid, and a
        # retrained tokenizer at the same path does not reuse stale sample indices.
        return OrderedDict(
            [("class", type(self).__name__), ("sha256", self._sha256),
             ("vocab_size", self.vocab_size)]
        )

    def apply_chat_template(self, *args, **kwargs):
        raise NotImplementedError("SentencePieceTokenizer has no chat template (pretraining only)")


def build_tokenizer(path: str | os.PathLike) -> SentencePieceTokenizer:
    """Load the tokenizer at `path` (a ``.model`` file, or the prefix it was written with).

    Raises:
        ValueError: naming the file when it does not exist.
    """
    path = os.fspath(path)
    if not os.path.isfile(path) and os.path.isfile(path + ".model"):
        path = path + ".model"
    if not os.path.isfile(path):
        raise ValueError(
            f"tokenizer model not found: {path} (build one with tools/train_tokenizer.py)"
        )
    return SentencePieceTokenizer(path)
