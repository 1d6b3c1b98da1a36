"""Row-block streaming: a row range of a tensor read with one positioned read and written with one, and every
merge method run block by block on tensors forced into many blocks (the smallest memory budget) gives the
bits of the same plan merged whole (a budget that holds every tensor at once)."""

from __future__ import annotations

import json
import os
import string
from dataclasses import replace

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from builders import llama_config
from mergekit_cases import ALL_CASES
from mergekit_reference import write_fixture
from mergescope.analysis.preview import run_preview
from mergescope.analysis.stream import TensorResult, _Layout, plan_units, stream_analysis
from mergescope.checkpoints import CheckpointWriter, MergescopeError, TensorSpec, open_checkpoint, safetensors_format
from mergescope.checkpoints.row_blocks import ALIGN_ENTRIES, block_entries, parse_size, row_ranges, rows_per_block
from mergescope.merge.executor import plan_blocks, run_merge
from mergescope.merge.job import build_job
from mergescope.merge.plan import load_plan

WIDE = llama_config(vocab=4096, hidden=128, layers=4, intermediate=96, heads=4, kv_heads=2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.int32, torch.uint8])
def test_read_rows_is_one_positioned_read_of_the_rows(tmp_path, dtype, monkeypatch):
    values = torch.arange(7 * 5 * 3).reshape(7, 5, 3)
    tensors = {"pad": torch.arange(3, dtype=torch.float64), "x": values.to(dtype)}
    save_file(tensors, str(tmp_path / "m.safetensors"))
    checkpoint = open_checkpoint(str(tmp_path / "m.safetensors"))
    calls = []
    real = os.preadv

    def counting(fd, buffers, offset):
        calls.append((offset, sum(len(b) for b in buffers)))
        return real(fd, buffers, offset)

    monkeypatch.setattr(safetensors_format.os, "preadv", counting)
    for start, stop in [(0, 7), (2, 5), (6, 7), (3, 3)]:
        calls.clear()
        rows = checkpoint.read_rows("x", start, stop)
        assert torch.equal(rows, values[start:stop].to(dtype))
        itemsize = torch.empty(0, dtype=dtype).element_size()
        assert calls == ([] if start == stop else [(checkpoint.spec("x").offset + start * 15 * itemsize,
                                                    (stop - start) * 15 * itemsize)])
    with pytest.raises(MergescopeError, match="has no rows 5:8"):
        checkpoint.read_rows("x", 5, 8)


def test_writer_writes_row_ranges_in_any_order_once_each(tmp_path):
    x = torch.randn(10, 4)
    y = torch.randn(3)
    specs = [TensorSpec("x", "BF16", (10, 4)), TensorSpec("y", "F32", (3,))]
    with CheckpointWriter(tmp_path / "out", specs) as writer:
        writer.write("y", y)
        for start, stop in [(6, 10), (0, 3), (3, 6)]:
            writer.write_rows("x", start, x[start:stop])
        with pytest.raises(MergescopeError, match="written twice"):
            writer.write_rows("x", 2, x[2:4])
        out = writer.commit()
    loaded = load_file(out / "model.safetensors")
    assert torch.equal(loaded["x"], x.to(torch.bfloat16)) and torch.equal(loaded["y"], y)
    with CheckpointWriter(tmp_path / "part", specs) as writer:
        writer.write("y", y)
        writer.write_rows("x", 0, x[:9])
        with pytest.raises(MergescopeError, match="never written"):
            writer.commit()


def test_block_sizes_follow_the_budget():
    assert parse_size("1.5GB", "memory_budget") == 1_500_000_000 and parse_size("2GiB", "m") == 2 << 30
    with pytest.raises(MergescopeError, match="memory_budget 'lots'"):
        parse_size("lots", "memory_budget")
    assert block_entries(1, 100, 8) == ALIGN_ENTRIES and block_entries(10**12, 100, 8) == (32 << 20) // 8
    per_block = rows_per_block((4096, 96), 10_000)  # 96 entries a row: whole chunks every 128 rows
    assert per_block == 128 and per_block * 96 % ALIGN_ENTRIES == 0
    assert rows_per_block((4096, 96), 10**9) == 4096 and rows_per_block((), 1) == 1
    assert row_ranges(300, 128) == [(0, 128), (128, 256), (256, 300)]


@pytest.fixture(scope="module")
def wide_paths(tmp_path_factory) -> dict[str, str]:
    """The compatibility suite's fixture (base, three fine-tunes; float32 and bf16) with a 4096-token
    vocabulary: embeddings and head of 512K entries, above TIES' exact-selection size."""
    root = tmp_path_factory.mktemp("wide")
    paths = {name: str(p) for name, p in write_fixture(root / "f32", torch.float32, WIDE).items()}
    paths.update({f"b{name}": str(p) for name, p in write_fixture(root / "bf16", torch.bfloat16, WIDE).items()})
    return paths


def _merge(config: dict, out, budget) -> dict[str, torch.Tensor]:
    plan_path = out.with_suffix(".yml")
    plan_path.write_text(yaml.safe_dump(config, sort_keys=False))
    folder = run_merge(build_job(load_plan(str(plan_path))), out, device="cpu", memory_budget=budget)
    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


CASES = [case for case in ALL_CASES.values() if case.mergescope]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_every_method_merged_in_row_blocks_has_the_bits_of_the_whole_merge(tmp_path, wide_paths, case):
    config = yaml.safe_load(string.Template(case.config).substitute(wide_paths))
    config.pop("mergescope", None)
    job = build_job(load_plan(str(_write(tmp_path / "plan.yml", config))))
    units = plan_blocks(job, ALIGN_ENTRIES)
    streamed = job.method.elementwise or job.method.two_phase
    embed = [u for u in units if u.task.output == "model.embed_tokens.weight"]
    assert len(embed) == (128 if streamed and embed and embed[0].task.reads else len(embed))
    whole = _merge(config, tmp_path / "whole", 10**12)
    blocks = _merge(config, tmp_path / "blocks", 1)
    assert whole.keys() == blocks.keys()
    for name in whole:
        assert whole[name].dtype == blocks[name].dtype
        assert torch.equal(whole[name].view(torch.uint8), blocks[name].view(torch.uint8)), name


def _write(path, config):
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _analysis(base, models, budget) -> dict:
    events = stream_analysis(base, models, [m.name for m in models], device="cpu", patterns=True,
                             memory_budget=budget)
    return {e.name: e for e in events if isinstance(e, TensorResult)}


def test_the_analysis_in_row_blocks_sums_to_the_whole_tensor_statistics(tmp_path, wide_paths):
    """Counts (sign patterns, nonzeros) are exact; the float64 Gram sums differ only in their order."""
    grown = load_file(f"{wide_paths['bft_a']}/model.safetensors")
    extra = torch.ones(64, grown["lm_head.weight"].shape[1], dtype=torch.bfloat16)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        grown[name] = torch.cat([grown[name], extra])
    (tmp_path / "grown").mkdir()
    save_file(grown, str(tmp_path / "grown" / "model.safetensors"), metadata={"format": "pt"})
    config = {**WIDE, "vocab_size": WIDE["vocab_size"] + 64, "torch_dtype": "bfloat16"}
    (tmp_path / "grown" / "config.json").write_text(json.dumps(config))
    base = open_checkpoint(wide_paths["bbase"])
    models = [open_checkpoint(wide_paths[n]) for n in ("bft_b", "bft_c")] + [open_checkpoint(str(tmp_path / "grown"))]
    whole, blocks = _analysis(base, models, 10**12), _analysis(base, models, 1)
    assert whole.keys() == blocks.keys() and whole["lm_head.weight"].compared_rows == WIDE["vocab_size"]
    for name, expected in whole.items():
        got = blocks[name]
        assert (got.present, got.compared_rows, got.sums.numel) == (expected.present, expected.compared_rows,
                                                                    expected.sums.numel)
        np.testing.assert_allclose(got.sums.gram, expected.sums.gram, rtol=1e-12, atol=1e-300)
        np.testing.assert_array_equal(got.sums.max_abs, expected.sums.max_abs)
        np.testing.assert_array_equal(got.sums.signs.histogram, expected.sums.signs.histogram)
        np.testing.assert_array_equal(got.sums.signs.sign_dot, expected.sums.signs.sign_dot)
        np.testing.assert_allclose(got.sums.signs.pattern_mass, expected.sums.signs.pattern_mass, rtol=1e-12)
    rows = WIDE["vocab_size"] * WIDE["hidden_size"] // ALIGN_ENTRIES  # blocks of one aligned unit
    units = plan_units(base, ["lm_head.weight"], {"lm_head.weight": _Layout([True], WIDE["vocab_size"], None, [])},
                       ALIGN_ENTRIES)
    assert len(units) == rows and units[-1].last and not units[0].last


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "linear", "dare_linear", "breadcrumbs_ties"])
def test_many_models_and_odd_widths_merge_in_blocks_with_the_bits_of_the_whole_merge(tmp_path, method):
    """Eight fine-tunes (sums over models in torch's reductions take other paths from five on) and rows of 37
    and 4099 entries (no block ends on a vector boundary but the tensor's own)."""
    g = torch.Generator().manual_seed(5)
    shapes = {"model.embed_tokens.weight": (7919, 37), "lm_head.weight": (67, 4099), "model.norm.weight": (37,)}
    base = {name: torch.randn(shape, generator=g).to(torch.bfloat16) for name, shape in shapes.items()}
    for k in range(9):
        tensors = base if k == 0 else {n: (t.float() + 0.02 * torch.randn(t.shape, generator=g)).to(torch.bfloat16)
                                       for n, t in base.items()}
        (tmp_path / f"m{k}").mkdir()
        save_file(tensors, str(tmp_path / f"m{k}" / "model.safetensors"))
    models = [{"model": str(tmp_path / f"m{k}"), "parameters": {"weight": 0.3 + 0.1 * k, "density": 0.4}}
              for k in range(1, 9)]
    config = {"merge_method": method, "models": models, "dtype": "float32", "out_dtype": "bfloat16"}
    if method == "linear":
        for model in models:
            del model["parameters"]["density"]
    else:
        config["base_model"] = str(tmp_path / "m0")
    whole = _merge(config, tmp_path / "whole", 10**12)
    blocks = _merge(config, tmp_path / "blocks", 1)
    for name in whole:
        assert torch.equal(whole[name].view(torch.uint8), blocks[name].view(torch.uint8)), name


@pytest.mark.parametrize("method", ["ties", "task_arithmetic", "dare_ties"])
def test_the_exact_preview_in_row_blocks_sums_to_the_whole_tensor_preview(tmp_path, wide_paths, method):
    models = [{"model": wide_paths[n], "parameters": {"weight": 0.5, "density": 0.5}} for n in ("bft_a", "bft_b")]
    config = {"merge_method": method, "base_model": wide_paths["bbase"], "models": models, "dtype": "float32"}
    job = build_job(load_plan(str(_write(tmp_path / "plan.yml", config))))
    whole = run_preview(job, mode="exact", memory_budget=10**12)
    blocks = run_preview(job, mode="exact", memory_budget=1)
    for expected, got in zip([*whole.groups, whole.total], [*blocks.groups, blocks.total]):
        assert (got.group, got.numel, got.evaluated) == (expected.group, expected.numel, expected.evaluated)
        np.testing.assert_allclose(got.merged_norm, expected.merged_norm, rtol=1e-12)
        np.testing.assert_allclose(got.retention, expected.retention, rtol=1e-12)
        np.testing.assert_allclose(got.cosine, expected.cosine, rtol=1e-12)


def test_slerp_takes_its_norms_and_cosine_from_passes_over_row_blocks(tmp_path):
    """A tensor of three of slerp's 2²⁰-entry norm blocks (the last partial), merged from row blocks: the bits
    of the whole merge, and those of a float64-checked slerp within float32 rounding."""
    g = torch.Generator().manual_seed(7)
    a = torch.randn(3000, 1024, generator=g)
    b = (a + 0.3 * torch.randn(3000, 1024, generator=g)).to(torch.bfloat16)
    for name, tensor in (("a", a.to(torch.bfloat16)), ("b", b)):
        (tmp_path / name).mkdir()
        save_file({"model.embed_tokens.weight": tensor}, str(tmp_path / name / "model.safetensors"))
    config = {"merge_method": "slerp", "base_model": str(tmp_path / "a"), "parameters": {"t": 0.3},
              "models": [{"model": str(tmp_path / "b")}], "dtype": "float32"}
    whole = _merge(config, tmp_path / "whole", 10**12)["model.embed_tokens.weight"]
    blocks = _merge(config, tmp_path / "blocks", 1)["model.embed_tokens.weight"]
    assert torch.equal(whole, blocks)
    x, y = a.to(torch.bfloat16).double().reshape(-1), b.double().reshape(-1)
    angle = torch.acos((x / x.norm()) @ (y / y.norm()))
    expected = (torch.sin(0.7 * angle) * x + torch.sin(0.3 * angle) * y) / torch.sin(angle)
    torch.testing.assert_close(blocks.double().reshape(-1), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_a_nan_in_a_late_block_stops_the_merge_cleanly(tmp_path, method):
    """The error names the model and tensor; the reader waiting for a buffer set is released, nothing is left."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(4096, 64, generator=g)
    tuned = base + 0.01 * torch.randn(4096, 64, generator=g)
    tuned[4000, 3] = float("nan")
    for name, tensor in (("base", base), ("ft", tuned)):
        (tmp_path / name).mkdir()
        save_file({"model.embed_tokens.weight": tensor}, str(tmp_path / name / "model.safetensors"))
    config = {"merge_method": method, "base_model": str(tmp_path / "base"),
              "models": [{"model": str(tmp_path / "ft"), "parameters": {"weight": 1.0, "density": 0.5}}]}
    with pytest.raises(MergescopeError, match="ft: tensor model.embed_tokens.weight has 1 NaN/Inf"):
        _merge(config, tmp_path / "out", 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "ft", "out.yml"]


def test_cli_memory_budget_option(tmp_path, wide_paths, capsys):
    from mergescope.tui.cli.main import main

    config = {"merge_method": "task_arithmetic", "base_model": wide_paths["bbase"],
              "models": [{"model": wide_paths["bft_a"], "parameters": {"weight": 0.5}}]}
    plan = str(_write(tmp_path / "plan.yml", config))
    assert main(["merge", plan, "-o", str(tmp_path / "bad"), "--device", "cpu", "--memory-budget", "lots"]) == 2
    assert "memory_budget 'lots': use bytes or a size like 1.5GB" in capsys.readouterr().err
    assert main(["merge", plan, "-o", str(tmp_path / "small"), "--device", "cpu", "--memory-budget", "1KB"]) == 0
    assert main(["merge", plan, "-o", str(tmp_path / "large"), "--device", "cpu", "--memory-budget", "8GB"]) == 0
    small, large = (load_file(tmp_path / name / "model.safetensors") for name in ("small", "large"))
    assert small.keys() == large.keys() and all(torch.equal(small[name], large[name]) for name in large)
    assert main(["analyze", wide_paths["bbase"], wide_paths["bft_a"], "--no-cache", "--device", "cpu",
                 "--memory-budget", "1KB", "--json", str(tmp_path / "a.json")]) == 0


def _no_whole_prepare(*args, **kwargs):
    raise AssertionError("prepare on the whole inputs: the streamed first pass was not used")


@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_stock_takes_its_cosines_from_a_pass_over_row_blocks(tmp_path, filter_wise, dtype):
    """A 3001×1000 tensor (six row blocks of 512 rows at the smallest budget, a partial 4096-entry chunk at the
    end) and three fine-tunes: the streamed merge never reads the tensor whole for its ratio and has the bits of
    the whole merge, which is the method's function on the whole tensors; both agree with a float64 model_stock
    within float32 rounding."""
    g = torch.Generator().manual_seed(11)
    base = torch.randn(3001, 1000, generator=g).to(dtype)
    shared = 0.05 * torch.randn(3001, 1000, generator=g)
    models = [(base.float() + shared + 0.05 * torch.randn(3001, 1000, generator=g)).to(dtype) for _ in range(3)]
    for name, tensor in zip(["base", "a", "b", "c"], [base, *models]):
        (tmp_path / name).mkdir()
        save_file({"model.embed_tokens.weight": tensor}, str(tmp_path / name / "model.safetensors"))
    config = {"merge_method": "model_stock", "base_model": str(tmp_path / "base"),
              "parameters": {"filter_wise": filter_wise},
              "models": [{"model": str(tmp_path / name)} for name in "abc"], "dtype": "float32"}
    job = build_job(load_plan(str(_write(tmp_path / "plan.yml", config))))
    assert len(plan_blocks(job, ALIGN_ENTRIES)) == 6
    whole_dir = run_merge(job, tmp_path / "whole", device="cpu", memory_budget=10**12)
    whole = load_file(whole_dir / "model.safetensors")["model.embed_tokens.weight"]
    job.method = replace(job.method, prepare=_no_whole_prepare)
    blocks_dir = run_merge(job, tmp_path / "blocks", device="cpu", memory_budget=1)
    blocks = load_file(blocks_dir / "model.safetensors")["model.embed_tokens.weight"]
    assert torch.equal(whole, blocks)
    function = job.method.function(base.float(), [m.float() for m in models], [{}] * 3, {"filter_wise": filter_wise})
    assert torch.equal(function, whole)

    x0 = base.double()
    taus = [m.double() - x0 for m in models]
    dim = -1 if filter_wise else None
    pairs = [(i, j) for i in range(3) for j in range(i + 1, 3)]
    cosine = sum((taus[i] * taus[j]).sum(dim=dim) / (taus[i].norm(dim=dim) * taus[j].norm(dim=dim))
                 for i, j in pairs) / len(pairs)
    ratio = (3 * cosine / (1 + 2 * cosine)).reshape(-1, 1) if filter_wise else 3 * cosine / (1 + 2 * cosine)
    expected = ratio * sum(m.double() for m in models) / 3 + (1 - ratio) * x0
    torch.testing.assert_close(blocks.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("with_base", "options", "streamed"), [
    (True, {}, True), (False, {}, True), (True, {"nuslerp_flatten": False}, True),
    (False, {"nuslerp_flatten": False}, True), (True, {"nuslerp_flatten": False, "nuslerp_row_wise": True}, True),
])
def test_nuslerp_takes_its_norms_and_cosine_from_passes_over_row_blocks(tmp_path, with_base, options, streamed):
    """A 3001×1000 tensor (six row blocks at the smallest budget, a partial 4096-entry chunk at the end): the
    flattened, row-by-row and column-wise arcs come from passes over the blocks (never read whole); each has the
    bits of the whole merge, which is the method's function on the whole tensors, and agrees with a float64 slerp
    within float32 rounding."""
    g = torch.Generator().manual_seed(5)
    base = torch.randn(3001, 1000, generator=g).to(torch.bfloat16)
    shared = 0.05 * torch.randn(3001, 1000, generator=g)
    models = [(base.float() + shared + 0.05 * torch.randn(3001, 1000, generator=g)).to(torch.bfloat16)
              for _ in range(2)]
    for name, tensor in zip(["base", "a", "b"], [base, *models]):
        (tmp_path / name).mkdir()
        save_file({"model.embed_tokens.weight": tensor}, str(tmp_path / name / "model.safetensors"))
    config = {"merge_method": "nuslerp", "parameters": options, "dtype": "float32",
              "models": [{"model": str(tmp_path / "a"), "parameters": {"weight": 1.0}},
                         {"model": str(tmp_path / "b"), "parameters": {"weight": 3.0}}]}
    if with_base:
        config["base_model"] = str(tmp_path / "base")
    job = build_job(load_plan(str(_write(tmp_path / "plan.yml", config))))
    assert len(plan_blocks(job, ALIGN_ENTRIES)) == 6
    whole_dir = run_merge(job, tmp_path / "whole", device="cpu", memory_budget=10**12)
    whole = load_file(whole_dir / "model.safetensors")["model.embed_tokens.weight"]
    if streamed:
        job.method = replace(job.method, prepare=_no_whole_prepare)
    blocks_dir = run_merge(job, tmp_path / "blocks", device="cpu", memory_budget=1)
    blocks = load_file(blocks_dir / "model.safetensors")["model.embed_tokens.weight"]
    assert torch.equal(whole, blocks)
    floats = [m.float() for m in models]
    function = job.method.function(base.float() if with_base else None, floats, [{"weight": 1.0}, {"weight": 3.0}],
                                   options)
    assert torch.equal(function, whole)

    offset = base.double() if with_base else torch.zeros(3001, 1000, dtype=torch.float64)
    x1, x2 = (m.double() - offset for m in models)
    if options.get("nuslerp_row_wise"):
        x1, x2 = x1.T, x2.T
    dim = -1 if options else None
    keep = options != {}
    cosine = ((x1 / x1.norm(dim=dim, keepdim=keep)) * (x2 / x2.norm(dim=dim, keepdim=keep))).sum(dim=dim,
                                                                                               keepdim=keep)
    angle = torch.acos(cosine)
    expected = (torch.sin(0.25 * angle) * x1 + torch.sin(0.75 * angle) * x2) / torch.sin(angle)
    if options.get("nuslerp_row_wise"):
        expected = expected.T
    torch.testing.assert_close(blocks.double(), offset + expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("with_base", "normalize", "count"), [(True, True, 3), (False, False, 3), (True, True, 1)])
def test_multislerp_takes_its_scalars_from_passes_over_row_blocks(tmp_path, with_base, normalize, count):
    """A 3001×1000 tensor (six row blocks at the smallest budget, a partial 4096-entry chunk at the end): the
    norms, mean direction, projections and tangent length come from passes over the blocks (never read whole);
    the bits of the whole merge, which is the method's function on the whole tensors; a float64 multislerp
    within float32 rounding."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(3001, 1000, generator=g).to(torch.bfloat16)
    shared = 0.05 * torch.randn(3001, 1000, generator=g)
    models = [(base.float() + shared + 0.05 * torch.randn(3001, 1000, generator=g)).to(torch.bfloat16)
              for _ in range(count)]
    names = "abc"[:count]
    for name, tensor in zip(["base", *names], [base, *models]):
        (tmp_path / name).mkdir()
        save_file({"model.embed_tokens.weight": tensor}, str(tmp_path / name / "model.safetensors"))
    weights = [0.5, 1.0, 2.0][:count]
    config = {"merge_method": "multislerp", "parameters": {"normalize_weights": normalize}, "dtype": "float32",
              "models": [{"model": str(tmp_path / n), "parameters": {"weight": w}} for n, w in zip(names, weights)]}
    if with_base:
        config["base_model"] = str(tmp_path / "base")
    job = build_job(load_plan(str(_write(tmp_path / "plan.yml", config))))
    assert len(plan_blocks(job, ALIGN_ENTRIES)) == 6
    whole_dir = run_merge(job, tmp_path / "whole", device="cpu", memory_budget=10**12)
    whole = load_file(whole_dir / "model.safetensors")["model.embed_tokens.weight"]
    job.method = replace(job.method, prepare=_no_whole_prepare)
    blocks_dir = run_merge(job, tmp_path / "blocks", device="cpu", memory_budget=1)
    blocks = load_file(blocks_dir / "model.safetensors")["model.embed_tokens.weight"]
    assert torch.equal(whole, blocks)
    function = job.method.function(base.float() if with_base else None, [m.float() for m in models],
                                   [{"weight": w} for w in weights], {"normalize_weights": normalize})
    assert torch.equal(function, whole)

    if count == 1:
        assert torch.equal(blocks, models[0].float())
        return
    offset = base.double().reshape(-1) if with_base else torch.zeros(3001 * 1000, dtype=torch.float64)
    xs = [m.double().reshape(-1) - offset for m in models]
    w = torch.tensor(weights, dtype=torch.float64)
    w = w / w.sum() if normalize else w
    units = [x / x.norm() for x in xs]
    mean = sum(wi * u for wi, u in zip(w, units))
    mean = mean / mean.norm()
    tangent = sum(wi * (u - (u @ mean) * mean) for wi, u in zip(w, units))
    length = tangent.norm()
    expected = (mean * torch.cos(length) + tangent * torch.sin(length) / length) * sum(
        wi * x.norm() for wi, x in zip(w, xs))
    torch.testing.assert_close(blocks.double().reshape(-1), offset + expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("topk", "streamed"), [(1.0, True), (0.4, False)])
def test_sce_takes_its_weights_from_a_pass_over_row_blocks(tmp_path, topk, streamed):
    """A 3001×1000 tensor (six row blocks at the smallest budget, a partial 4096-entry chunk at the end): with
    select_topk 1 the weights come from a pass over the blocks (never read whole), below 1 with the variance
    mask from the whole tensor; the bits of the whole merge, which is the method's function on the whole
    tensors; at select_topk 1 a float64 sce within float32 rounding."""
    g = torch.Generator().manual_seed(9)
    base = torch.randn(3001, 1000, generator=g).to(torch.bfloat16)
    models = [(base.float() + scale * torch.randn(3001, 1000, generator=g)).to(torch.bfloat16)
              for scale in (0.02, 0.05, 0.1)]
    for name, tensor in zip(["base", "a", "b", "c"], [base, *models]):
        (tmp_path / name).mkdir()
        save_file({"model.embed_tokens.weight": tensor}, str(tmp_path / name / "model.safetensors"))
    config = {"merge_method": "sce", "base_model": str(tmp_path / "base"), "parameters": {"select_topk": topk},
              "models": [{"model": str(tmp_path / name)} for name in "abc"], "dtype": "float32"}
    job = build_job(load_plan(str(_write(tmp_path / "plan.yml", config))))
    assert len(plan_blocks(job, ALIGN_ENTRIES)) == 6
    whole_dir = run_merge(job, tmp_path / "whole", device="cpu", memory_budget=10**12)
    whole = load_file(whole_dir / "model.safetensors")["model.embed_tokens.weight"]
    if streamed:
        job.method = replace(job.method, prepare=_no_whole_prepare)
    blocks_dir = run_merge(job, tmp_path / "blocks", device="cpu", memory_budget=1)
    blocks = load_file(blocks_dir / "model.safetensors")["model.embed_tokens.weight"]
    assert torch.equal(whole, blocks)
    function = job.method.function(base.float(), [m.float() for m in models], [{}] * 3, {"select_topk": topk})
    assert torch.equal(function, whole)
    if not streamed:
        return

    taus = torch.stack([m.double() - base.double() for m in models])
    energy = taus.square().mean(dim=(1, 2))
    weights = (energy / energy.sum()).reshape(-1, 1, 1)
    elected = torch.where(taus.sum(dim=0) >= 0, 1.0, -1.0).double()
    kept = weights * (taus.sign() == elected)
    expected = base.double() + (taus * kept).sum(dim=0) / kept.sum(dim=0).clamp(min=1e-6)
    torch.testing.assert_close(blocks.double(), expected, rtol=1e-4, atol=1e-5)


def test_ramplus_tl_takes_its_overlap_counts_from_a_pass_over_row_blocks(tmp_path):
    """A 3001×1000 tensor (six row blocks at the smallest budget) and three sparse fine-tunes: the overlap
    counts come from a pass over the blocks (never read whole); the bits of the whole merge, which is the
    method's function on the whole tensors; a float64 RAM+ within float32 rounding."""
    g = torch.Generator().manual_seed(13)
    base = torch.randn(3001, 1000, generator=g)
    models = [base + 0.05 * torch.randn(3001, 1000, generator=g) * (torch.rand(3001, 1000, generator=g) < share)
              for share in (0.3, 0.5, 0.7)]
    for name, tensor in zip(["base", "a", "b", "c"], [base, *models]):
        (tmp_path / name).mkdir()
        save_file({"model.embed_tokens.weight": tensor}, str(tmp_path / name / "model.safetensors"))
    options = {"r": 0.5, "alpha": 0.8, "epsilon": 1e-4}
    config = {"merge_method": "ramplus_tl", "base_model": str(tmp_path / "base"), "parameters": options,
              "models": [{"model": str(tmp_path / name)} for name in "abc"], "dtype": "float32"}
    job = build_job(load_plan(str(_write(tmp_path / "plan.yml", config))))
    assert len(plan_blocks(job, ALIGN_ENTRIES)) == 6
    whole_dir = run_merge(job, tmp_path / "whole", device="cpu", memory_budget=10**12)
    whole = load_file(whole_dir / "model.safetensors")["model.embed_tokens.weight"]
    job.method = replace(job.method, prepare=_no_whole_prepare)
    blocks_dir = run_merge(job, tmp_path / "blocks", device="cpu", memory_budget=1)
    blocks = load_file(blocks_dir / "model.safetensors")["model.embed_tokens.weight"]
    assert torch.equal(whole, blocks)
    assert torch.equal(job.method.function(base, models, [{}] * 3, options), whole)

    taus = torch.stack([m - base for m in models]).double()  # the float32 differences, as the merge forms them
    counts = taus.abs() > 1e-4
    c = counts.sum(dim=0)
    shared = (counts & (c > 1)).sum(dim=(1, 2)).double()
    alone = (counts & (c == 1)).sum(dim=(1, 2)).double()
    boost = (1 + 0.5 * (shared / alone).clamp(0, 0.8)).reshape(-1, 1, 1)
    kept = taus * counts
    expected = base.double() + (kept * (c == 1) * boost + kept * (c > 1) / c.clamp(min=1)).sum(dim=0)
    torch.testing.assert_close(blocks.double(), expected, rtol=1e-5, atol=1e-6)
