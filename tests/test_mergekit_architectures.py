"""mergescope against mergekit 0.1.5 on the seven architectures as transformers and peft write them
(tests/hf_architectures.py: sharded bf16 bases, fine-tunes, a PEFT LoRA given as ``base+adapter``).

Plans compute in float32 (``dtype: float32``), where mergekit's arithmetic equals ours: linear, task arithmetic
and TIES at density 1 (sign election and disjoint mean, no trim) must agree to float32 rounding. Not compared
here, and why:

* TIES/DARE/breadcrumbs trims on bf16 task vectors: bf16 differences tie in magnitude at the trim threshold
  and mergekit breaks those ties in an unstable order (tests/test_mergekit_compat.py compares them against a
  float64 trim instead).
* Mixtral under transformers 5: mergekit writes the experts renamed and fused
  (``mlp.experts.gate_up_proj`` [experts, 2·intermediate, hidden], ``mlp.experts.down_proj``,
  ``mlp.gate``); mergescope keeps the names the model was saved with (``block_sparse_moe.experts.N.w1/w2/w3``),
  which transformers 5 loads too. The fused tensors are compared slice by slice (gate_up = [w1; w3]); for
  elementwise methods that is exact. Methods with whole-tensor statistics (slerp's norms, trims) would see
  one fused tensor in mergekit and one tensor per expert in mergescope, so they are not compared on Mixtral.
"""

from __future__ import annotations

import pytest
import torch

import mergekit_reference as mk
from hf_architectures import ARCHITECTURES, write_family
from mergekit_reference import load_merged, mergekit_available
from test_mergekit_compat import mergescope_merge

pytestmark = [
    pytest.mark.mergekit,
    pytest.mark.skipif(not mergekit_available(), reason="no mergekit venv: python benchmarks/mergekit_env.py"),
]

METHODS = ("linear", "task_arithmetic", "ties")


def plan(method: str, p: dict[str, str]) -> dict:
    lora = f"{p['base']}+{p['lora']}"
    if method == "linear":
        return {"merge_method": "linear", "models": [{"model": p["ft_a"], "parameters": {"weight": 0.7}},
                                                     {"model": p["ft_b"], "parameters": {"weight": 0.3}}],
                "dtype": "float32"}
    params = {"weight": 0.6, "density": 1.0} if method == "ties" else {"weight": 0.6}
    return {"merge_method": method, "base_model": p["base"],
            "models": [{"model": m, "parameters": params} for m in (p["ft_a"], p["ft_b"], lora)],
            "dtype": "float32"}


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mk-arch")
    jobs, ours = {}, {}
    for arch in ARCHITECTURES.values():
        paths = {k: str(v) for k, v in write_family(arch, root / arch.name).items()}
        for method in METHODS:
            name = f"{arch.name}-{method}"
            jobs[name] = (plan(method, paths), root / f"mk-{name}")
            ours[name] = mergescope_merge(plan(method, paths), root / f"ms-{name}")
    theirs = mk.run_mergekit_batch(jobs, extra_args=("--lora-merge-cache", str(root / "lora-cache")), timeout=600)
    return {name: (ours[name], theirs[name]) for name in jobs}


def unfuse_mixtral(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """mergekit's transformers-5 Mixtral names back to the saved ones: gate_up_proj[e] = [w1; w3], down_proj[e] = w2,
    mlp.gate = block_sparse_moe.gate."""
    out = {}
    for name, tensor in state.items():
        prefix, _, rest = name.partition(".mlp.")
        if rest == "experts.gate_up_proj":
            half = tensor.shape[1] // 2
            for e in range(tensor.shape[0]):
                out[f"{prefix}.block_sparse_moe.experts.{e}.w1.weight"] = tensor[e, :half]
                out[f"{prefix}.block_sparse_moe.experts.{e}.w3.weight"] = tensor[e, half:]
        elif rest == "experts.down_proj":
            for e in range(tensor.shape[0]):
                out[f"{prefix}.block_sparse_moe.experts.{e}.w2.weight"] = tensor[e]
        elif rest == "gate.weight":
            out[f"{prefix}.block_sparse_moe.gate.weight"] = tensor
        else:
            out[name] = tensor
    return out


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_matches_mergekit(outputs, arch, method):
    ours_dir, theirs_dir = outputs[f"{arch}-{method}"]
    if isinstance(theirs_dir, Exception):
        raise theirs_dir
    ours, theirs = load_merged(ours_dir), load_merged(theirs_dir)
    if arch == "mixtral":
        theirs = unfuse_mixtral(theirs)
    mk.assert_tensors_close(ours, theirs, rtol=1e-6, atol=1e-7, label=f"{arch} {method}")
