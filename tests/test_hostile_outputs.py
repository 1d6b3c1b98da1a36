"""Where output goes wrong: duplicate index entries, an output path that cannot be created, a full disk."""

from __future__ import annotations

import errno
import os

import pytest
import torch

from builders import llama_state, write_sharded
from mergescope.checkpoints import CheckpointError, CheckpointWriter, TensorSpec, open_checkpoint, save_checkpoint
from mergescope.tui.cli.main import main


def test_tensor_listed_twice_in_an_index(tmp_path):
    folder = write_sharded(tmp_path / "m", llama_state(), shards=2)
    index = (folder / "model.safetensors.index.json").read_text()
    entry = '"lm_head.weight": "model-00001-of-00002.safetensors", '
    (folder / "model.safetensors.index.json").write_text(index.replace('"weight_map": {', '"weight_map": {' + entry, 1))
    assert index.count('"lm_head.weight"') == 1
    with pytest.raises(CheckpointError, match="'lm_head.weight' appears twice"):
        open_checkpoint(folder)


def test_output_that_cannot_be_created_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(CheckpointError, match="cannot create the output folder"):
        save_checkpoint(blocker / "out", {"x": torch.ones(2)})
    plan = tmp_path / "plan.yml"
    source = tmp_path / "src"
    save_checkpoint(source, {"x": torch.ones(2)})
    plan.write_text(f"merge_method: linear\nmodels:\n  - model: {source}\n    parameters: {{weight: 1.0}}\n")
    assert main(["merge", str(plan), "-o", str(blocker / "out"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot create the output folder" in err


def test_disk_full_while_writing_leaves_nothing(tmp_path, monkeypatch):
    real_pwrite = os.pwrite
    calls = []

    def full_disk(fd, data, offset):
        calls.append(offset)
        if len(calls) > 3:  # the headers and a tensor fit, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", full_disk)
    tensors = {f"t{i}": torch.full((1000,), float(i)) for i in range(6)}
    with pytest.raises(CheckpointError, match="No space left on device"):
        save_checkpoint(tmp_path / "out", tensors)
    assert list(tmp_path.iterdir()) == []


def test_an_output_path_that_is_a_symlink_is_refused_and_its_target_untouched(tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep.txt").write_text("precious")
    link = tmp_path / "out"
    link.symlink_to(target)
    with pytest.raises(CheckpointError, match=f"^{link}: is a symbolic link to {target}"):
        save_checkpoint(link, {"x": torch.ones(2)}, overwrite=True)
    assert (target / "keep.txt").read_text() == "precious" and link.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "out"]


def test_a_second_writer_of_one_output_is_refused_while_the_first_writes(tmp_path):
    out = tmp_path / "out"
    specs = [TensorSpec("x", "F32", (2,))]
    with CheckpointWriter(out, specs) as first:
        with pytest.raises(CheckpointError, match=f"another mergescope process \\(pid {os.getpid()}\\)"):
            CheckpointWriter(out, specs, overwrite=True)
        first.write("x", torch.ones(2))
        first.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the lock is gone with the writer
    save_checkpoint(out, {"x": torch.zeros(2)}, overwrite=True)  # and the next writer is free to go
