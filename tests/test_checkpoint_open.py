"""Opening checkpoints from headers alone, and reading tensors equal to the safetensors library's."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from builders import llama_config, llama_state, write_model, write_sharded, write_tokenizer
from mergescope.checkpoints import (
    CheckpointError,
    SafetensorsCheckpoint,
    TorchBinCheckpoint,
    open_checkpoint,
    safetensors_format,
)


def assert_same_tensors(checkpoint, expected: dict[str, torch.Tensor]) -> None:
    assert sorted(checkpoint.tensor_names) == sorted(expected)
    for name, tensor in expected.items():
        got = checkpoint.read(name)
        assert got.dtype == tensor.dtype and got.shape == tensor.shape, name
        assert torch.equal(got, tensor), name


def test_single_file_folder_reads_equal_safetensors(tmp_path):
    folder = write_model(tmp_path / "m", llama_state(), llama_config(), tokenizer_vocab=64)
    checkpoint = open_checkpoint(folder)
    assert isinstance(checkpoint, SafetensorsCheckpoint)
    assert_same_tensors(checkpoint, load_file(folder / "model.safetensors"))
    assert checkpoint.name == "m"
    assert checkpoint.config.architecture == "LlamaForCausalLM"
    assert checkpoint.config.num_layers == 2 and checkpoint.config.vocab_size == 64


def test_single_file_path_and_stem_name(tmp_path):
    state = llama_state()
    path = tmp_path / "weights.safetensors"
    save_file(state, str(path))
    checkpoint = open_checkpoint(path)
    assert checkpoint.name == "weights"
    assert_same_tensors(checkpoint, state)


def test_sharded_folder(tmp_path):
    state = llama_state(seed=3)
    folder = write_sharded(tmp_path / "sharded", state, shards=3, config=llama_config())
    checkpoint = open_checkpoint(folder)
    assert len(checkpoint.files) == 3
    assert_same_tensors(checkpoint, state)
    assert checkpoint.num_parameters == sum(t.numel() for t in state.values())
    assert checkpoint.num_bytes == sum(t.numel() * t.element_size() for t in state.values())


def test_bf16_and_dtype_conversion(tmp_path):
    state = llama_state(dtype=torch.bfloat16)
    folder = write_model(tmp_path / "bf16", state)
    checkpoint = open_checkpoint(folder)
    assert set(checkpoint.dtypes) == {"BF16"}
    assert_same_tensors(checkpoint, state)
    name = "model.layers.1.mlp.up_proj.weight"
    as_f32 = checkpoint.read(name, torch.float32)
    assert as_f32.dtype == torch.float32 and torch.equal(as_f32, state[name].float())
    assert torch.equal(checkpoint.read(name, "float16"), state[name].to(torch.float16))


def test_every_supported_dtype_round_trips(tmp_path):
    state = {
        "f64": torch.randn(3, dtype=torch.float64),
        "f16": torch.randn(2, 2).half(),
        "i64": torch.arange(5),
        "i32": torch.arange(4, dtype=torch.int32),
        "i8": torch.tensor([-3, 4], dtype=torch.int8),
        "u8": torch.tensor([200, 1], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "f8": torch.randn(4).to(torch.float8_e4m3fn),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
    }
    save_file(state, str(tmp_path / "x.safetensors"))
    checkpoint = open_checkpoint(tmp_path / "x.safetensors")
    for name, tensor in state.items():
        got = checkpoint.read(name)
        assert got.dtype == tensor.dtype and got.shape == tensor.shape
        assert torch.equal(got.reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), name


def test_opening_reads_no_tensor_data(tmp_path, monkeypatch):
    """A 3-shard model whose data regions are sparse holes of 4 GiB each opens without reading any of them."""
    folder = tmp_path / "huge"
    folder.mkdir()
    weight_map = {}
    rows = 1 << 20
    for k in range(3):
        filename = f"model-{k + 1:05d}-of-00003.safetensors"
        header = {}
        offset = 0
        for j in range(4):  # four 1 GiB bf16 tensors per shard
            nbytes = rows * 512 * 2
            name = f"model.layers.{4 * k + j}.mlp.up_proj.weight"
            header[name] = {"dtype": "BF16", "shape": [rows, 512], "data_offsets": [offset, offset + nbytes]}
            weight_map[name] = filename
            offset += nbytes
        raw = json.dumps(header).encode()
        with open(folder / filename, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.truncate(8 + len(raw) + offset)  # sparse: no data blocks on disk
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))

    def no_reads(info, out=None, **rows):
        raise AssertionError(f"tensor data of {info.name} was read while opening")

    monkeypatch.setattr(safetensors_format, "read_bytes", no_reads)
    checkpoint = open_checkpoint(folder)
    assert len(checkpoint) == 12
    assert checkpoint.num_bytes == 12 * rows * 512 * 2
    assert checkpoint.groups()  # grouping needs names only
    assert sum(os.stat(p).st_blocks for p in checkpoint.files) * 512 < 1 << 20  # the files really are holes
    with pytest.raises(AssertionError, match="was read"):
        checkpoint.read("model.layers.0.mlp.up_proj.weight")


def test_config_and_tokenizer_fingerprint(tmp_path):
    a = write_model(tmp_path / "a", llama_state(), llama_config(), tokenizer_vocab=64)
    b = write_model(tmp_path / "b", llama_state(seed=5), llama_config(), tokenizer_vocab=64)
    c = write_model(tmp_path / "c", llama_state(), llama_config())
    write_tokenizer(c, 64, extra="x")
    fa, fb, fc = (open_checkpoint(p).tokenizer_fingerprint for p in (a, b, c))
    assert fa is not None and fa == fb and fa != fc
    assert open_checkpoint(write_model(tmp_path / "d", llama_state())).tokenizer_fingerprint is None
    files = {p.name for p in open_checkpoint(a).model_files()}
    assert files == {"config.json", "tokenizer.json", "tokenizer_config.json"}


def test_fingerprint_changes_when_a_file_changes(tmp_path):
    folder = write_model(tmp_path / "m", llama_state())
    before = open_checkpoint(folder).fingerprint
    assert open_checkpoint(folder).fingerprint == before
    save_file(llama_state(seed=9), str(folder / "model.safetensors"))
    os.utime(folder / "model.safetensors", ns=(1, 1))
    assert open_checkpoint(folder).fingerprint != before


def test_pytorch_bin_is_loaded_weights_only(tmp_path):
    state = llama_state()
    folder = tmp_path / "legacy"
    folder.mkdir()
    torch.save(state, folder / "pytorch_model.bin")
    checkpoint = open_checkpoint(folder)
    assert isinstance(checkpoint, TorchBinCheckpoint)
    assert_same_tensors(checkpoint, state)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_pickle_with_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "evil"
    folder.mkdir()
    torch.save({"w": torch.zeros(2), "x": _Exploit()}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        open_checkpoint(folder)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize(
    "shard, message",
    [
        ("/etc/passwd", "leaves the checkpoint folder"),
        ("../outside.safetensors", "leaves the checkpoint folder"),
        ("model-00003-of-00002.safetensors", "missing"),
    ],
)
def test_index_shards_must_stay_inside_the_folder(tmp_path, shard, message):
    state = llama_state()
    folder = write_sharded(tmp_path / "m", state, shards=2)
    save_file({"model.norm.weight": state["model.norm.weight"]}, str(tmp_path / "outside.safetensors"))
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = shard
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=message):
        open_checkpoint(folder)


def test_index_symlink_leaving_the_folder_is_refused(tmp_path):
    folder = write_sharded(tmp_path / "m", llama_state(), shards=2)
    outside = tmp_path / "elsewhere.safetensors"
    (folder / "model-00002-of-00002.safetensors").rename(outside)
    (folder / "model-00002-of-00002.safetensors").symlink_to(outside)
    with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
        open_checkpoint(folder)


def test_index_naming_a_tensor_its_shard_lacks(tmp_path):
    folder = write_sharded(tmp_path / "m", llama_state(), shards=2)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.ghost.weight"] = "model-00001-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="ghost"):
        open_checkpoint(folder)


def test_missing_and_empty_inputs(tmp_path):
    with pytest.raises(CheckpointError, match="no such folder or file"):
        open_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no weights found"):
        open_checkpoint(tmp_path / "empty")
    (tmp_path / "two").mkdir()
    for n in ("a", "b"):
        save_file({"x": torch.zeros(1)}, str(tmp_path / "two" / f"{n}.safetensors"))
    with pytest.raises(CheckpointError, match="no model.safetensors.index.json"):
        open_checkpoint(tmp_path / "two")


def test_error_messages_are_one_line(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(bad)
    assert "\n" not in str(info.value) and "model.safetensors" in str(info.value)
