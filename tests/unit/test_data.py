"""Data pipeline on CPU: corpus -> tokenizer -> .bin/.idx -> validation -> GPTDataset -> loader.

The fixtures build one tiny corpus, tokenizer and dataset per module; each test checks one
stage against what the previous stage says it should contain (the tokenizer's own ids).
"""

import json
import os
import time

import numpy as np
import pytest
import torch

from megatron_moc.training.data import (
    DataValidationError,
    build_data_loader,
    build_datasets,
    num_samples_per_split,
    parse_blend,
    validate_indexed_dataset,
)
from megatron_moc.training.tokenizer import build_tokenizer
from tools.build_default_corpus import build_default_corpus, list_source_files
from tools.preprocess_data import preprocess
from tools.train_tokenizer import sample_lines, train_tokenizer

VOCAB = 512
SEQ = 32


def _quiet(_msg):
    pass


def _read_docs(jsonl):
    with open(jsonl) as f:
        return [json.loads(line)["text"] for line in f]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Corpus split into a jsonl, a parquet and a text file; tokenizer; two datasets."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("data")
    corpus = build_default_corpus(root / "corpus", max_bytes=400_000)
    docs = _read_docs(corpus.path)
    assert len(docs) >= 6
    third = len(docs) // 3
    a_docs, b_docs, c_docs = docs[:third], docs[third:2 * third], docs[2 * third:]
    a = root / "a.jsonl"
    a.write_text("".join(json.dumps({"text": t}) + "\n" for t in a_docs))
    b = root / "b.parquet"
    pq.write_table(pa.table({"text": b_docs}), b)
    c = root / "c.txt"
    c.write_text("\n\n".join(c_docs[:3]))  # paragraphs of code: many small documents

    model = train_tokenizer([corpus.path], str(root / "tok"), vocab_size=VOCAB,
                            user_defined_symbols=["<|sep|>"], num_threads=2)
    tok = build_tokenizer(model)
    preprocess([str(a), str(b)], str(root / "ds" / "ab"), model, workers=2, chunk_docs=2,
               progress=False, log=_quiet)
    preprocess([str(c)], str(root / "ds" / "c"), model, workers=2, text_unit="paragraph",
               progress=False, log=_quiet)
    return {"root": root, "corpus": corpus, "model": model, "tok": tok,
            "a": a, "b": b, "c": c, "ab_docs": a_docs + b_docs,
            "ab": str(root / "ds" / "ab"), "cp": str(root / "ds" / "c")}


def _expected_docs(tok, texts):
    return [tok.tokenize(t) + [tok.eod] for t in texts]


# ------------------------------------------------------------------------- corpus, tokenizer


def test_default_corpus_is_capped_sorted_and_deterministic(work, tmp_path):
    again = build_default_corpus(tmp_path, max_bytes=400_000)
    assert open(again.path, "rb").read() == open(work["corpus"].path, "rb").read()
    assert 0 < again.num_bytes <= 400_000
    paths = [json.loads(line)["path"] for line in open(again.path)]
    assert paths == sorted(paths)
    skipped = {"test", "tests", "site-packages"}
    assert not any(skipped & set(p.split("/")) for p in paths)
    assert all(p.name.endswith(".py") for p in list_source_files()[:50])


def test_tokenizer_round_trip_and_special_ids(work, tmp_path):
    tok = work["tok"]
    assert tok.vocab_size == VOCAB
    assert (tok.pad, tok.bos, tok.eod, tok.eos) == (0, 2, 3, 3)
    assert tok.tokenize("<|sep|>") == [4]
    for text in _read_docs(work["corpus"].path)[:3] + ["  x =\t'é 😀'\r\n\n  \n", ""]:
        assert tok.detokenize(tok.tokenize(text)) == text
    # same inputs and options -> the same files
    again = train_tokenizer([work["corpus"].path], str(tmp_path / "tok"), vocab_size=VOCAB,
                            user_defined_symbols=["<|sep|>"], num_threads=2)
    assert open(again, "rb").read() == open(work["model"], "rb").read()
    assert (tmp_path / "tok.vocab").read_text().splitlines()[4].startswith("<|sep|>\t")
    # the training-line sample is capped and seeded
    lines = sample_lines([work["corpus"].path], max_sentences=50, seed=3)
    assert len(lines) == 50 and lines == sample_lines([work["corpus"].path], max_sentences=50,
                                                      seed=3)


def test_missing_tokenizer_names_the_file(tmp_path):
    with pytest.raises(ValueError, match="tokenizer model not found: .*nope.model"):
        build_tokenizer(tmp_path / "nope.model")


def test_vocab_too_small_is_refused(work, tmp_path):
    with pytest.raises(ValueError, match="vocab_size 200"):
        train_tokenizer([work["corpus"].path], str(tmp_path / "t"), vocab_size=200)


# ------------------------------------------------------------------------------- preprocess


def test_preprocessed_tokens_equal_the_tokenizer(work):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    info = validate_indexed_dataset(work["ab"], VOCAB)
    expected = _expected_docs(work["tok"], work["ab_docs"])
    ds = IndexedDataset(work["ab"])
    assert ds.index.dtype == np.uint16
    assert info.num_documents == len(ds) == len(expected)
    assert info.num_tokens == sum(map(len, expected))
    for i, want in enumerate(expected):
        assert ds[i].tolist() == want
    # text file, one document per paragraph
    c_info = validate_indexed_dataset(work["cp"], VOCAB)
    assert c_info.num_documents > 3


def test_append_bos(work, tmp_path):
    preprocess([str(work["a"])], str(tmp_path / "x"), work["model"], append_bos=True,
               progress=False, log=_quiet)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(tmp_path / "x"))  # keep it: its __del__ unmaps what [0] views
    first = ds[0].tolist()
    tok = work["tok"]
    assert first == [tok.bos] + tok.tokenize(work["ab_docs"][0]) + [tok.eod]


def test_preprocess_input_errors_name_the_file(work, tmp_path):
    model = work["model"]
    with pytest.raises(ValueError, match="input file not found: .*missing.jsonl"):
        preprocess([str(tmp_path / "missing.jsonl")], str(tmp_path / "o1"), model, log=_quiet)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n\n{"text": "cut\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:3: invalid JSON"):
        preprocess([str(bad)], str(tmp_path / "o2"), model, progress=False, log=_quiet)
    nokey = tmp_path / "nokey.jsonl"
    nokey.write_text('{"content": "x"}\n')
    with pytest.raises(ValueError, match=r"nokey.jsonl:1: no field 'text'"):
        preprocess([str(nokey)], str(tmp_path / "o3"), model, progress=False, log=_quiet)
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(ValueError, match=r"junk.parquet: cannot read parquet"):
        preprocess([str(junk)], str(tmp_path / "o4"), model, progress=False, log=_quiet)
    assert not os.path.exists(tmp_path / "o2.bin") and not os.path.exists(tmp_path / "o4.bin")


def test_preprocess_resumes_and_skips_finished_inputs(work, tmp_path):
    model, a = work["model"], str(work["a"])
    fresh = preprocess([a, str(work["b"])], str(tmp_path / "ref"), model, workers=2,
                       progress=False, log=_quiet)
    assert fresh.processed == [a, str(work["b"])]

    # A run that dies in its second input ("killed") after finishing the first ...
    second = tmp_path / "b.jsonl"
    b_docs = work["ab_docs"][len(_read_docs(a)):]
    good = "".join(json.dumps({"text": t}) + "\n" for t in b_docs)
    second.write_text(good + "{broken\n")
    lines = []
    with pytest.raises(ValueError, match="b.jsonl"):
        preprocess([a, str(second)], str(tmp_path / "out"), model, workers=2, progress=False,
                   log=lines.append)
    assert not os.path.exists(tmp_path / "out.bin")
    # ... is re-run with the same command once the input is fixed: the first input is skipped.
    second.write_text(good)
    lines = []
    res = preprocess([a, str(second)], str(tmp_path / "out"), model, workers=2, progress=False,
                     log=lines.append)
    assert res.skipped == [a] and res.processed == [str(second)]
    assert any(line.startswith(f"skip {a}") for line in lines)
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"out{suffix}").read_bytes() == (tmp_path / f"ref{suffix}").read_bytes()

    # A finished job re-run: everything skipped, the outputs not even rewritten.
    mtime = os.stat(tmp_path / "out.bin").st_mtime_ns
    res = preprocess([a, str(second)], str(tmp_path / "out"), model, workers=2, progress=False,
                     log=_quiet)
    assert res.processed == [] and len(res.skipped) == 2
    assert os.stat(tmp_path / "out.bin").st_mtime_ns == mtime
    manifest = json.loads((tmp_path / "out.manifest.json").read_text())
    assert manifest["inputs"][a]["documents"] == len(_read_docs(a))

    # Other settings on the same prefix are refused rather than mixed.
    with pytest.raises(ValueError, match="other settings .*append_bos"):
        preprocess([a], str(tmp_path / "out"), model, append_bos=True, log=_quiet)


# ------------------------------------------------------------------------------- validation


def _write_dataset(prefix, docs, dtype=np.uint16):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for doc in docs:
        builder.add_document(np.array(doc), [len(doc)])
    builder.finalize(prefix + ".idx")


def test_validation_errors_name_the_file(tmp_path):
    p = str(tmp_path / "d")
    _write_dataset(p, [[5, 6, 7], [8, 9, 999, 10]])
    info = validate_indexed_dataset(p, 1000)
    assert (info.num_documents, info.num_tokens, info.max_token_id) == (2, 7, 999)

    with pytest.raises(DataValidationError, match=r"d.bin: token id 999 at token 5 "
                                                  r"\(document 1, offset 2\) is outside the "
                                                  r"vocabulary of 512"):
        validate_indexed_dataset(p, 512)
    with pytest.raises(DataValidationError, match="token id 999"):
        validate_indexed_dataset(p, 512, chunk_tokens=2)  # found across chunk borders too

    bin_bytes = (tmp_path / "d.bin").read_bytes()
    (tmp_path / "d.bin").write_bytes(bin_bytes[:-2])
    with pytest.raises(DataValidationError, match=r"d.bin has 12 bytes but .*d.idx describes 7 "
                                                  r"uint16 tokens = 14 bytes"):
        validate_indexed_dataset(p, 1000)

    os.remove(tmp_path / "d.bin")
    with pytest.raises(DataValidationError, match=r"dataset file not found: .*d.bin"):
        validate_indexed_dataset(p, 1000)
    (tmp_path / "d.bin").write_bytes(bin_bytes)
    idx_bytes = (tmp_path / "d.idx").read_bytes()
    (tmp_path / "d.idx").write_bytes(idx_bytes[:-4])
    with pytest.raises(DataValidationError, match=r"d.idx: .*truncated or corrupt"):
        validate_indexed_dataset(p, 1000)
    (tmp_path / "d.idx").write_bytes(b"garbage!" + idx_bytes[8:])
    with pytest.raises(DataValidationError, match=r"d.idx: not a Megatron index file"):
        validate_indexed_dataset(p, 1000)
    os.remove(tmp_path / "d.idx")
    with pytest.raises(DataValidationError, match=r"dataset file not found: .*d.idx"):
        validate_indexed_dataset(p, 1000)


def test_build_datasets_validates_before_building(work, tmp_path):
    with pytest.raises(DataValidationError, match=r"dataset file not found: .*nowhere\.idx"):
        build_datasets([work["ab"], str(tmp_path / "nowhere")], "100,0,0", SEQ, 1, work["tok"],
                       4, 4, 1, 2, str(tmp_path))
    assert not os.path.exists(tmp_path / "data_cache")


# ---------------------------------------------------------------------------- GPT datasets


def test_blend_parsing_and_sizes():
    assert parse_blend(["0.3", "a", "0.7", "b"]) == (["a", "b"], [0.3, 0.7])
    assert parse_blend("a b") == (["a", "b"], None)
    assert parse_blend([1, "a"]) == (["a"], [1.0])
    for bad in ([], ["1", "2"], ["1", "a", "b"], ["-1", "a"]):
        with pytest.raises(ValueError):
            parse_blend(bad)
    assert num_samples_per_split(100, 8, 2, 50) == [800, 48, 16]


def test_gpt_samples_are_windows_of_the_tokenized_documents(work, tmp_path):
    tok = work["tok"]
    ds = build_datasets([work["ab"]], "90,10,0", SEQ, 1234, tok, train_iters=10,
                        global_batch_size=4, eval_iters=2, eval_interval=5,
                        output_dir=str(tmp_path)).train
    assert ds is not None and len(ds) >= 40
    assert os.listdir(tmp_path / "data_cache")
    docs = _expected_docs(tok, work["ab_docs"])
    # GPTDataset reads the documents in its shuffled document order as one stream.
    stream = np.concatenate([docs[d] for d in ds.document_index])
    starts = np.concatenate([[0], np.cumsum([len(docs[d]) for d in ds.document_index])])
    for i in range(0, len(ds), 7):
        sample = ds[i]
        assert sample["tokens"].shape == sample["labels"].shape == (SEQ,)
        assert sample["tokens"].dtype == torch.int64
        assert sample["loss_mask"].dtype == torch.float32
        assert sample["position_ids"].tolist() == list(range(SEQ))
        d, off = ds.sample_index[ds.shuffle_index[i]]
        begin = starts[d] + off
        window = stream[begin:begin + SEQ + 1]
        assert sample["tokens"].tolist() == window[:-1].tolist()
        assert sample["labels"].tolist() == window[1:].tolist()
    # same seed and cache -> same samples; another seed -> another order
    again = build_datasets([work["ab"]], "90,10,0", SEQ, 1234, tok, 10, 4, 2, 5,
                           str(tmp_path)).train
    assert torch.equal(again[3]["tokens"], ds[3]["tokens"])
    other = build_datasets([work["ab"]], "90,10,0", SEQ, 99, tok, 10, 4, 2, 5,
                           str(tmp_path)).train
    assert not all(torch.equal(other[i]["tokens"], ds[i]["tokens"]) for i in range(8))


def test_weighted_blend_of_two_prefixes(work, tmp_path):
    tok = work["tok"]
    sets = build_datasets(["1", work["ab"], "3", work["cp"]], "90,10,0", SEQ, 7, tok,
                          train_iters=25, global_batch_size=8, eval_iters=1, eval_interval=25,
                          output_dir=str(tmp_path))
    train = sets.train
    assert len(train) == 200 and sets.valid is not None and sets.test is None
    ids = np.array([train.dataset_index[i] for i in range(len(train))])
    assert abs((ids == 0).sum() - 50) <= 1 and abs((ids == 1).sum() - 150) <= 1
    for i in (0, 1, 2, 57):
        sample = train[i]
        d, j = train.dataset_index[i], train.dataset_sample_index[i]
        assert sample["dataset_id"] == d
        assert torch.equal(sample["tokens"], train.datasets[d][j]["tokens"])


# --------------------------------------------------------------------------------- loader


def test_loader_resumes_at_any_step(work, tmp_path):
    train = build_datasets([work["ab"]], "100,0,0", SEQ, 1, work["tok"], 12, 8, 0, 0,
                           str(tmp_path)).train
    gbs, mbs = 8, 2  # 4 micro-batches of accumulation per step

    def take(step, n, rank=0, dp=1):
        loader = build_data_loader(train, step, gbs, mbs, rank, dp)
        it = iter(loader)
        return [next(it) for _ in range(n)]

    full = take(0, 6 * 4)
    assert full[0]["tokens"].shape == (mbs, SEQ)
    resumed = take(3, 3 * 4)
    for want, got in zip(full[12:], resumed):
        assert all(torch.equal(want[k], got[k]) for k in want)
    # DP=2: at every micro-batch the two ranks hold the two halves of the DP=1 order.
    one = take(2, 2, dp=1)
    loader_1 = build_data_loader(train, 2, gbs, 2 * mbs)
    wide = next(iter(loader_1))["tokens"]
    r0, r1 = take(2, 1, 0, 2)[0]["tokens"], take(2, 1, 1, 2)[0]["tokens"]
    assert torch.equal(torch.cat([r0, r1]), wide)
    assert torch.equal(torch.cat([one[0]["tokens"], one[1]["tokens"]]), wide)
    with pytest.raises(ValueError, match="no data left"):
        build_data_loader(train, 1000, gbs, mbs)
    with pytest.raises(ValueError, match="not a multiple"):
        build_data_loader(train, 0, 6, 4)


# ------------------------------------------------- fresh processes: no process group, 2 gloo ranks
# The unit-test conftest gives every test a gloo world of one, so the two cases megatron-core
# treats differently run in freshly spawned interpreters (a fork would inherit that group).


def _spawn(fn, nprocs, args, timeout=120):
    import torch.multiprocessing as mp

    ctx = mp.start_processes(fn, args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.time() + timeout
    while not ctx.join(timeout=2):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{fn.__name__} did not finish in {timeout} s")


def _no_group_main(_rank, root, prefixes, model, out):
    assert not torch.distributed.is_initialized()
    tok = build_tokenizer(model)
    train = build_datasets(["1", prefixes[0], "3", prefixes[1]], "90,10,0", SEQ, 7, tok, 25, 8,
                           1, 25, root).train
    get_rank_restored = False
    try:
        torch.distributed.get_rank()
    except ValueError:
        get_rank_restored = True
    torch.save({"tokens": torch.stack([train[i]["tokens"] for i in range(8)]),
                "get_rank_restored": get_rank_restored}, f"{out}/single.pt")


def test_single_process_without_process_group(work, tmp_path):
    # megatron-core's BlendedDataset calls get_rank() unguarded; build_datasets must cope.
    _spawn(_no_group_main, 1, (str(tmp_path), [work["ab"], work["cp"]], work["model"],
                               str(tmp_path)))
    got = torch.load(tmp_path / "single.pt", weights_only=True)
    assert got["get_rank_restored"]
    here = build_datasets(["1", work["ab"], "3", work["cp"]], "90,10,0", SEQ, 7, work["tok"],
                          25, 8, 1, 25, str(tmp_path / "here")).train
    assert torch.equal(got["tokens"], torch.stack([here[i]["tokens"] for i in range(8)]))


def _rank_main(rank, world, root, ab, model, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{root}/rdzv", rank=rank,
                            world_size=world)
    try:
        tok = build_tokenizer(model)
        try:  # a bad vocabulary size: rank 0 finds it, both ranks raise the same line
            build_datasets([ab], "100,0,0", SEQ, 1, _SmallVocab(tok), 4, 4, 0, 0, root)
            err = None
        except DataValidationError as e:
            err = str(e)
        train = build_datasets([ab], "100,0,0", SEQ, 1, tok, 6, 4, 0, 0, root).train
        loader = build_data_loader(train, 1, 4, 2, rank, world)
        batches = [b["tokens"] for _, b in zip(range(3), loader)]
        torch.save({"err": err, "tokens": torch.stack(batches)}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


class _SmallVocab:
    """The real tokenizer claiming a vocabulary of 100 ids."""

    def __init__(self, tok):
        self.tok = tok

    def __getattr__(self, name):
        return 100 if name == "vocab_size" else getattr(self.tok, name)


@pytest.mark.world_size(2)
def test_two_gloo_ranks_build_once_and_split_the_batch(work, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    _spawn(_rank_main, 2, (2, str(tmp_path), work["ab"], work["model"], str(out)))
    r0, r1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert r0["err"] == r1["err"] and "outside the vocabulary of 100" in r0["err"]
    assert len(os.listdir(tmp_path / "data_cache")) == 4  # one index set, built by rank 0
    single = build_datasets([work["ab"]], "100,0,0", SEQ, 1, work["tok"], 6, 4, 0, 0,
                            str(tmp_path / "single")).train
    want = [b["tokens"] for _, b in zip(range(3), build_data_loader(single, 1, 4, 4))]
    for step, batch in enumerate(want):
        assert torch.equal(torch.cat([r0["tokens"][step], r1["tokens"][step]]), batch)
