"""Shared by the end-to-end modules: one environment for the subprocesses (one
TORCH_EXTENSIONS_DIR for the whole session: DeepSpeed JIT-builds its CPU comm op once, ~30-90 s
on 2 cores; a private dir per session keeps jobs from sharing a stale build lock) and one tiny
tokenizer + dataset built by the data tools."""

import os
import subprocess
import sys

import pytest

from megatron_moc.parallel.groups import free_port  # noqa: F401  (the e2e tests import it from here)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="session")
def env(tmp_path_factory):
    e = dict(os.environ)
    # MOC_TEST_TORCH_EXTENSIONS_DIR: reuse one build across sessions while iterating locally.
    ext = os.environ.get("MOC_TEST_TORCH_EXTENSIONS_DIR") or str(tmp_path_factory.mktemp(
        "torch_ext"))
    e.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=ROOT,
             TORCH_EXTENSIONS_DIR=ext)
    # TRITON_INTERPRET: tests/kernels' conftest sets it for the whole pytest session.
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TRITON_INTERPRET"):
        e.pop(k, None)
    return e


@pytest.fixture(scope="session")
def data(tmp_path_factory, env):
    """Tokenizer + indexed dataset from the default corpus, through the data tools' CLIs."""
    d = tmp_path_factory.mktemp("data")
    py = sys.executable
    for cmd in ([py, "tools/build_default_corpus.py", "--output-dir", str(d), "--max-mb", "1"],
                [py, "tools/train_tokenizer.py", "--input", str(d / "stdlib.jsonl"),
                 "--output-prefix", str(d / "tok"), "--vocab-size", "512", "--num-threads", "2"],
                [py, "tools/preprocess_data.py", "--input", str(d / "stdlib.jsonl"),
                 "--tokenizer", str(d / "tok.model"), "--output-prefix", str(d / "stdlib"),
                 "--workers", "2", "--no-progress"]):
        subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    return d


@pytest.fixture(scope="session")
def two_rank_run(env, data, tmp_path_factory):
    """8 steps of the tiny recipe on 2 ranks under ZeRO-2 (DP 2, EP 1, clip 1.0), ending in
    a checkpoint at step 8: test_pretrain's two-ranks-vs-one-rank check and
    test_expert_parallel's EP = 1 curve read the same run."""
    from tests.e2e.test_pretrain import run_pretrain

    save = tmp_path_factory.mktemp("two_ranks") / "run"
    run_pretrain(env, data, save, "train.train_iters=8", nproc=2)
    return save
