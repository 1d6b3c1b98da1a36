"""How fast mergescope reads checkpoints, against the safetensors library on the same files.

Uses the Llama fixture (``llama_fixture.py``: a ~267M-parameter bf16 base and three fine-tunes, 2 shards
each; built on first use) and measures, from a warm page cache:

(a) floor       every tensor of all four models once, through ``safetensors.safe_open(..., "pt").get_tensor``
                (one file open at a time, tensors in model order), copied with ``.clone()``: safetensors
                (>= 0.6) returns a tensor viewing its memory map, so ``get_tensor`` alone reads nothing,
                and the copy makes it an owning in-memory tensor like ``Checkpoint.read``'s. Two more
                rows show ``get_tensor`` with every page faulted in but not copied (the least work that
                brings the bytes into the process) and ``get_tensor`` alone (lazy view, no data touched)
(b) mergescope  every tensor of all four through ``open_checkpoint(path).read(name)``, in
                ``tensor_names`` order (the timed loop includes opening, as (a) includes ``safe_open``)
(c) open        ``open_checkpoint`` of all four (headers only), next to ``safe_open`` + ``keys()`` of every shard
ref             ``os.preadv`` of every tensor's byte range into one reused buffer: the cost of copying
                the bytes out of the page cache with no allocation at all

Each part runs in a fresh child process, so its peak RSS (``ru_maxrss``) is its own; rounds alternate the
order of (a) and (b); the best of ``--repeats`` rounds is reported. The page cache is warmed by reading
every file once first (caches are not dropped), and every tensor mergescope reads is checked equal to
safetensors' before timing. Peak RSS is the child's ``VmHWM``, reset just before the part (so the
interpreter with torch imported is in it); "above start" subtracts the RSS at that moment. safetensors
maps the file, so its RSS includes the file pages it touched (shared page cache, not private memory).

    python benchmarks/read_checkpoints.py              # full size (builds ~2.1 GB under bench-out/ once)
    python benchmarks/read_checkpoints.py --scale 0.1  # quick run on a smaller fixture
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from llama_fixture import INDEX_NAME, MODELS, build, default_root  # noqa: E402

FLOORS = ("floor", "floor-touch", "floor-lazy")
PARTS = ("open", *FLOORS, "mergescope", "raw")
GB = 1e9


# --- child side: one measurement per process ---------------------------------------------------------

def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    """This process's RSS high-water mark (``VmHWM``; unlike ``ru_maxrss`` it does not inherit the
    parent's peak through fork + exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # pragma: no cover


def _reset_peak_rss() -> None:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0), so the peak is the part's own."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # pragma: no cover
        pass


def _natural_key(name: str) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


def _shards_in_order(model: Path) -> list[tuple[Path, list[str]]]:
    """Each shard of ``model`` with its tensor names in model order, shards in file-name order."""
    weight_map = json.loads((model / INDEX_NAME).read_text())["weight_map"]
    by_shard: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        by_shard.setdefault(shard, []).append(name)
    return [(model / s, sorted(by_shard[s], key=_natural_key)) for s in sorted(by_shard)]


def _child(part: str, models: list[Path], threads: int = 1) -> dict:
    import torch  # imported before the baseline RSS, like in every part

    # On this kind of small VM the scheduler sometimes puts OpenMP's worker thread on the main thread's
    # CPU, and then torch's parallel copies (clone) run 5-60x slower for the whole process, at random.
    # One thread keeps the floor stable, and like-for-like: Checkpoint.read copies in one thread too.
    torch.set_num_threads(threads)
    from safetensors import safe_open

    from mergescope.checkpoints import open_checkpoint

    nbytes = 0
    tensors = 0
    extra: dict = {}
    # the first torch op in a process pays one-off set-up (kernel dispatch, thread pool, ~0.3 s): pay it
    # outside the timed region, in every part alike
    warm = torch.zeros(1 << 16, dtype=torch.bfloat16)
    warm.clone().reshape(-1).view(torch.uint8)[::4096].sum()
    torch.frombuffer(bytearray(16), dtype=torch.bfloat16).reshape(2, 4)
    del warm
    _reset_peak_rss()
    rss_start = _rss_now()
    started = time.perf_counter()
    if part in FLOORS:
        # safetensors >= 0.6 returns a tensor that views its memory map, so get_tensor alone reads
        # nothing: "floor" copies into an owning tensor (what Checkpoint.read returns), "floor-touch"
        # only faults every page in (the least work that brings the data in), "floor-lazy" does neither
        for model in models:
            for shard, names in _shards_in_order(model):
                with safe_open(str(shard), framework="pt") as f:
                    for name in names:
                        t = f.get_tensor(name)
                        if part == "floor":
                            t = t.clone()
                        elif part == "floor-touch" and t.numel():
                            t.reshape(-1).view(torch.uint8)[::4096].sum()
                        nbytes += t.numel() * t.element_size()
                        tensors += 1
                        del t
    elif part == "mergescope":
        for model in models:
            checkpoint = open_checkpoint(model)
            for name in checkpoint.tensor_names:
                t = checkpoint.read(name)
                nbytes += t.numel() * t.element_size()
                tensors += 1
                del t
    elif part == "raw":
        from mergescope.checkpoints import read_header

        infos = [info for model in models for shard, _ in _shards_in_order(model)
                 for info in read_header(shard).tensors.values()]
        buf = memoryview(bytearray(max(i.nbytes for i in infos)))
        started = time.perf_counter()
        for info in infos:
            fd = os.open(info.file, os.O_RDONLY)
            try:
                done = 0
                while done < info.nbytes:
                    done += os.preadv(fd, [buf[done:info.nbytes]], info.offset + done)
            finally:
                os.close(fd)
            nbytes += info.nbytes
            tensors += 1
    elif part == "open":
        # a handful of opens: single ones take milliseconds, so keep the best of several
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            checkpoints = [open_checkpoint(model) for model in models]
            times.append(time.perf_counter() - t0)
        tensors = sum(len(c) for c in checkpoints)
        nbytes = sum(c.num_bytes for c in checkpoints)
        floor_times = []
        for _ in range(5):
            t0 = time.perf_counter()
            for model in models:
                for shard, _ in _shards_in_order(model):
                    with safe_open(str(shard), framework="pt") as f:
                        f.keys()
            floor_times.append(time.perf_counter() - t0)
        extra = {"open_first": times[0], "open_best": min(times), "safe_open_best": min(floor_times)}
    else:
        raise SystemExit(f"unknown part {part!r}")
    seconds = time.perf_counter() - started
    peak = _peak_rss()
    return {"part": part, "seconds": seconds, "bytes": nbytes, "tensors": tensors,
            "rss_start": rss_start, "peak_rss": peak, **extra}


def _verify(models: list[Path]) -> int:
    """Every tensor mergescope reads equals safetensors' (not timed); returns the number compared."""
    import torch
    from safetensors import safe_open

    from mergescope.checkpoints import open_checkpoint

    compared = 0
    for model in models:
        checkpoint = open_checkpoint(model)
        for shard, names in _shards_in_order(model):
            with safe_open(str(shard), framework="pt") as f:
                for name in names:
                    a, b = checkpoint.read(name), f.get_tensor(name)
                    if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
                        raise SystemExit(f"MISMATCH: {model.name} {name}")
                    compared += 1
    return compared


# --- parent side ----------------------------------------------------------------------------------------

def _run_child(part: str, root: Path, threads: int, thp: bool) -> dict:
    cmd = [sys.executable, __file__, "--child", part, "--root", str(root), "--torch-threads", str(threads)]
    env = dict(os.environ)
    if thp:
        env["THP_MEM_ALLOC_ENABLE"] = "1"
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"child {part} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _warm_cache(models: list[Path]) -> int:
    total = 0
    for model in models:
        for path in sorted(model.iterdir()):
            with open(path, "rb", buffering=0) as f:
                while chunk := f.read(64 << 20):
                    total += len(chunk)
    return total


def _mb(n: float) -> str:
    return f"{n / 1e6:,.0f} MB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="mergescope read speed against safetensors (see module doc)")
    parser.add_argument("--scale", type=float, default=1.0, help="fixture size, fraction of ~267M (default 1)")
    parser.add_argument("--root", type=Path, default=None, help="fixture folder (default bench-out/llama270m[-scaleS])")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; the best is reported (default 3)")
    parser.add_argument("--json", type=Path, default=None, help="also write every run's numbers here")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch intra-op threads in each measuring process (default 1; see _child)")
    parser.add_argument("--thp", action="store_true",
                        help="set THP_MEM_ALLOC_ENABLE=1 in the measuring processes: torch's allocator then "
                             "uses transparent huge pages, which speeds up clone() (the floor) but not "
                             "Checkpoint.read, whose buffers are bytearrays")
    parser.add_argument("--child", choices=PARTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    root = args.root or default_root(args.scale)

    if args.child:
        print(json.dumps(_child(args.child, [root / m for m in MODELS], args.torch_threads)))
        return 0

    paths = build(root, scale=args.scale)
    models = [paths[m] for m in MODELS]
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    warmed = _warm_cache(models)
    log(f"warmed page cache: {warmed / GB:.2f} GB in {time.perf_counter() - t0:.1f}s")
    compared = _verify(models)
    log(f"verified: {compared} tensors equal to safetensors'")

    runs: dict[str, list[dict]] = {p: [] for p in PARTS}
    for r in range(args.repeats):
        order = ["floor", "mergescope"] if r % 2 == 0 else ["mergescope", "floor"]
        for part in [*order, "floor-touch", "floor-lazy", "raw", "open"]:
            result = _run_child(part, root, args.torch_threads, args.thp)
            runs[part].append(result)
            log(f"round {r + 1}/{args.repeats}  {part:10s} {result['seconds']:.3f}s")

    best = {p: min(rs, key=lambda x: x["seconds"]) for p, rs in runs.items()}
    data_bytes = best["mergescope"]["bytes"]
    if best["floor"]["bytes"] != data_bytes or best["floor"]["tensors"] != best["mergescope"]["tensors"]:
        raise SystemExit("floor and mergescope read different amounts of data")

    import safetensors
    import torch

    manifest_shape = json.loads((root / "fixture.json").read_text())["shape"]
    nparams = best["open"]["bytes"] // 2 // len(models)
    print(f"fixture  {root}  (scale {args.scale:g}: {manifest_shape})")
    print(f"         4 models x {nparams / 1e6:.1f}M bf16 params = {data_bytes / GB:.2f} GB, "
          f"{best['mergescope']['tensors']} tensors, 8 shards")
    print(f"machine  {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"torch {torch.__version__}, safetensors {safetensors.__version__}")
    print(f"method   warm page cache; each run in a fresh process with {args.torch_threads} torch thread(s); "
          f"best of {args.repeats} (order of (a)/(b) alternates)"
          + ("; THP_MEM_ALLOC_ENABLE=1" if args.thp or os.environ.get("THP_MEM_ALLOC_ENABLE") else ""))
    print()
    header = f"{'':44s} {'best':>9s} {'GB/s':>6s}  {'all runs (s)':22s} {'peak RSS':>9s} {'above start':>11s}"
    print(header)
    print("-" * len(header))

    def row(label: str, part: str, seconds: float | None = None, gbps: bool = True) -> None:
        rs = runs[part]
        s = best[part]["seconds"] if seconds is None else seconds
        rate = f"{best[part]['bytes'] / s / GB:6.2f}" if gbps else f"{'':6s}"
        all_runs = " ".join(f"{x['seconds']:.3f}" for x in rs) if seconds is None else ""
        peak = max(x["peak_rss"] for x in rs)
        above = max(x["peak_rss"] - x["rss_start"] for x in rs)
        unit = f"{s:8.3f}s" if s >= 0.1 else f"{s * 1e3:7.2f}ms"
        print(f"{label:44s} {unit:>9s} {rate}  {all_runs:22s} {_mb(peak):>9s} {_mb(above):>11s}")

    row("(a) floor: safe_open().get_tensor().clone()", "floor")
    row("(b) mergescope: open_checkpoint().read()", "mergescope")
    row("    get_tensor(), fault in every page", "floor-touch")
    row("    get_tensor() alone (lazy mmap view)", "floor-lazy")
    row("    os.preadv into one reused buffer", "raw")
    open_best = min(x["open_best"] for x in runs["open"])
    row("(c) open_checkpoint x4 (headers only)", "open", seconds=open_best, gbps=False)
    safe_best = min(x["safe_open_best"] for x in runs["open"])
    print(f"{'    ref: safe_open + keys(), all 8 shards':44s} {safe_best * 1e3:7.2f}ms")
    print()
    ratio = best["mergescope"]["seconds"] / best["floor"]["seconds"]
    touch = best["mergescope"]["seconds"] / best["floor-touch"]["seconds"]
    print(f"mergescope / floor (a), read time: {ratio:.2f}x   "
          f"(vs get_tensor + fault in pages: {touch:.2f}x; "
          f"first open_checkpoint x4 in a process: {min(x['open_first'] for x in runs['open']) * 1e3:.2f} ms)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"root": str(root), "scale": args.scale, "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
