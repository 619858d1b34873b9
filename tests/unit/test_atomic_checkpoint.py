"""Atomic checkpoint directories (training/atomic_checkpoint.py) and the save / load driver
(training/checkpoint.py), in one process: a stand-in engine writes files the way DeepSpeed
does (into `<save>/<tag>/`), so every fault below is injected at a known point.

Faults: a save that dies before, during and after its manifest; a disk that fills up in the
middle of a shard; a truncated file, a flipped byte, a missing file, a missing or garbled
manifest; a kill between the rename and the `latest` update. Each must leave a checkpoint that
loads, and loading must name what it skipped.
"""

import errno
import json
import os
import random

import numpy as np
import pytest
import torch

from megatron_moc.training import atomic_checkpoint as atomic
from megatron_moc.training import checkpoint as ckpt


class FakeConfig:
    def __init__(self, **values):
        self.values = {"hidden_size": 64, "num_layers": 2, **values}

    def to_dict(self):
        return dict(self.values)

    def to_yaml(self, path):
        import yaml

        with open(path, "w") as f:
            yaml.safe_dump(self.values, f)


class _NoMoCModel(torch.nn.Linear):
    def __init__(self):
        super().__init__(2, 2)

    def moc_layers(self):
        return []


class FakeEngine:
    """Writes what DeepSpeed writes where DeepSpeed writes it (`<save_dir>/<tag>/`), plus files
    of some other writer, one nested; `fail_with_enospc` makes the shard write stop with
    ENOSPC after part of it is written."""

    has_moe_layers = False

    def __init__(self, weights=1.0):
        self.module = _NoMoCModel()  # the expert-checkpoint hooks find nothing to do
        self.weights = weights
        self.fail_with_enospc = False
        self.loaded = None

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        assert save_latest is False  # `latest` is ours to move
        d = os.path.join(save_dir, tag)
        blob = np.full(4096, self.weights, dtype=np.float32).tobytes()
        with open(os.path.join(d, "mp_rank_00_model_states.pt"), "wb") as f:
            f.write(blob)
            if self.fail_with_enospc:
                f.flush()
                raise OSError(errno.ENOSPC, "No space left on device", f.name)
        os.makedirs(os.path.join(d, "extra"), exist_ok=True)  # any writer, any depth
        with open(os.path.join(d, "extra", "shard_01.safetensors"), "wb") as f:
            f.write(blob[:1000])
        with open(os.path.join(d, "extra_layout.json"), "w") as f:
            json.dump({"written_by": "another writer"}, f)

    def load_checkpoint(self, load_dir, tag, **kwargs):
        with open(os.path.join(load_dir, tag, "mp_rank_00_model_states.pt"), "rb") as f:
            self.loaded = float(np.frombuffer(f.read(), dtype=np.float32)[0])
        return os.path.join(load_dir, tag), {}


@pytest.fixture(autouse=True)
def _world(megatron_world):
    """A process group of one (gloo): the collectives of checkpoint.py run for real."""


def save(engine, save_dir, step, **kw):
    return ckpt.save_checkpoint(engine, str(save_dir), step, step * 8, FakeConfig(),
                                {"train": {"lr": 1.0}}, **kw)


def test_save_commits_manifest_and_latest_for_every_file(tmp_path):
    d = save(FakeEngine(), tmp_path, 3)
    assert d == str(tmp_path / "step_3") and (tmp_path / "latest").read_text() == "step_3"
    manifest = json.loads((tmp_path / "step_3" / atomic.MANIFEST).read_text())
    assert manifest["step"] == 3 and manifest["world_size"] == 1 and manifest["checksum"] == "crc32"
    assert manifest["model_config_sha256"] == atomic.config_sha256(FakeConfig().to_dict())
    # every file in the directory, whoever wrote it, nested ones included
    assert sorted(manifest["files"]) == [
        "config.yaml", "extra/shard_01.safetensors", "extra_layout.json",
        "mp_rank_00_model_states.pt", "recipe.yaml", "rng_rank_00000.safetensors",
        "trainer_state.json"]
    for rel, entry in manifest["files"].items():
        assert entry["bytes"] == os.path.getsize(tmp_path / "step_3" / rel)
    assert atomic.verify(str(tmp_path / "step_3")) is None
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no staging left


def test_our_files_are_not_pickles(tmp_path):
    save(FakeEngine(), tmp_path, 1)
    ours = set(os.listdir(tmp_path / "step_1")) - {"mp_rank_00_model_states.pt", "extra"}
    assert ours and all(n.endswith((".safetensors", ".json", ".yaml")) for n in ours), ours


@pytest.mark.parametrize("damage, message", [
    ("truncate", r"mp_rank_00_model_states\.pt has 8192 bytes, the manifest says 16384 "
                 r"\(truncated\)"),
    ("flip", r"mp_rank_00_model_states\.pt has CRC-32 [0-9a-f]{8}, the manifest says "
             r"[0-9a-f]{8} \(corrupt\)"),
    ("delete", r"extra/shard_01\.safetensors is missing"),
    ("no_manifest", r"manifest\.json is missing"),
    ("garbled_manifest", r"manifest\.json is not valid JSON"),
])
def test_load_falls_back_and_names_the_damage(tmp_path, capsys, damage, message):
    save(FakeEngine(weights=1.0), tmp_path, 2)
    save(FakeEngine(weights=2.0), tmp_path, 4)
    bad = tmp_path / "step_4"
    shard = bad / "mp_rank_00_model_states.pt"
    if damage == "truncate":
        os.truncate(shard, shard.stat().st_size // 2)
    elif damage == "flip":
        raw = bytearray(shard.read_bytes())
        raw[100] ^= 0x01
        shard.write_bytes(bytes(raw))
    elif damage == "delete":
        os.remove(bad / "extra" / "shard_01.safetensors")
    elif damage == "no_manifest":
        os.remove(bad / atomic.MANIFEST)
    else:
        (bad / atomic.MANIFEST).write_text('{"format": 1, "files": {')
    assert (tmp_path / "latest").read_text() == "step_4"
    engine = FakeEngine()
    state = ckpt.load_checkpoint(engine, str(tmp_path), FakeConfig())
    assert state["step"] == 2 and state["tag"] == "step_2" and engine.loaded == 1.0
    err = capsys.readouterr().err
    assert f"checkpoint {bad} is not usable" in err
    import re
    assert re.search(message, err), err
    assert "resuming from" in err and "step_2, the newest complete checkpoint" in err


def test_no_complete_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    save(FakeEngine(), tmp_path, 2)
    os.truncate(tmp_path / "step_2" / "trainer_state.json", 0)
    with pytest.raises(atomic.CheckpointError, match=r"no complete checkpoint \(step_2: .*"
                                                     r"trainer_state\.json has 0 bytes"):
        ckpt.load_checkpoint(FakeEngine(), str(tmp_path))
    assert ckpt.load_checkpoint(FakeEngine(), str(tmp_path / "empty")) is None


def test_enospc_in_a_shard_keeps_the_previous_checkpoint(tmp_path):
    save(FakeEngine(weights=1.0), tmp_path, 2)
    before = {n: (tmp_path / "step_2" / n).read_bytes() for n in atomic.list_files(
        str(tmp_path / "step_2")) if "/" not in n}
    engine = FakeEngine(weights=3.0)
    engine.fail_with_enospc = True
    with pytest.raises(atomic.CheckpointError, match=r"saving checkpoint step_4 .* failed on "
                                                     r"rank 0: \[Errno 28\] No space left.*"
                                                     r"`latest` still names 'step_2'"):
        save(engine, tmp_path, 4)
    assert (tmp_path / "latest").read_text() == "step_2"
    assert not (tmp_path / "step_4").exists() and not (tmp_path / ".tmp_step_4").exists()
    assert atomic.verify(str(tmp_path / "step_2")) is None
    for n, raw in before.items():
        assert (tmp_path / "step_2" / n).read_bytes() == raw
    assert ckpt.load_checkpoint(FakeEngine(), str(tmp_path))["step"] == 2


def test_enospc_while_writing_the_manifest(tmp_path, monkeypatch):
    save(FakeEngine(weights=1.0), tmp_path, 2)
    real = atomic.write_atomic

    def full_disk(path, data):
        if path.endswith(atomic.MANIFEST):
            raise OSError(errno.ENOSPC, "No space left on device", path)
        real(path, data)

    monkeypatch.setattr(atomic, "write_atomic", full_disk)
    with pytest.raises(atomic.CheckpointError, match="No space left"):
        save(FakeEngine(weights=2.0), tmp_path, 4)
    monkeypatch.undo()
    assert (tmp_path / "latest").read_text() == "step_2"
    assert atomic.candidate_tags(str(tmp_path)) == ["step_2"]
    assert not [n for n in os.listdir(tmp_path / "step_2") if ".tmp-" in n]


def test_kill_after_the_rename_before_latest(tmp_path, monkeypatch):
    """The newer directory is complete (manifest written before the rename): it wins even
    though `latest` still names the older one."""
    save(FakeEngine(weights=1.0), tmp_path, 2)
    real = atomic.write_atomic

    def killed(path, data):
        if os.path.basename(path) == atomic.LATEST:
            raise KeyboardInterrupt  # stands in for SIGKILL at this point
        real(path, data)

    monkeypatch.setattr(atomic, "write_atomic", killed)
    with pytest.raises(KeyboardInterrupt):
        save(FakeEngine(weights=2.0), tmp_path, 4)
    monkeypatch.undo()
    assert (tmp_path / "latest").read_text() == "step_2"
    engine = FakeEngine()
    assert ckpt.load_checkpoint(engine, str(tmp_path))["step"] == 4 and engine.loaded == 2.0


def test_kill_before_the_rename_leaves_staging_that_the_next_save_removes(tmp_path, capsys):
    save(FakeEngine(weights=1.0), tmp_path, 2)
    stage = tmp_path / ".tmp_step_4"  # what a save killed mid-write leaves
    stage.mkdir()
    (stage / "mp_rank_00_model_states.pt").write_bytes(b"half")
    assert atomic.candidate_tags(str(tmp_path)) == ["step_2"]
    assert ckpt.load_checkpoint(FakeEngine(), str(tmp_path))["step"] == 2
    save(FakeEngine(weights=2.0), tmp_path, 4)
    assert "left by a save that died" in capsys.readouterr().err
    assert atomic.verify(str(tmp_path / "step_4")) is None


def test_resave_replaces_a_damaged_checkpoint_of_the_same_step(tmp_path):
    save(FakeEngine(weights=1.0), tmp_path, 2)
    save(FakeEngine(weights=2.0), tmp_path, 4)
    os.truncate(tmp_path / "step_4" / "extra_layout.json", 1)
    assert ckpt.load_checkpoint(FakeEngine(), str(tmp_path))["step"] == 2
    save(FakeEngine(weights=5.0), tmp_path, 4)  # the resumed run gets to step 4 again
    assert atomic.verify(str(tmp_path / "step_4")) is None
    engine = FakeEngine()
    assert ckpt.load_checkpoint(engine, str(tmp_path))["step"] == 4 and engine.loaded == 5.0
    assert not [n for n in os.listdir(tmp_path) if n.startswith(atomic.TRASH_PREFIX)]


def test_keep_last_rotation(tmp_path):
    (tmp_path / "step_1").mkdir(parents=True)  # not ours (no manifest): never deleted
    for step in range(2, 12, 2):
        save(FakeEngine(), tmp_path, step, keep_last=2)
    assert [t for _, t in atomic.committed_steps(str(tmp_path))] == ["step_10", "step_8",
                                                                      "step_1"]
    # a newer checkpoint than the one being saved (the run fell back past it) is left alone
    save(FakeEngine(), tmp_path, 4, keep_last=1)
    assert sorted(t for _, t in atomic.committed_steps(str(tmp_path))) == [
        "step_1", "step_10", "step_4", "step_8"]


def test_async_save_commits_in_the_background(tmp_path):
    save(FakeEngine(weights=1.0), tmp_path, 2, async_save=True)
    ckpt.wait_for_pending_save()
    assert (tmp_path / "latest").read_text() == "step_2"
    assert atomic.verify(str(tmp_path / "step_2")) is None
    save(FakeEngine(weights=2.0), tmp_path, 4, async_save=True, keep_last=1)
    state = ckpt.load_checkpoint(FakeEngine(), str(tmp_path))  # waits for the commit first
    assert state["step"] == 4 and not (tmp_path / "step_2").exists()
    manifest = json.loads((tmp_path / "step_4" / atomic.MANIFEST).read_text())
    assert not any(n.startswith(atomic.SHARE_PREFIX) for n in manifest["files"])
    assert not [n for n in os.listdir(tmp_path / "step_4") if n.startswith(atomic.SHARE_PREFIX)]


def test_async_save_failure_is_reported(tmp_path, monkeypatch):
    def broken(*args):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(atomic, "commit", broken)
    save(FakeEngine(), tmp_path, 2, async_save=True)
    with pytest.raises(atomic.CheckpointError, match="background commit of checkpoint step_2 "
                                                     "failed: .*Input/output error"):
        ckpt.wait_for_pending_save()
    assert not (tmp_path / "latest").exists()


def test_async_hand_off_waits_for_every_rank(tmp_path):
    atomic.write_share(str(tmp_path), 0, {"a": {"bytes": 1, "crc32": "00000000"}})
    assert atomic.read_shares(str(tmp_path), 2) is None
    atomic.write_share(str(tmp_path), 1, {"b": {"bytes": 2, "crc32": "00000001"}})
    assert sorted(atomic.read_shares(str(tmp_path), 2)) == ["a", "b"]
    assert atomic.list_files(str(tmp_path)) == []  # hand-off files are never in a manifest


def test_config_change_is_named_on_load(tmp_path, capsys):
    save(FakeEngine(), tmp_path, 2)
    ckpt.load_checkpoint(FakeEngine(), str(tmp_path), FakeConfig(hidden_size=128))
    assert "written with another model config (differs: hidden_size)" in capsys.readouterr().err


def test_share_splits_the_work_over_ranks():
    files = [f"f{i}" for i in range(7)]
    parts = [atomic.share(files, r, 3) for r in range(3)]
    assert sorted(sum(parts, [])) == files and parts[0] == ["f0", "f3", "f6"]


def test_write_atomic_keeps_old_content_when_the_write_fails(tmp_path, monkeypatch):
    target = tmp_path / "latest"
    target.write_text("step_2")

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError):
        atomic.write_atomic(str(target), "step_4")
    monkeypatch.undo()
    assert target.read_text() == "step_2" and os.listdir(tmp_path) == ["latest"]


def test_rng_state_round_trip_without_pickle(tmp_path):
    path = str(tmp_path / "rng.safetensors")
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    random.gauss(0, 1)  # and one in python's
    ckpt.save_rng_state(path)
    want = (torch.rand(5), np.random.standard_normal(3), np.random.rand(2),
            [random.gauss(0, 1), random.random()])
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    ckpt.load_rng_state(path)
    got = (torch.rand(5), np.random.standard_normal(3), np.random.rand(2),
           [random.gauss(0, 1), random.random()])
    assert torch.equal(want[0], got[0])
    assert np.array_equal(want[1], got[1]) and np.array_equal(want[2], got[2])
    assert want[3] == got[3]
    with open(path, "rb") as f:
        assert b"\x80\x04" not in f.read(16)  # not a pickle: a safetensors header
