"""The ``mergescope`` command line: cheap start-up, ``info`` against numbers computed here, one-line errors."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import torch

from builders import llama_config, llama_state, write_lora, write_model, write_sharded
from mergescope.tui.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
HEAVY = {"torch", "textual", "numpy", "rich"}
SAFETENSORS_DTYPE = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
ENV = {
    **os.environ,
    "COLUMNS": "400",  # rich wraps tables to the terminal width; keep every row on one line
    "PYTHONIOENCODING": "utf-8",
    "NO_COLOR": "1",
    "HF_HUB_OFFLINE": "1",  # nothing here may reach the network
}


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mergescope.tui.cli.main", *args],
        capture_output=True, text=True, env=ENV, cwd=cwd, timeout=120,
    )


def project_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


# --- expected facts, computed from the state dict -------------------------------------------------------
def tensor_group(name: str) -> str:
    """Up to the first integer component, else the module path (the documented grouping rule)."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1])


def llama_groups(layers: int) -> list[str]:
    return ["model.embed_tokens", *(f"model.layers.{i}" for i in range(layers)), "model.norm", "lm_head"]


def dtype_counts(state: dict[str, torch.Tensor]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for tensor in state.values():
        key = SAFETENSORS_DTYPE[tensor.dtype]
        counts[key] = counts.get(key, 0) + tensor.numel()
    return counts


def fingerprint_of(folder: Path) -> str:
    return hashlib.sha256(b"tokenizer.json\0" + (folder / "tokenizer.json").read_bytes()).hexdigest()[:16]


def table_rows(stdout: str) -> dict[str, str]:
    """``Label    value`` rows of the info table."""
    rows = {}
    for line in stdout.splitlines():
        parts = re.split(r"\s{2,}", line.strip(), maxsplit=1)
        if len(parts) == 2:
            rows[parts[0]] = parts[1]
    return rows


def mixed_llama(layers: int = 3, vocab: int = 96) -> tuple[dict, dict[str, torch.Tensor]]:
    """A Llama whose tensors are F32, BF16 and F16, so dtype shares are not all-or-nothing."""
    config = llama_config(vocab=vocab, layers=layers)
    state = llama_state(config, seed=11)
    for name in state:
        if name.startswith("model.layers.0."):
            state[name] = state[name].to(torch.bfloat16)
        elif name.endswith("layernorm.weight"):
            state[name] = state[name].to(torch.float16)
    return config, state


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """One tiny Llama (with config and tokenizer), a sharded copy and a LoRA adapter on it."""
    root = tmp_path_factory.mktemp("cli-models")
    config, state = mixed_llama()
    base = write_model(root / "llama", state, config, tokenizer_vocab=config["vocab_size"])
    sharded = write_sharded(root / "sharded", state, 4, config)
    modules = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj", "model.layers.2.mlp.down_proj"]
    replaced = {"lm_head.weight": torch.zeros_like(state["lm_head.weight"])}
    adapter = root / "adapter"
    write_lora(adapter, state, modules, r=8, alpha=16.0, base_ref=str(base), replaced=replaced)
    return {"config": config, "state": state, "base": base, "sharded": sharded, "adapter": adapter,
            "modules": modules, "replaced": replaced}


# --- (a) start-up imports only the standard library -----------------------------------------------------
PROBE = """
import json, sys
before = set(sys.modules)
from mergescope.tui.cli.main import main
code = "returned"
try:
    main({args!r})
except SystemExit as exc:
    code = exc.code
loaded = sorted(set(sys.modules) - before)
print("@@" + json.dumps({{"code": code, "loaded": loaded}}))
"""


def probe(args: list[str]) -> tuple[str, dict]:
    result = subprocess.run(
        [sys.executable, "-c", PROBE.format(args=args)], capture_output=True, text=True, env=ENV, timeout=60
    )
    assert result.returncode == 0, result.stderr
    out, _, report = result.stdout.rpartition("@@")
    return out, json.loads(report)


def non_stdlib(modules: list[str]) -> set[str]:
    return {m.split(".")[0] for m in modules} - set(sys.stdlib_module_names) - {"mergescope"}


def test_help_imports_no_heavy_library():
    out, report = probe(["--help"])
    assert report["code"] == 0
    assert not HEAVY & {m.split(".")[0] for m in report["loaded"]}
    assert non_stdlib(report["loaded"]) == set()
    assert out.startswith("usage: mergescope")
    for command in ("info", "analyze", "merge", "inspect", "demo"):
        assert command in out


def test_version_imports_no_heavy_library_and_prints_the_version():
    out, report = probe(["--version"])
    assert report["code"] == 0
    assert not HEAVY & {m.split(".")[0] for m in report["loaded"]}
    assert non_stdlib(report["loaded"]) == set()
    assert out.strip() == f"mergescope {project_version()}"


def test_installed_script_prints_the_version():
    script = Path(sys.executable).with_name("mergescope")
    if not script.exists():
        pytest.skip("no mergescope console script beside this interpreter")
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True, env=ENV, timeout=60)
    assert result.returncode == 0
    assert result.stdout.strip() == f"mergescope {project_version()}"


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert capsys.readouterr().out.startswith("usage: mergescope")


# --- (b) info ------------------------------------------------------------------------------------------
def test_info_table_shows_independently_computed_facts(models):
    config, state, base = models["config"], models["state"], models["base"]
    result = run_cli("info", str(base))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    rows = table_rows(result.stdout)
    parameters = sum(t.numel() for t in state.values())
    assert rows["Architecture"].split()[0] == "LlamaForCausalLM"
    assert rows["Layers"] == str(config["num_hidden_layers"])
    assert rows["Vocab"] == str(config["vocab_size"])
    assert rows["Hidden size"] == str(config["hidden_size"])
    assert f"({parameters:,})" in rows["Parameters"]
    assert rows["Tensors"] == str(len(state))
    assert rows["Shards"] == "1"
    assert rows["Tokenizer"] == fingerprint_of(base)
    total = sum(dtype_counts(state).values())
    for dtype, count in dtype_counts(state).items():
        assert f"{dtype} {100 * count / total:.1f}%" in rows["Dtypes"]


def test_info_json_matches_the_state_dict(models):
    config, state, base = models["config"], models["state"], models["base"]
    result = run_cli("info", "--json", str(base))
    assert result.returncode == 0, result.stderr
    facts = json.loads(result.stdout)
    assert facts["architecture"] == "LlamaForCausalLM"
    assert facts["model_type"] == "llama"
    assert facts["format"] == "safetensors"
    assert facts["name"] == "llama"
    assert facts["layers"] == config["num_hidden_layers"]
    assert facts["vocab_size"] == config["vocab_size"]
    assert facts["hidden_size"] == config["hidden_size"]
    assert facts["parameters"] == sum(t.numel() for t in state.values())
    assert facts["bytes"] == sum(t.numel() * t.element_size() for t in state.values())
    assert facts["bytes"] < (base / "model.safetensors").stat().st_size  # the file adds its header
    assert facts["tensors"] == len(state)
    assert facts["shards"] == 1
    assert facts["dtypes"] == dtype_counts(state)
    assert set(facts["dtypes"]) == {"F32", "BF16", "F16"}
    assert facts["groups"] == llama_groups(config["num_hidden_layers"])
    assert facts["tokenizer_fingerprint"] == fingerprint_of(base)


def test_info_json_sharded_model(models):
    state, sharded = models["state"], models["sharded"]
    result = run_cli("info", "--json", str(sharded))
    assert result.returncode == 0, result.stderr
    facts = json.loads(result.stdout)
    assert facts["shards"] == 4 == len(list(sharded.glob("model-*-of-*.safetensors")))
    assert facts["parameters"] == sum(t.numel() for t in state.values())
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert facts["bytes"] == index["metadata"]["total_size"]
    assert facts["tensors"] == len(state)
    assert facts["dtypes"] == dtype_counts(state)
    assert facts["tokenizer_fingerprint"] is None  # write_sharded writes no tokenizer
    # the index file itself names the same checkpoint
    by_index = json.loads(run_cli("info", "--json", str(sharded / "model.safetensors.index.json")).stdout)
    assert by_index["shards"] == 4 and by_index["parameters"] == facts["parameters"]


@pytest.mark.parametrize("form", ["folder", "model+lora", "--base"])
def test_info_lora_adapter(models, form):
    state, base, adapter = models["state"], models["base"], models["adapter"]
    args = {
        "folder": [str(adapter)],
        "model+lora": [f"{base}+{adapter}"],
        "--base": [str(adapter), "--base", str(base)],
    }[form]
    result = run_cli("info", "--json", *args)
    assert result.returncode == 0, result.stderr
    facts = json.loads(result.stdout)
    assert facts["format"] == "lora"
    assert facts["adapter"]["base"] == str(base)
    assert facts["adapter"]["targets"] == len(models["modules"])
    assert facts["adapter"]["ranks"] == [8]
    assert facts["adapter"]["replaced"] == sorted(models["replaced"])
    # base + adapter has the base's tensors (the replaced lm_head has the same shape)
    assert facts["parameters"] == sum(t.numel() for t in state.values())
    assert facts["tensors"] == len(state)
    assert facts["layers"] == models["config"]["num_hidden_layers"]  # the base's config
    assert facts["tokenizer_fingerprint"] == fingerprint_of(base)  # the adapter has none of its own


def test_info_lora_adapter_table(models):
    result = run_cli("info", str(models["adapter"]))
    assert result.returncode == 0, result.stderr
    rows = table_rows(result.stdout)
    assert rows["Format"] == "lora"
    assert rows["Base"] == str(models["base"])
    assert "r=8" in rows["Adapter"]
    assert f"{len(models['modules'])} weights" in rows["Adapter"]
    assert f"{len(models['replaced'])} replaced" in rows["Adapter"]


def test_info_tensors_lists_every_tensor(models):
    state = models["state"]
    result = run_cli("info", "--tensors", str(models["base"]))
    assert result.returncode == 0, result.stderr
    listed = {}
    for line in result.stdout.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if len(cells) == 4 and cells[0] and cells[0] != "group":
            group, rest, dtype, shape = cells
            listed[f"{group}.{rest}"] = (group, dtype, shape)
    assert set(listed) == set(state)
    for name, tensor in state.items():
        group, dtype, shape = listed[name]
        assert group == tensor_group(name)
        assert dtype == SAFETENSORS_DTYPE[tensor.dtype]
        assert shape == "×".join(map(str, tensor.shape))


def test_info_json_tensors_lists_every_tensor(models):
    state = models["state"]
    result = run_cli("info", "--json", "--tensors", str(models["sharded"]))
    assert result.returncode == 0, result.stderr
    listed = json.loads(result.stdout)["tensor_list"]
    assert len(listed) == len(state)
    assert {t["name"] for t in listed} == set(state)
    for entry in listed:
        tensor = state[entry["name"]]
        assert entry["shape"] == list(tensor.shape)
        assert entry["dtype"] == SAFETENSORS_DTYPE[tensor.dtype]
        assert entry["group"] == tensor_group(entry["name"])


# --- (c) bad input: one line on stderr, status 2 --------------------------------------------------------
GARBAGE = b"this is not a safetensors file, just some bytes\n" * 8


def _missing(tmp: Path) -> tuple[Path, Path]:
    return tmp / "does-not-exist", tmp / "does-not-exist"


def _empty(tmp: Path) -> tuple[Path, Path]:
    (tmp / "empty").mkdir()
    return tmp / "empty", tmp / "empty"


def _garbage_folder(tmp: Path) -> tuple[Path, Path]:
    (tmp / "garbage").mkdir()
    (tmp / "garbage" / "model.safetensors").write_bytes(GARBAGE)
    return tmp / "garbage", tmp / "garbage" / "model.safetensors"


def _garbage_file(tmp: Path) -> tuple[Path, Path]:
    (tmp / "model.safetensors").write_bytes(GARBAGE)
    return tmp / "model.safetensors", tmp / "model.safetensors"


def _empty_file(tmp: Path) -> tuple[Path, Path]:
    (tmp / "model.safetensors").write_bytes(b"")
    return tmp / "model.safetensors", tmp / "model.safetensors"


@pytest.mark.parametrize("make", [_missing, _empty, _garbage_folder, _garbage_file, _empty_file],
                         ids=["missing", "empty-folder", "garbage-in-folder", "garbage-file", "empty-file"])
def test_bad_input_is_one_line_and_status_2(tmp_path, make):
    argument, named = make(tmp_path)
    result = run_cli("info", str(argument))
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("mergescope: error:")
    assert str(named) in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stdout == ""


def test_bad_input_in_process_returns_2(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nope")]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith("mergescope: error:")


def test_a_typo_in_a_local_path_fails_at_once_with_close_names(tmp_path, monkeypatch, capsys):
    """``ws/ft_ad`` where ``ws`` is a local folder is a typo, not a hub id: no download is tried, and the error
    names the close folders."""
    import mergescope.checkpoints.resolve as resolve

    def no_hub(text):
        raise AssertionError(f"tried the hub for {text}")

    monkeypatch.setattr(resolve, "resolve_hub_id", no_hub)
    for name in ("ft_add", "ft_sort", "base"):
        (tmp_path / "ws" / name).mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert main(["info", "ws/ft_ad"]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("mergescope: error: ws/ft_ad: no such folder")
    assert line.endswith("did you mean ws/ft_add?")
    # a string that cannot be a hub id: the same, at once
    assert main(["info", "./ws/ft_sortt"]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert "no such folder" in line and line.endswith("did you mean ws/ft_sort?")


# --- (d) commands not built yet still document themselves -----------------------------------------------
@pytest.mark.parametrize("command", ["analyze", "merge", "inspect", "demo", "info"])
def test_command_help_exits_0(command, capsys):
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: mergescope {command}")
    assert len(out.splitlines()) > 3


def test_demo_build_progress_has_an_estimate_off_a_terminal(capsys):
    """Piped stderr: a line at every tenth of the steps, the time left at the pace so far (1 s a step here, so
    the estimate is the steps left)."""
    from rich.console import Console

    from mergescope.tui.cli.demo import _BuildProgress

    now = [0.0]
    with _BuildProgress(Console(stderr=True, force_terminal=False), clock=lambda: now[0]) as progress:
        for step in range(0, 201):
            now[0] = float(step)
            progress("training", step, 200)
    lines = capsys.readouterr().err.splitlines()[1:]
    assert len(lines) == 10
    assert lines[3] == "mergescope demo: 40% (80/200 steps, training) · about 2:00 left"
    assert lines[-1].endswith("100% (200/200 steps, training) · about 0:00 left")
