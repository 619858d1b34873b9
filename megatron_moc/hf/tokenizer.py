"""Our SentencePiece tokenizer (tools/train_tokenizer.py) as a Hugging Face fast tokenizer.

The `tokenizers` pipeline is built from the .model file so that it encodes exactly as
SentencePiece does with the options train_tokenizer.py uses (identity normalization, no dummy
prefix, whitespace kept, byte fallback, digits split): spaces become "▁", then BPE with the
merges ordered by piece score (or Unigram with the piece scores), unknown characters fall
back to <0xNN> byte pieces. Control pieces (<pad>, <unk>, <s>, </s>) are special tokens; no
BOS/EOS is added (pretraining data has none: the EOD id is appended per document), and no
token_type_ids are returned (the model takes none; transformers 4's generate refuses them).
"""

from __future__ import annotations

import os
import shutil
from typing import Dict, Optional

SPM_MODEL_FILE = "tokenizer.model"  # the original .model, kept next to tokenizer.json


def build_hf_tokenizer(spm_path: str, model_max_length: Optional[int] = None):
    """A transformers fast tokenizer equivalent to the SentencePiece model at `spm_path`."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    proto = _read_proto(spm_path)
    pieces = [p.piece for p in proto.pieces]
    kinds = [p.type for p in proto.pieces]  # 1 normal, 2 unknown, 3 control, 4 user, 5 unused, 6 byte
    unk = kinds.index(2)
    model_type = {1: "unigram", 2: "bpe"}.get(proto.trainer_spec.model_type)
    if model_type is None:
        raise ValueError(f"{spm_path}: SentencePiece model type {proto.trainer_spec.model_type} "
                         "is not supported (bpe or unigram)")
    if model_type == "bpe":
        vocab: Dict[str, int] = {p: i for i, p in enumerate(pieces)}
        merges = []
        for i, p in enumerate(pieces):  # SentencePiece BPE pieces are stored by score, best first
            if kinds[i] != 1:
                continue
            local = [(p[:k], p[k:]) for k in range(1, len(p)) if p[:k] in vocab and p[k:] in vocab]
            merges.extend(sorted(local, key=lambda lr: (vocab[lr[0]], vocab[lr[1]])))
        model = models.BPE(vocab=vocab, merges=merges, unk_token=pieces[unk], byte_fallback=True,
                           fuse_unk=True)
    else:
        model = models.Unigram([(p.piece, p.score) for p in proto.pieces], unk_id=unk,
                               byte_fallback=True)
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse()])
    tok.add_special_tokens([AddedToken(p, special=True, normalized=False)
                            for p, k in zip(pieces, kinds) if k in (2, 3)])
    user = [AddedToken(p, special=False, normalized=False) for p, k in zip(pieces, kinds) if k == 4]
    if user:
        tok.add_tokens(user)
    spec = proto.trainer_spec

    def piece(i):
        return pieces[i] if 0 <= i < len(pieces) else None

    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=piece(spec.bos_id),
                                   eos_token=piece(spec.eos_id), unk_token=pieces[unk],
                                   pad_token=piece(spec.pad_id), clean_up_tokenization_spaces=False,
                                   model_input_names=["input_ids", "attention_mask"],
                                   **({"model_max_length": model_max_length}
                                      if model_max_length else {}))


def _read_proto(spm_path: str):
    from sentencepiece import sentencepiece_model_pb2 as pb

    if not os.path.isfile(spm_path):
        raise FileNotFoundError(f"tokenizer model not found: {spm_path}")
    proto = pb.ModelProto()
    with open(spm_path, "rb") as f:
        proto.ParseFromString(f.read())
    return proto


def save_hf_tokenizer(spm_path: str, out_dir: str, model_max_length: Optional[int] = None):
    """Write tokenizer.json + tokenizer_config.json (+ the original .model) into `out_dir`.
    The class is recorded as PreTrainedTokenizerFast, which transformers 4 and 5 both load."""
    import json

    tok = build_hf_tokenizer(spm_path, model_max_length)
    tok.save_pretrained(out_dir)
    path = os.path.join(out_dir, "tokenizer_config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
    shutil.copyfile(spm_path, os.path.join(out_dir, SPM_MODEL_FILE))
    return tok
