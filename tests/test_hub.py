"""Hub ids resolved from a hand-built Hugging Face cache, offline.

The cache is laid out the way ``huggingface_hub`` lays it out: ``models--org--name/refs/<ref>`` holds a
40-hex commit hash, ``snapshots/<hash>/`` holds one symlink per file pointing at ``../../blobs/<sha>``,
and ``blobs/`` holds the bytes (named by sha256 for weights, which the hub stores with LFS, and by the
git blob sha1 for small files). Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from builders import llama_config, llama_state, write_model, write_sharded, write_tokenizer
from mergescope.checkpoints import CheckpointError, SafetensorsCheckpoint, open_checkpoint
from mergescope.checkpoints.hub import files_to_fetch, hub_cache_dir, parse_hub_id, resolve_hub_id

COMMIT_A = "0123456789abcdef0123456789abcdef01234567"
COMMIT_B = "fedcba9876543210fedcba9876543210fedcba98"


# --- a cache built by hand ---------------------------------------------------------------------------
def _blob_name(filename: str, data: bytes) -> str:
    if filename.endswith((".safetensors", ".bin")):
        return hashlib.sha256(data).hexdigest()  # LFS files: the blob is named by its sha256
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # git blob id


def add_snapshot(cache: Path, repo_id: str, staged: Path, commit: str, refs: tuple[str, ...] = ("main",)) -> Path:
    """Move every file of folder ``staged`` into the cache as snapshot ``commit`` of ``repo_id``."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    blobs = repo / "blobs"
    snapshot = repo / "snapshots" / commit
    blobs.mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    for path in sorted(staged.iterdir()):
        data = path.read_bytes()
        blob = _blob_name(path.name, data)
        (blobs / blob).write_bytes(data)
        (snapshot / path.name).symlink_to(f"../../blobs/{blob}")
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    shutil.rmtree(staged)
    return snapshot


@pytest.fixture
def hub_env(tmp_path, monkeypatch):
    """An empty offline hub cache in ``HF_HUB_CACHE``; the working folder holds nothing named org/…"""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)  # "org/name" must not be found as a relative path
    return cache


def assert_reads(checkpoint, expected: dict[str, torch.Tensor]) -> None:
    assert sorted(checkpoint.tensor_names) == sorted(expected)
    for name, tensor in expected.items():
        got = checkpoint.read(name)
        assert got.dtype == tensor.dtype and tuple(got.shape) == tuple(tensor.shape), name
        assert torch.equal(got, tensor), name


def fingerprint_of(tokenizer_json: bytes) -> str:
    """The documented tokenizer fingerprint: sha256 of ``tokenizer.json\\0`` + its bytes, 16 hex digits."""
    return hashlib.sha256(b"tokenizer.json\0" + tokenizer_json).hexdigest()[:16]


# --- (a) single file ------------------------------------------------------------------------------------
def test_single_file_model_opens_from_cache(hub_env, tmp_path):
    config = llama_config()
    state = llama_state(config, seed=3)
    staged = write_model(tmp_path / "stage", state, config, tokenizer_vocab=64)
    tokenizer_bytes = (staged / "tokenizer.json").read_bytes()
    snapshot = add_snapshot(hub_env, "org/name", staged, COMMIT_A)
    assert (snapshot / "model.safetensors").is_symlink()

    checkpoint = open_checkpoint("org/name")
    assert isinstance(checkpoint, SafetensorsCheckpoint)
    assert checkpoint.source == "org/name"
    assert checkpoint.name == "name"
    assert checkpoint.root == snapshot
    assert_reads(checkpoint, state)
    assert checkpoint.num_parameters == sum(t.numel() for t in state.values())
    # config and tokenizer are read through their symlinks too
    assert checkpoint.config.architecture == "LlamaForCausalLM"
    assert checkpoint.config.num_layers == config["num_hidden_layers"]
    assert checkpoint.config.vocab_size == config["vocab_size"]
    assert checkpoint.tokenizer_fingerprint == fingerprint_of(tokenizer_bytes)


def test_resolve_hub_id_returns_the_snapshot_folder(hub_env, tmp_path):
    staged = write_model(tmp_path / "stage", llama_state(), llama_config())
    snapshot = add_snapshot(hub_env, "org/name", staged, COMMIT_A)
    assert resolve_hub_id("org/name") == snapshot
    assert sorted(p.name for p in resolve_hub_id("org/name").iterdir()) == ["config.json", "model.safetensors"]


# --- (b) revisions ------------------------------------------------------------------------------------
def test_revision_by_commit_hash_and_by_ref(hub_env, tmp_path):
    config = llama_config()
    old = llama_state(config, seed=1)
    new = llama_state(config, seed=2)
    add_snapshot(hub_env, "org/name", write_model(tmp_path / "old", old, config), COMMIT_A, refs=("v1",))
    add_snapshot(hub_env, "org/name", write_model(tmp_path / "new", new, config), COMMIT_B, refs=("main",))

    assert_reads(open_checkpoint("org/name"), new)
    assert_reads(open_checkpoint(f"org/name@{COMMIT_B}"), new)
    pinned = open_checkpoint(f"org/name@{COMMIT_A}")
    assert_reads(pinned, old)
    assert pinned.name == "name"
    assert pinned.source == f"org/name@{COMMIT_A}"
    assert_reads(open_checkpoint("org/name@v1"), old)


def test_revision_not_in_cache_is_a_one_line_error(hub_env, tmp_path):
    add_snapshot(hub_env, "org/name", write_model(tmp_path / "s", llama_state(), llama_config()), COMMIT_A)
    missing = "9" * 40
    with pytest.raises(CheckpointError) as caught:
        open_checkpoint(f"org/name@{missing}")
    message = str(caught.value)
    assert f"org/name@{missing}" in message and "HF_HUB_OFFLINE" in message
    assert "\n" not in message


# --- (c) sharded ----------------------------------------------------------------------------------------
def test_sharded_model_with_shards_linked_into_blobs(hub_env, tmp_path):
    config = llama_config(layers=3)
    state = llama_state(config, seed=5)
    staged = write_sharded(tmp_path / "stage", state, 3, config)
    write_tokenizer(staged, 64)
    snapshot = add_snapshot(hub_env, "acme/big-model", staged, COMMIT_A)
    shard_links = sorted(snapshot.glob("model-*-of-*.safetensors"))
    assert len(shard_links) == 3 and all(p.is_symlink() for p in shard_links)
    assert (snapshot / "model.safetensors.index.json").is_symlink()

    checkpoint = open_checkpoint("acme/big-model")
    assert isinstance(checkpoint, SafetensorsCheckpoint)
    assert_reads(checkpoint, state)
    blobs = (hub_env / "models--acme--big-model" / "blobs").resolve()
    assert len(checkpoint.files) == 3
    assert {p.resolve() for p in checkpoint.files} == {p.resolve() for p in shard_links}
    assert all(p.resolve().parent == blobs for p in checkpoint.files)
    assert checkpoint.num_bytes == sum(t.numel() * t.element_size() for t in state.values())
    assert checkpoint.config.num_layers == 3


def test_snapshot_shard_linking_outside_the_repo_is_refused(hub_env, tmp_path):
    """Only the repository's own blobs are allowed; a link elsewhere is still a shard leaving the folder."""
    state = llama_state()
    staged = write_sharded(tmp_path / "stage", state, 2)
    snapshot = add_snapshot(hub_env, "org/name", staged, COMMIT_A)
    elsewhere = tmp_path / "elsewhere.safetensors"
    link = snapshot / "model-00002-of-00002.safetensors"
    shutil.copyfile(link, elsewhere)
    link.unlink()
    link.symlink_to(elsewhere)
    with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
        open_checkpoint("org/name")


# --- (d) not in the cache -------------------------------------------------------------------------------
def test_repo_not_in_cache_names_offline_mode_and_repo(hub_env):
    with pytest.raises(CheckpointError) as caught:
        open_checkpoint("nobody/nothing-here")
    message = str(caught.value)
    assert "HF_HUB_OFFLINE" in message
    assert "nobody/nothing-here" in message
    assert str(hub_env) in message
    assert "\n" not in message and "Traceback" not in message and "File \"" not in message
    assert caught.value.__suppress_context__  # raised `from None`: no chained hub exception is shown


def test_cli_repo_not_in_cache_is_one_line_on_stderr(hub_env):
    env = {**os.environ, "HF_HUB_CACHE": str(hub_env), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mergescope.tui.cli.main", "info", "nobody/nothing-here"],
        capture_output=True, text=True, env=env, timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("mergescope: error: nobody/nothing-here")
    assert "HF_HUB_OFFLINE" in lines[0]
    assert "Traceback" not in result.stderr + result.stdout


def test_cli_info_on_a_cached_hub_id(hub_env, tmp_path):
    config = llama_config(layers=3)
    state = llama_state(config, seed=8)
    staged = write_sharded(tmp_path / "stage", state, 2, config)
    write_tokenizer(staged, 64)
    tokenizer_bytes = (staged / "tokenizer.json").read_bytes()
    add_snapshot(hub_env, "org/name", staged, COMMIT_A)
    env = {**os.environ, "HF_HUB_CACHE": str(hub_env), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mergescope.tui.cli.main", "info", "--json", f"org/name@{COMMIT_A}"],
        capture_output=True, text=True, env=env, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    facts = json.loads(result.stdout)
    assert facts["name"] == "name" and facts["source"] == f"org/name@{COMMIT_A}"
    assert facts["shards"] == 2
    assert facts["layers"] == 3
    assert facts["parameters"] == sum(t.numel() for t in state.values())
    assert facts["tensors"] == len(state)
    assert facts["tokenizer_fingerprint"] == fingerprint_of(tokenizer_bytes)


def test_unreachable_hub_without_offline_is_a_checkpoint_error(hub_env, monkeypatch):
    """huggingface_hub 2.x raises its HTTP library's ConnectError (not an OSError) when there is no network."""
    httpx2 = pytest.importorskip("httpx2")
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE")

    def no_network(self, *args, **kwargs):
        raise httpx2.ConnectError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", no_network)
    with pytest.raises(CheckpointError) as caught:
        open_checkpoint("org/name")
    message = str(caught.value)
    assert message.startswith("org/name: cannot reach the hub")
    assert "Name or service not known" in message and "not in the cache" in message

    def silent(self, *args, **kwargs):
        raise OSError()

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", silent)
    with pytest.raises(CheckpointError, match="cannot reach the hub"):
        open_checkpoint("org/name")


def test_unreachable_hub_falls_back_to_the_cache(hub_env, tmp_path, monkeypatch):
    """No network and HF_HUB_OFFLINE unset: a cached model still opens, as huggingface_hub itself would."""
    import huggingface_hub

    state = llama_state(seed=11)
    add_snapshot(hub_env, "org/name", write_model(tmp_path / "stage", state), COMMIT_A)
    monkeypatch.delenv("HF_HUB_OFFLINE")

    def no_network(self, *args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", no_network)
    assert_reads(open_checkpoint("org/name"), state)


@pytest.mark.parametrize("text", ["org/na--me", "org/name..", "org/-x"])
def test_id_rejected_by_huggingface_hub_validation_is_a_checkpoint_error(hub_env, text):
    """Our pattern is looser than the hub's; what the hub refuses is still a one-line CheckpointError."""
    assert parse_hub_id(text) is not None
    with pytest.raises(CheckpointError) as caught:
        open_checkpoint(text)
    assert str(caught.value).startswith(f"{text}: not a valid hub id")
    assert "\n" not in str(caught.value)


# --- (e) HF_HOME ----------------------------------------------------------------------------------------
def test_hf_home_is_honoured_when_hf_hub_cache_is_unset(hub_env, tmp_path, monkeypatch):
    home = tmp_path / "hf-home"
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(home))
    assert hub_cache_dir() == home / "hub"
    state = llama_state(seed=9)
    add_snapshot(home / "hub", "org/name", write_model(tmp_path / "stage", state, llama_config()), COMMIT_A)
    assert_reads(open_checkpoint("org/name"), state)
    # the same repo id is not found in the (empty) HF_HUB_CACHE once that is set again
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_env))
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE"):
        open_checkpoint("org/name")


def test_hub_cache_dir_precedence(tmp_path, monkeypatch):
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub_cache_dir() == tmp_path / "xdg" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub_cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", str(tmp_path / "legacy"))
    assert hub_cache_dir() == tmp_path / "legacy"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "explicit"))
    assert hub_cache_dir() == tmp_path / "explicit"


# --- (f) parse_hub_id -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, expected",
    [
        ("org/name", ("org/name", None)),
        ("meta-llama/Llama-3.1-8B", ("meta-llama/Llama-3.1-8B", None)),
        ("Qwen/Qwen2.5-0.5B-Instruct", ("Qwen/Qwen2.5-0.5B-Instruct", None)),
        ("user_1/my_model.v2", ("user_1/my_model.v2", None)),
        (f"org/name@{COMMIT_A}", ("org/name", COMMIT_A)),
        ("org/name@main", ("org/name", "main")),
        ("org/name@v1.0", ("org/name", "v1.0")),
        ("org/name@refs/pr/12", ("org/name", "refs/pr/12")),
    ],
)
def test_parse_hub_id_accepts(text, expected):
    assert parse_hub_id(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "./a/b", "../a/b", "/a/b", "~/a/b", "a/b/c", "a", "model.safetensors", "", "org/", "/name",
        "org/name@", "org name/x", "-org/name", ".hidden/name", "C:\\models\\x",
    ],
)
def test_parse_hub_id_rejects_paths_and_junk(text):
    assert parse_hub_id(text) is None


def test_a_path_that_looks_like_a_hub_id_but_is_not_one_is_not_looked_up(hub_env):
    with pytest.raises(CheckpointError, match="not a hub id"):
        open_checkpoint("./org/name")
    with pytest.raises(CheckpointError, match="not a hub id"):
        resolve_hub_id("a/b/c")


def test_existing_local_folder_wins_over_hub_lookup(hub_env, tmp_path):
    """``org/name`` that exists relative to the working folder is a path, not a hub id."""
    state = llama_state(seed=4)
    write_model(Path.cwd() / "org" / "name", state)
    assert_reads(open_checkpoint("org/name"), state)  # the cache is empty: a lookup would fail


# --- (f) files_to_fetch ---------------------------------------------------------------------------------
TOKENIZER = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


def test_files_to_fetch_prefers_safetensors_over_bin():
    repo = [
        ".gitattributes", "README.md", "config.json", "generation_config.json", *TOKENIZER,
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json",
        "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin", "pytorch_model.bin.index.json",
        "tf_model.h5", "flax_model.msgpack",
    ]
    assert sorted(files_to_fetch(repo)) == sorted([
        "config.json", "generation_config.json", *TOKENIZER,
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json",
    ])


def test_files_to_fetch_falls_back_to_bin():
    repo = ["config.json", "vocab.txt", "pytorch_model.bin", "tf_model.h5", "README.md"]
    assert sorted(files_to_fetch(repo)) == ["config.json", "pytorch_model.bin", "vocab.txt"]
    sharded = ["config.json", "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin",
               "pytorch_model.bin.index.json", "training_args.bin"]
    assert sorted(files_to_fetch(sharded)) == sorted(sharded[:4])


def test_files_to_fetch_adapter_repo():
    repo = ["adapter_config.json", "adapter_model.safetensors", "README.md", "tokenizer.json",
            "training_args.bin", "optimizer.pt"]
    assert sorted(files_to_fetch(repo)) == ["adapter_config.json", "adapter_model.safetensors", "tokenizer.json"]
    # an adapter repo is fetched as an adapter even when it also ships merged weights
    with_merged = [*repo, "model.safetensors", "config.json"]
    assert sorted(files_to_fetch(with_merged)) == [
        "adapter_config.json", "adapter_model.safetensors", "config.json", "tokenizer.json",
    ]


def test_files_to_fetch_ignores_subfolders():
    repo = [
        "config.json", "model.safetensors", "tokenizer.json",
        "onnx/model.onnx", "original/consolidated.safetensors", "checkpoint-500/model.safetensors",
        "checkpoint-500/config.json", "sub/adapter_config.json", "sub/tokenizer.json",
    ]
    assert sorted(files_to_fetch(repo)) == ["config.json", "model.safetensors", "tokenizer.json"]


def test_files_to_fetch_keeps_every_config_and_tokenizer_file():
    extras = [
        "config.json", "generation_config.json", "tokenizer.json", "tokenizer.model", "spiece.model",
        "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "special_tokens_map.json",
        "tokenizer_config.json", "chat_template.jinja", "chat_template.json",
    ]
    repo = [*extras, "model.safetensors", "README.md", "LICENSE", "preprocessor_config.json"]
    assert sorted(files_to_fetch(repo)) == sorted([*extras, "model.safetensors"])
    # no weights at all: still the config and tokenizer, nothing else
    assert sorted(files_to_fetch(["config.json", "README.md", "tokenizer.json"])) == ["config.json", "tokenizer.json"]


def test_files_to_fetch_single_safetensors_without_index():
    repo = ["config.json", "model.safetensors", "pytorch_model.bin"]
    assert sorted(files_to_fetch(repo)) == ["config.json", "model.safetensors"]


def test_bin_only_model_in_cache(hub_env, tmp_path):
    """A legacy pytorch_model.bin repo resolves too (weights_only loading)."""
    state = dict(list(llama_state(seed=6).items())[:4])
    staged = tmp_path / "stage"
    staged.mkdir()
    torch.save(state, staged / "pytorch_model.bin")
    add_snapshot(hub_env, "old/bert-ish", staged, COMMIT_A)
    assert_reads(open_checkpoint("old/bert-ish"), state)


def test_single_safetensors_with_another_name(hub_env, tmp_path):
    state = llama_state(seed=7)
    staged = tmp_path / "stage"
    staged.mkdir()
    save_file(state, str(staged / "weights.safetensors"))
    add_snapshot(hub_env, "org/odd", staged, COMMIT_A)
    assert_reads(open_checkpoint("org/odd"), state)
