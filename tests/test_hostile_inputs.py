"""The threat model's rows (README, "What mergescope trusts"): what comes from a model folder, a hub repository, a
plan or a demo workspace is data — read, validated, stored — and never runs code or writes outside the output."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from builders import llama_config, llama_state, write_lora, write_model
from mergescope.checkpoints import CheckpointError, MergescopeError, open_checkpoint
from mergescope.checkpoints.hub import files_to_fetch
from mergescope.merge.plan import PlanError, parse_plan
from mergescope.tui.cli.main import main


@pytest.fixture
def pair(tmp_path):
    config = llama_config()
    base = llama_state(config, seed=0)
    ft = {k: v + 0.01 for k, v in base.items()}
    return (write_model(tmp_path / "base", base, config, tokenizer_vocab=64),
            write_model(tmp_path / "ft", ft, config, tokenizer_vocab=64))


def merge(tmp_path, plan: dict, out: str = "out") -> int:
    (tmp_path / "plan.yml").write_text(yaml.safe_dump(plan, sort_keys=False))
    return main(["merge", str(tmp_path / "plan.yml"), "-o", str(tmp_path / out), "--device", "cpu"])


def linear(*models) -> dict:
    return {"merge_method": "linear", "models": [{"model": str(m), "parameters": {"weight": 0.5}} for m in models]}


def test_hub_repositories_give_only_weights_config_and_tokenizer_never_code():
    repo = ["config.json", "configuration_evil.py", "modeling_evil.py", "tokenization_evil.py", "handler.py",
            "model.safetensors", "tokenizer.json", "tokenizer_config.json", "setup.sh", "requirements.txt",
            "custom_generate/generate.py", ".gitattributes", "README.md", "evil.so", "pytorch_model.bin"]
    fetched = files_to_fetch(repo)
    assert fetched == ["config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"]


@pytest.mark.parametrize("where", ["trust_remote_code: true\n", "mergescope: {trust_remote_code: true}\n"])
def test_trust_remote_code_is_unsupported_and_says_so(where):
    with pytest.raises(PlanError) as error:
        parse_plan(f"merge_method: linear\nmodels: [a, b]\nparameters: {{weight: 1}}\n{where}", "p.yml")
    assert str(error.value) == (
        "p.yml:4: trust_remote_code is not supported: mergescope reads weights, config and tokenizer files as data "
        "and never fetches or runs a model's own code; remove it"
    )


def test_a_chat_template_is_stored_never_rendered(tmp_path, pair):
    marker = tmp_path / "pwned"
    template = ("{{ cycler.__init__.__globals__.os.system('touch " + str(marker) + "') }}"
                "{% for m in messages %}{% endfor %}")
    assert merge(tmp_path, {**linear(*pair), "chat_template": template}) == 0
    config = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert config["chat_template"] == template and not marker.exists()  # stored as text where transformers reads it


def test_tokenizer_files_are_copied_byte_for_byte_never_parsed(tmp_path, pair):
    base, ft = pair
    odd = b"\x00\xff not json {{ '{{' }} \n" * 10
    (base / "tokenizer.json").write_bytes(odd)
    (base / "special_tokens_map.json").write_bytes(b"{" * 100_000)
    assert merge(tmp_path, linear(base, ft)) == 0
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == odd
    assert (tmp_path / "out" / "special_tokens_map.json").read_bytes() == b"{" * 100_000


def test_a_model_file_that_links_out_of_its_folder_is_never_copied(tmp_path, pair):
    base, ft = pair
    secret = tmp_path / "id_rsa"
    secret.write_text("PRIVATE KEY")
    (base / "tokenizer.json").unlink()
    (base / "tokenizer.json").symlink_to(secret)
    (base / "generation_config.json").symlink_to(secret)
    inside = base / "real_tokenizer_config.json"
    (base / "tokenizer_config.json").rename(inside)
    (base / "tokenizer_config.json").symlink_to(inside.name)  # a link that stays inside is fine
    assert merge(tmp_path, linear(base, ft)) == 0
    written = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    assert b"PRIVATE KEY" not in b"".join(written.values())
    assert "tokenizer.json" not in written and "generation_config.json" not in written
    assert written["tokenizer_config.json"] == inside.read_bytes()


def test_model_names_and_plan_text_cannot_break_out_of_the_model_card(tmp_path, pair):
    base, ft = pair
    odd = tmp_path / "ft ```\n---\nlicense: evil\n`x`"
    os.rename(ft, odd)
    # a valid Jinja template (the plan loader checks that) that tries to close the card's code fence
    plan = {**linear(base, odd), "chat_template": "```\n# Injected heading\n{{ messages }}\n```"}
    assert merge(tmp_path, plan) == 0
    card = (tmp_path / "out" / "README.md").read_text()
    lines = card.split("\n")
    end = lines.index("---", 1)  # the front matter ends at the first line that is exactly ---
    front, body = "\n".join(lines[1:end]), "\n".join(lines[end + 1:])
    assert lines[0] == "---"
    assert yaml.safe_load(front)["base_model"] == [str(base), str(odd)] and "license" not in yaml.safe_load(front)
    fence = "````"  # longer than the ``` inside the plan
    assert body.count(fence + "yaml\n") == 1
    fenced = body.split(fence + "yaml\n", 1)[1].rsplit("\n" + fence, 1)[0]
    assert yaml.safe_load(fenced) == yaml.safe_load((tmp_path / "out" / "mergekit_config.yml").read_text())
    assert not any(line.startswith("# Injected") for line in body.split(fence)[0].splitlines())


def test_paths_in_a_plan_are_only_read_and_a_missing_one_is_one_line(tmp_path, pair, capsys):
    base, _ = pair
    assert merge(tmp_path, linear(base, "../../../../../../nope/model")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot open ../../../../../../nope/model" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "ft", "plan.yml"]


def test_a_peft_config_naming_an_unreadable_base_is_one_line(tmp_path, pair):
    base, _ = pair
    write_lora(tmp_path / "adapter", llama_state(llama_config(), seed=0), ["model.layers.0.self_attn.q_proj"],
               base_ref="/../../nope/base")
    with pytest.raises(CheckpointError) as error:
        open_checkpoint(str(tmp_path / "adapter"))
    assert "cannot open the adapter's base '/../../nope/base'" in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("text, message", [
    ('{"a":' * 100_000 + "1" + "}" * 100_000, "config.json is not valid JSON (maximum recursion depth"),
    ("{}" + " " * 2000, "config.json is larger than 1000 bytes; not a config.json"),
], ids=["nested", "oversized"])
def test_a_hostile_config_json_is_one_line(tmp_path, pair, monkeypatch, text, message):
    import mergescope.checkpoints.model_files as files

    if "larger" in message:
        monkeypatch.setattr(files, "MAX_JSON_BYTES", 1000)  # a 100 MB file in the test would only cost time
    base, _ = pair
    (base / "config.json").write_text(text)
    with pytest.raises(MergescopeError) as error:
        open_checkpoint(str(base)).config  # noqa: B018 - the property reads the file
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("text, message", [
    ("merge_method: linear\nmodels: " + "[" * 20_000 + "]" * 20_000 + "\n", "p.yml: nested too deeply to be a plan"),
    ("a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{n}: &{n} [{', '.join(['*' + p] * 10)}]\n" for p, n in zip("abcdefg", "bcdefgh")
    ) + "merge_method: linear\nmodels: [a, b]\n", "p.yml: expands to more than 100000 values"),
], ids=["nested", "billion-laughs"])
def test_a_hostile_plan_is_one_line_in_bounded_memory(text, message):
    import tracemalloc

    tracemalloc.start()
    try:
        with pytest.raises(MergescopeError) as error:
            parse_plan(text, "p.yml")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(error.value).startswith(message) and "\n" not in str(error.value)
    assert peak < 100_000_000


def test_a_demo_manifest_naming_paths_outside_its_workspace_is_not_a_workspace(tmp_path):
    """A copied workspace gets its paths rewritten; one whose manifest points outside must not write there."""
    from mergescope.demo.kernels import PORTABLE
    from mergescope.demo.manifest import MANIFEST, SCHEMA
    from mergescope.demo.recipe import DEFAULT_RECIPE
    from mergescope.demo.workspace import BUILDER_VERSION, build_workspace

    victim = tmp_path / "victim"
    victim.mkdir()
    workspace = tmp_path / "downloaded"
    workspace.mkdir()
    manifest = {"schema": SCHEMA, "builder_version": BUILDER_VERSION, "root": "/somewhere/else", "base": "base",
                "fine_tunes": [{"task": t, "path": f"ft_{t}"} for t in ("add", "reverse", "sort")],
                "lora": [{"path": "../victim"}], "recipe": DEFAULT_RECIPE.to_json(), "kernels": PORTABLE}
    (workspace / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(MergescopeError, match="is not a mergescope demo workspace"):
        build_workspace(workspace)
    assert list(victim.iterdir()) == []
