"""Which CPU kernels the demo trains with, so that a seed gives the same weights on every x86-64 machine.

Training is chaotic: a difference in the last bit of one matrix product grows, over a few hundred steps,
into a different model. torch picks its kernels by CPU — ATen's vectorised kernels for AVX2 or AVX-512,
MKL's GEMM code path for the processor it finds — so with the same seed an AVX2 machine and an AVX-512
machine train different models. The ``portable`` setting pins every numeric path that depends on the CPU:

- ``ATEN_CPU_CAPABILITY=default``: ATen's kernels built for baseline x86-64, not the AVX2/AVX-512 ones;
- ``MKL_CBWR=COMPATIBLE``: MKL's conditional numerical reproducibility, one code path on all Intel and
  compatible processors;
- :data:`TRAIN_THREADS` threads for OpenMP and MKL (and ``torch.set_num_threads`` in the trainer).

torch and MKL read these when they load, so the build runs in a child process that has them set
(:mod:`.build_process`); the caller's process and environment are left as they were. ``native`` runs the
child with the caller's environment as it is: torch's own kernels for this CPU, a little faster on some
machines, and the same bits only on machines of the same kind.

This module imports nothing heavy: the CLI reads :data:`KERNELS` for its help.
"""

from __future__ import annotations

from collections.abc import Mapping

PORTABLE = "portable"
NATIVE = "native"
KERNELS = (PORTABLE, NATIVE)

#: threads while training: fixed, so that the same build gives the same bits on any machine size
TRAIN_THREADS = 1

#: what ``portable`` sets in the build's process (see the module docstring)
PORTABLE_ENVIRONMENT = {
    "ATEN_CPU_CAPABILITY": "default",
    "MKL_CBWR": "COMPATIBLE",
    "OMP_NUM_THREADS": str(TRAIN_THREADS),
    "MKL_NUM_THREADS": str(TRAIN_THREADS),
}


def build_environment(kernels: str, environment: Mapping[str, str]) -> dict[str, str]:
    """The environment of the build's child process: ``environment`` with the ``portable`` pins laid over
    it, or unchanged for ``native``."""
    if kernels not in KERNELS:
        raise ValueError(f"unknown kernel setting {kernels!r} (known: {', '.join(KERNELS)})")
    child = dict(environment)
    if kernels == PORTABLE:
        child.update(PORTABLE_ENVIRONMENT)
    return child
