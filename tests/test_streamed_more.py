"""What else streams in row blocks (issue 13): karcher's iterated mean, nuslerp along columns, the padded rows
of a vocabulary merge, and the analysis's trimmed statistics at ``density < 1``. Each tensor is larger than
one block under the smallest memory budget and is never read whole; the bits equal the whole-tensor path, and
a float64 computation written here agrees within float32 rounding."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from mergescope.checkpoints.row_blocks import ALIGN_ENTRIES
from mergescope.merge.executor import plan_blocks, run_merge
from mergescope.merge.job import build_job
from mergescope.merge.plan import load_plan

ROWS, WIDTH = 3001, 1000  # six row blocks at the smallest budget, a partial 4096-entry chunk at the end


def _save(tmp_path, tensors: dict[str, torch.Tensor], name: str = "model.embed_tokens.weight") -> None:
    for folder, tensor in tensors.items():
        (tmp_path / folder).mkdir()
        save_file({name: tensor}, str(tmp_path / folder / "model.safetensors"))


def _job(tmp_path, config: dict):
    path = tmp_path / "plan.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return build_job(load_plan(str(path)))


def _no_whole_prepare(*args, **kwargs):
    raise AssertionError("prepare on the whole inputs: the streamed first pass was not used")


def _whole_and_streamed(tmp_path, job, name: str = "model.embed_tokens.weight", blocks: int = 6):
    """The tensor merged whole (a budget that holds it) and in row blocks with ``prepare`` forbidden."""
    assert len([u for u in plan_blocks(job, ALIGN_ENTRIES) if u.task.output == name]) == blocks
    whole = load_file(run_merge(job, tmp_path / "whole", device="cpu", memory_budget=10**12)
                      / "model.safetensors")[name]
    job.method = replace(job.method, prepare=_no_whole_prepare)
    streamed = load_file(run_merge(job, tmp_path / "blocks", device="cpu", memory_budget=1)
                         / "model.safetensors")[name]
    return whole, streamed


# --- karcher ----------------------------------------------------------------------------------------------------
def karcher64(models: list[torch.Tensor], max_iter: int, tol: float) -> tuple[torch.Tensor, int]:
    """mergekit's karcher in float64 over flat tensors, and the number of updates it made."""
    xs = [m.double().reshape(-1) for m in models]
    norms = [x.norm() for x in xs]
    units = [x / n for x, n in zip(xs, norms) if n > tol]
    alpha = 1 / len(units)
    mean = sum(alpha * u for u in units)
    mean = mean / mean.norm()
    updates = 0
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for u in units:
            cosine = float((mean @ u).clamp(-1, 1))
            angle = math.acos(cosine)
            if angle >= tol:
                tangent += alpha * angle / math.sin(angle) * (u - cosine * mean)
        length = float(tangent.norm())
        if length < tol:
            break
        mean = math.cos(length) * mean + math.sin(length) * tangent / length
        mean = mean / mean.norm()
        updates += 1
    return sum(norms) / len(models) * mean, updates


@pytest.mark.parametrize(("options", "zero"), [({}, False), ({"max_iter": 2, "tol": 1e-9}, False), ({}, True)])
def test_karcher_iterates_over_row_blocks_with_the_bits_of_the_whole_merge(tmp_path, options, zero):
    """Three models (one of them zero: out of the direction, in the mean norm): the norms, each iteration's
    projections and tangent length come from passes over the blocks; the bits of the whole merge, which is the
    method's function on whole tensors; a float64 karcher within float32 rounding, with as many updates (none
    for two directions, whose normalised mean is already their Karcher mean)."""
    from mergescope.merge.methods.karcher import karcher_prepare

    g = torch.Generator().manual_seed(21)
    shared = torch.randn(ROWS, WIDTH, generator=g)
    models = [(shared + scale * torch.randn(ROWS, WIDTH, generator=g)).to(torch.bfloat16)
              for scale in (0.5, 1.0, 2.0)]
    if zero:
        models[2] = torch.zeros_like(models[2])
    _save(tmp_path, dict(zip("abc", models)))
    config = {"merge_method": "karcher", "parameters": options, "dtype": "float32",
              "models": [{"model": str(tmp_path / name)} for name in "abc"]}
    job = _job(tmp_path, config)
    function = job.method.function
    whole, streamed = _whole_and_streamed(tmp_path, job)
    assert torch.equal(whole, streamed)
    floats = [m.float() for m in models]
    assert torch.equal(function(None, floats, [{}] * 3, options), whole)

    expected, updates = karcher64(models, options.get("max_iter", 10), options.get("tol", 1e-5))
    assert karcher_prepare(floats[0], floats[1:], [{}] * 3, options)[0].iterations == updates
    assert updates > 0 or zero  # two directions: their normalised mean is already the Karcher mean
    torch.testing.assert_close(streamed.double().reshape(-1), expected, rtol=1e-4, atol=1e-5)


def test_karcher_whose_mean_direction_vanishes_starts_from_the_first_input():
    """Four directions summing to zero (the normalised mean is undefined): mergekit starts from the first unit
    vector and iterates; a float64 karcher from there, with as many updates."""
    from mergescope.merge.methods.karcher import karcher, karcher_prepare

    d = math.sqrt(0.27)
    units = torch.tensor([[0.6, 0.8, 0.0], [-0.6, 0.8, 0.0], [0.3, -0.8, d], [-0.3, -0.8, -d]], dtype=torch.float64)
    models = [(r * u).float() for r, u in zip((1.0, 2.0, 0.5, 3.0), units)]
    xs = [m.double() for m in models]
    u = [x / x.norm() for x in xs]
    assert float(sum(u).norm()) < 1e-5
    mean, updates = u[0].clone(), 0
    for _ in range(10):
        tangent = torch.zeros(3, dtype=torch.float64)
        for v in u:
            cosine = float((mean @ v).clamp(-1, 1))
            angle = math.acos(cosine)
            if angle >= 1e-5:
                tangent += 0.25 * angle / math.sin(angle) * (v - cosine * mean)
        length = float(tangent.norm())
        if length < 1e-5:
            break
        mean = math.cos(length) * mean + math.sin(length) * tangent / length
        mean, updates = mean / mean.norm(), updates + 1
    assert updates > 0
    assert karcher_prepare(models[0], models[1:], [{}] * 4, {})[0].iterations == updates
    expected = sum(x.norm() for x in xs) / 4 * mean
    torch.testing.assert_close(karcher(None, models, [{}] * 4, {}).double(), expected, rtol=1e-5, atol=1e-5)


# --- nuslerp along columns --------------------------------------------------------------------------------------
@pytest.mark.parametrize(("rows", "width"), [(ROWS, WIDTH), (1001, 1536)])
@pytest.mark.parametrize("with_base", [True, False])
def test_nuslerp_along_columns_sums_its_columns_over_row_blocks(tmp_path, rows, width, with_base):
    """nuslerp_row_wise (one vector per column): each column's sums come from one pass over the row blocks —
    blocks of 512 rows with a partial 64-row chunk at the end, or of 8 rows, each 64-row chunk split across
    eight blocks — never read whole; the bits of the whole merge, which is the method's function on whole
    tensors; a float64 column-wise slerp within float32 rounding."""
    from mergescope.merge.methods.chunks import ROW_CHUNK

    g = torch.Generator().manual_seed(23)
    base = torch.randn(rows, width, generator=g).to(torch.bfloat16)
    shared = 0.05 * torch.randn(rows, width, generator=g)
    models = [(base.float() + shared + 0.05 * torch.randn(rows, width, generator=g)).to(torch.bfloat16)
              for _ in range(2)]
    _save(tmp_path, dict(zip(["base", "a", "b"], [base, *models])))
    options = {"nuslerp_flatten": False, "nuslerp_row_wise": True}
    config = {"merge_method": "nuslerp", "parameters": options, "dtype": "float32",
              "models": [{"model": str(tmp_path / "a"), "parameters": {"weight": 1.0}},
                         {"model": str(tmp_path / "b"), "parameters": {"weight": 3.0}}]}
    if with_base:
        config["base_model"] = str(tmp_path / "base")
    job = _job(tmp_path, config)
    block_rows = 512 if width == WIDTH else 8
    assert (block_rows % ROW_CHUNK == 0) == (width == WIDTH)
    whole, streamed = _whole_and_streamed(tmp_path, job, blocks=-(-rows // block_rows))
    assert torch.equal(whole, streamed)
    function = job.method.function(base.float() if with_base else None, [m.float() for m in models],
                                   [{"weight": 1.0}, {"weight": 3.0}], options)
    assert torch.equal(function, whole)

    offset = base.double() if with_base else torch.zeros(rows, width, dtype=torch.float64)
    x1, x2 = (m.double() - offset for m in models)
    angle = torch.acos((x1 * x2).sum(dim=0) / (x1.norm(dim=0) * x2.norm(dim=0)))
    expected = (torch.sin(0.25 * angle) * x1 + torch.sin(0.75 * angle) * x2) / torch.sin(angle)
    torch.testing.assert_close(streamed.double(), offset + expected, rtol=1e-4, atol=1e-5)


# --- a padded vocabulary's mean row -----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_padding_rows_are_the_mean_real_row_summed_a_block_at_a_time(tmp_path, monkeypatch, dtype):
    """pad_to_multiple_of: 3001 real rows of 1000 (rows of other inputs, a filled row), padded to 3008. The
    block reader takes each input's mean real row from reads of ~1M entries (1048 rows: 64-row chunks split
    between reads), never all rows at once, with the bits of RowAlignment.align on the whole tensors; both
    within float32 rounding of a float64 mean."""
    from mergescope.checkpoints import open_checkpoint
    from mergescope.checkpoints.checkpoint import Checkpoint
    from mergescope.merge.aligned_rows import AlignedRows
    from mergescope.merge.vocabulary_merge import RowAlignment

    g = torch.Generator().manual_seed(29)
    tensors = [(3 + torch.randn(ROWS, WIDTH, generator=g)).to(dtype) for _ in range(2)]
    _save(tmp_path, dict(zip("ab", tensors)))
    order = torch.randperm(ROWS, generator=g).tolist()
    maps = [list(range(ROWS)), order]
    maps[1][5] = -1  # input b lacks token 5: filled with a's row 17
    alignment = RowAlignment(maps, {5: [(0, 17)]}, ROWS + 7)
    whole = alignment.align(tensors)
    checkpoints = [open_checkpoint(str(tmp_path / name)) for name in "ab"]

    def never_whole(*args, **kwargs):
        raise AssertionError("a tensor read whole")

    listed = []
    real_list = Checkpoint.read_row_list

    def counting(self, name, rows, device=None):
        listed.append(len(rows))
        return real_list(self, name, rows, device)

    monkeypatch.setattr(Checkpoint, "read", never_whole)
    monkeypatch.setattr(Checkpoint, "read_row_list", counting)
    aligned = AlignedRows([(c, "model.embed_tokens.weight") for c in checkpoints], alignment, "cpu")
    assert 1 < max(listed) < ROWS
    for i, expected in enumerate(whole):
        padding = aligned.rows(i, ROWS, ROWS + 7)
        assert padding.dtype == expected.dtype == torch.float32
        assert torch.equal(padding, expected[ROWS:])
        assert torch.equal(aligned.rows(i, 2990, ROWS + 7), expected[2990:])
        rows = tensors[i].double()[torch.tensor([max(r, 0) for r in maps[i]])]
        rows[torch.tensor(maps[i]) < 0] = tensors[0].double()[17]
        torch.testing.assert_close(padding.double(), rows.mean(dim=0).expand(7, WIDTH), rtol=1e-6, atol=1e-6)


# --- the analysis's trimmed statistics at density < 1 -----------------------------------------------------------
def _signs64(taus: list[torch.Tensor], density: float) -> dict:
    """TIES' trim in float64 numpy terms: each τ keeps its ⌊density·n⌋ largest |τ| (a stable sort: ties lowest
    index first), then the sign statistics of the kept entries."""
    import numpy as np

    signs = []
    for tau in taus:
        magnitude = tau.abs().double().numpy().reshape(-1)
        kept = np.zeros(magnitude.size, bool)
        kept[np.argsort(-magnitude, kind="stable")[: int(density * magnitude.size)]] = True
        signs.append(np.sign(tau.double().numpy().reshape(-1)) * kept)
    s = np.stack(signs).astype(np.int64)
    nonzero = np.abs(s)
    return {"sign_dot": s @ s.T, "both_nonzero": nonzero @ nonzero.T,
            "multi_nonzero": int((nonzero.sum(0) >= 2).sum()),
            "multi_conflict": int(((s > 0).any(0) & (s < 0).any(0)).sum())}


def test_trimmed_analysis_takes_its_cuts_from_passes_over_row_blocks(tmp_path, monkeypatch):
    """density 0.5 on a 3001×1000 bf16 tensor (heavy ties at the threshold) and three fine-tunes, one sparse:
    at the smallest budget (many row blocks) the trim's cuts come from passes over the blocks — no tensor
    read whole, no whole |τ| formed — and the trimmed sign statistics equal those of the whole-tensor trim (a
    budget that holds the tensor) exactly, and a float64 trim's."""
    import numpy as np

    import mergescope.merge.magnitude_trim as magnitude_trim
    from mergescope.analysis.stream import TensorResult, stream_analysis
    from mergescope.checkpoints import open_checkpoint
    from mergescope.checkpoints.checkpoint import Checkpoint

    g = torch.Generator().manual_seed(31)
    base = torch.randn(ROWS, WIDTH, generator=g).to(torch.bfloat16)
    models = [(base.float() + scale * torch.randn(ROWS, WIDTH, generator=g)).to(torch.bfloat16)
              for scale in (0.01, 0.02, 0.05)]
    models[2] = torch.where(torch.rand(ROWS, WIDTH, generator=g) < 0.3, models[2], base)  # 70 % unchanged
    _save(tmp_path, dict(zip(["base", "a", "b", "c"], [base, *models])))

    def analyse(budget) -> TensorResult:
        checkpoints = [open_checkpoint(str(tmp_path / name)) for name in ["base", "a", "b", "c"]]
        events = stream_analysis(checkpoints[0], checkpoints[1:], ["a", "b", "c"], density=0.5, device="cpu",
                                 memory_budget=budget)
        return next(e for e in events if isinstance(e, TensorResult))

    whole = analyse(10**12)
    read_rows = Checkpoint.read_rows
    widest = []

    def counting(self, name, start, stop, *args, **kwargs):
        widest.append(stop - start)
        return read_rows(self, name, start, stop, *args, **kwargs)

    def never(*args, **kwargs):
        raise AssertionError("a tensor read whole, or a whole |τ| formed")

    monkeypatch.setattr(Checkpoint, "read", never)
    monkeypatch.setattr(Checkpoint, "read_rows", counting)
    monkeypatch.setattr(magnitude_trim, "exact_cut", never)
    blocks = analyse(1)
    assert max(widest) < ROWS
    expected = _signs64([m.float() - base.float() for m in models], 0.5)
    for result in (whole, blocks):
        trimmed = result.sums.trimmed
        np.testing.assert_array_equal(trimmed.sign_dot, expected["sign_dot"])
        np.testing.assert_array_equal(trimmed.both_nonzero, expected["both_nonzero"])
        assert (trimmed.multi_nonzero, trimmed.multi_conflict) == (expected["multi_nonzero"],
                                                                   expected["multi_conflict"])
    np.testing.assert_array_equal(blocks.sums.signs.sign_dot, whole.sums.signs.sign_dot)
    # the untrimmed Gram sums: float32 products over 1024 entries, whose boundaries move with the blocks and
    # the CPU threads' slices (as at density 1): equal within their float32 rounding, not to the bit
    np.testing.assert_allclose(blocks.sums.gram, whole.sums.gram, rtol=1e-6)
