"""The checkpoint writer: shards, index, alignment, atomic appearance, refusal to overwrite."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from builders import llama_config, llama_state, write_model
from mergescope.checkpoints import CheckpointError, CheckpointWriter, TensorSpec, open_checkpoint, save_checkpoint


def load_folder(folder) -> dict[str, torch.Tensor]:
    """Read a written folder with the safetensors library and the index, independently of mergescope."""
    index = folder / "model.safetensors.index.json"
    if not index.exists():
        return load_file(folder / "model.safetensors")
    weight_map = json.loads(index.read_text())["weight_map"]
    tensors = {}
    for shard in sorted(set(weight_map.values())):
        part = load_file(folder / shard)
        assert {n for n, s in weight_map.items() if s == shard} == set(part)
        tensors.update(part)
    return tensors


def test_single_shard_round_trip(tmp_path):
    state = llama_state(dtype=torch.bfloat16)
    out = save_checkpoint(tmp_path / "out", state)
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    loaded = load_folder(out)
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[n], state[n]) for n in state)
    with safe_open(out / "model.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt"}  # transformers refuses safetensors files without it


def test_sharding_respects_the_maximum_and_writes_an_index(tmp_path):
    state = llama_state(seed=4)
    sizes = {n: t.numel() * 4 for n, t in state.items()}
    limit = 3 * max(sizes.values())
    out = save_checkpoint(tmp_path / "out", state, max_shard_bytes=limit)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    assert shards == [f"model-{k:05d}-of-{len(shards):05d}.safetensors" for k in range(1, len(shards) + 1)]
    assert index["metadata"]["total_size"] == sum(sizes.values())
    for shard in shards:
        in_shard = sum(sizes[n] for n, s in index["weight_map"].items() if s == shard)
        assert in_shard <= limit
    loaded = load_folder(out)
    assert all(torch.equal(loaded[n], state[n]) for n in state)
    # and mergescope reads back what it wrote
    reopened = open_checkpoint(out)
    assert all(torch.equal(reopened.read(n), state[n]) for n in state)


def test_tensor_larger_than_the_shard_limit_gets_its_own_shard(tmp_path):
    state = {"a": torch.zeros(10), "big": torch.ones(100), "c": torch.zeros(10)}
    out = save_checkpoint(tmp_path / "out", state, max_shard_bytes=80)
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(weight_map.values())) == 3


def test_mixed_dtypes_are_aligned(tmp_path):
    state = {
        "b": torch.ones(3, dtype=torch.bfloat16), "f": torch.ones(5), "d": torch.ones(1, dtype=torch.float64),
        "u": torch.ones(3, dtype=torch.uint8),
    }
    out = save_checkpoint(tmp_path / "out", state)
    raw = (out / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert (8 + n) % 8 == 0
    header = json.loads(raw[8 : 8 + n])
    for name, entry in header.items():
        if name != "__metadata__":
            assert (8 + n + entry["data_offsets"][0]) % state[name].element_size() == 0, name
    loaded = load_file(out / "model.safetensors")
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_writes_in_any_order_and_casts_to_the_planned_dtype(tmp_path):
    specs = [TensorSpec("x", "BF16", (4, 4)), TensorSpec("y", "F32", (2,))]
    x = torch.randn(4, 4)
    with CheckpointWriter(tmp_path / "out", specs) as writer:
        writer.write("y", torch.tensor([1.0, 2.0]))
        writer.write("x", x)
        writer.commit()
    loaded = load_file(tmp_path / "out" / "model.safetensors")
    assert torch.equal(loaded["x"], x.bfloat16()) and loaded["y"].tolist() == [1.0, 2.0]


def test_output_appears_only_on_commit(tmp_path):
    specs = [TensorSpec("x", "F32", (3,)), TensorSpec("y", "F32", (3,))]
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with CheckpointWriter(out, specs) as writer:
            writer.write("x", torch.ones(3))
            assert not out.exists()
            assert writer.tmp_dir.exists()
            raise RuntimeError("boom")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary folder left behind


def test_commit_refuses_unwritten_tensors(tmp_path):
    with CheckpointWriter(tmp_path / "out", [TensorSpec("x", "F32", (3,))]) as writer:
        with pytest.raises(Exception, match="never written"):
            writer.commit()
    assert not (tmp_path / "out").exists()


def test_wrong_shape_and_unplanned_tensor(tmp_path):
    with CheckpointWriter(tmp_path / "out", [TensorSpec("x", "F32", (3,))]) as writer:
        with pytest.raises(Exception, match="shape"):
            writer.write("x", torch.ones(4))
        with pytest.raises(Exception, match="not planned"):
            writer.write("z", torch.ones(3))


def test_existing_output_needs_overwrite(tmp_path):
    out = tmp_path / "out"
    save_checkpoint(out, {"x": torch.ones(2)})
    with pytest.raises(CheckpointError, match="--force"):
        save_checkpoint(out, {"x": torch.zeros(2)})
    assert torch.equal(load_file(out / "model.safetensors")["x"], torch.ones(2))
    save_checkpoint(out, {"x": torch.zeros(2)}, overwrite=True)
    assert torch.equal(load_file(out / "model.safetensors")["x"], torch.zeros(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    (tmp_path / "empty").mkdir()
    save_checkpoint(tmp_path / "empty", {"x": torch.ones(1)})  # an empty folder is fine


def test_copies_model_files(tmp_path):
    source = write_model(tmp_path / "src", llama_state(), llama_config(), tokenizer_vocab=64)
    checkpoint = open_checkpoint(source)
    out = save_checkpoint(tmp_path / "out", {"x": torch.ones(1)}, files=checkpoint.model_files())
    assert (out / "config.json").read_text() == (source / "config.json").read_text()
    assert (out / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()
    assert open_checkpoint(out).tokenizer_fingerprint == checkpoint.tokenizer_fingerprint


def test_refuses_when_the_disk_is_too_small(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(100, 90, 10))
    with pytest.raises(CheckpointError, match="free"):
        CheckpointWriter(tmp_path / "out", [TensorSpec("x", "F32", (100,))])
    assert list(tmp_path.iterdir()) == []
