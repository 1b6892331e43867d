"""What verifying a converted layer costs: ``load_converted(verify=True)`` vs ``verify=False``.

A synthetic converted V4-Flash layer in mode ``fp8`` (random bytes; the hash does not care):
``experts.l1`` F8_E4M3 [256, 4096, 4096] (4 GiB), ``experts.l2`` [256, 4096, 2048] (2 GiB), their
per-128 F32 scales, the gate and the shared expert: about 6.5 GB, written with the converter's
safetensors writer. Timed (the part of the load that differs between the
two settings; building the MoELayer afterwards is the same for both):

  verify, threaded     the verified read: one sequential pass into fresh arrays, a worker
                       thread hashing each chunk while the next is read (the default)
  verify, one thread   the same, hashing inline
  no verify (mmap+copy)
                       what verify=False does: memory-map, np.array copy of every tensor
  sha256 of the file   hashlib.file_digest: what check_converted / the CLI re-run pays per layer
  sha256 in memory     raw SHA-256 throughput on a 1 GiB buffer (no I/O)

each with the file in the page cache ("warm") and, where the kernel honours
``posix_fadvise(DONTNEED)``, evicted first ("cold": read from the disk). ``--experts N`` (default
256) scales the layer down when memory or disk is short; seconds per V4-Flash layer are then
scaled linearly from the measured throughput. The temporary file is deleted at the end.

    python -m benchmarks.convert_verify_cost [--experts 256] [--repeats 2] [--dir /tmp] [--no-cold]

This measures a choice inside the converter (hash in a worker thread or inline), so it reaches the
converter's private reader and writer (``jax_megamoe._src.io.convert``): the one benchmark besides
``ffi_overhead`` that does, on purpose; the public ``jax_megamoe.convert`` has neither.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import os
import platform
import shutil
import ssl
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from benchmarks import _common as C
from jax_megamoe._src.io import convert  # the private reader / writer this measures (see the docstring)
from jax_megamoe.checkpoint import SafetensorsFile

REPO = C.REPO

HIDDEN, INTER, EXPERTS = 4096, 2048, 256  # V4-Flash
F8 = np.dtype(ml_dtypes.float8_e4m3fn)


def layer_shapes(experts: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """The tensors of a converted fp8 V4-Flash layer (``experts`` routed experts)."""
    h, i, s = HIDDEN, INTER, INTER  # shared intermediate = moe_intermediate * 1 shared expert
    e8m0 = np.dtype(ml_dtypes.float8_e8m0fnu)
    return {
        "experts.l1": ((experts, 2 * i, h), F8),
        "experts.l1_sf": ((experts, 2 * i // 128, h // 128), np.dtype(np.float32)),
        "experts.l2": ((experts, h, i), F8),
        "experts.l2_sf": ((experts, h // 128, i // 128), np.dtype(np.float32)),
        "gate.weight": ((EXPERTS, h), np.dtype(ml_dtypes.bfloat16)),
        "gate.bias": ((EXPERTS,), np.dtype(np.float32)),
        "shared_experts.w1.weight": ((s, h), F8),
        "shared_experts.w1.scale": ((s // 128, h // 128), e8m0),
        "shared_experts.w2.weight": ((h, s), F8),
        "shared_experts.w2.scale": ((h // 128, s // 128), e8m0),
        "shared_experts.w3.weight": ((s, h), F8),
        "shared_experts.w3.scale": ((s // 128, h // 128), e8m0),
    }


def layer_bytes(experts: int) -> int:
    return sum(int(np.prod(shape)) * dt.itemsize for shape, dt in layer_shapes(experts).values())


def random_tensors(experts: int, seed: int = 0) -> dict[str, np.ndarray]:
    block = np.random.default_rng(seed).integers(0, 256, 64 << 20, dtype=np.uint8)
    out = {}
    for name, (shape, dt) in layer_shapes(experts).items():
        a = np.empty(shape, dt)
        flat = a.reshape(-1).view(np.uint8)
        for s in range(0, flat.size, block.size):
            n = min(block.size, flat.size - s)
            flat[s : s + n] = block[:n]  # a repeated block: neither SHA-256 nor the disk cares
        out[name] = a
    return out


def evict(path: str) -> bool:
    """Drop ``path`` from the page cache (this file only); False where unsupported."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True


def timed(fn: Callable[[], Any], repeats: int, before: Callable[[], Any] | None = None) -> list[float]:
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        gc.collect()
        t0 = time.perf_counter()
        r = fn()
        times.append(time.perf_counter() - t0)
        del r
        gc.collect()
    return times


def sha256_in_memory(nbytes: int, repeats: int) -> list[float]:
    buf = np.random.default_rng(1).integers(0, 256, nbytes, dtype=np.uint8)
    return timed(lambda: hashlib.sha256(memoryview(buf)).hexdigest(), repeats)


def machine() -> dict[str, Any]:
    model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        pass
    return {
        "cpu": model or platform.processor(),
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_bytes": mem,
        "sha_ni": "sha_ni" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else None,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "openssl": ssl.OPENSSL_VERSION,
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.convert_verify_cost``."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.convert_verify_cost", description=__doc__.split("\n")[0])
    p.add_argument("--experts", type=int, default=EXPERTS, help="routed experts in the file (256 = V4-Flash)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--dir", default=tempfile.gettempdir(), help="where the temporary layer file goes")
    p.add_argument("--no-cold", action="store_true", help="skip the page-cache-evicted runs")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "convert_verify_cost.json")
    args = p.parse_args(argv)

    size = layer_bytes(args.experts)
    free = shutil.disk_usage(args.dir).free
    if free < size * 1.2:
        sys.exit(f"{args.dir}: {free / 1e9:.1f} GB free, the layer needs {size / 1e9:.1f} GB: pass a smaller --experts")
    work = tempfile.mkdtemp(prefix="convert_verify_cost.", dir=args.dir)
    path = os.path.join(work, "layer_003.safetensors")
    results: dict[str, Any] = {}
    try:
        C.log(f"writing a {size / 1e9:.2f} GB layer ({args.experts} experts) to {path}")
        tensors = random_tensors(args.experts)
        t0 = time.perf_counter()
        nbytes, sha = convert.write_safetensors(path, tensors, convert._binding(3, "fp8", "f" * 64))
        write_s = time.perf_counter() - t0
        del tensors
        gc.collect()
        C.log(f"wrote {nbytes / 1e9:.2f} GB in {write_s:.1f}s")

        def verified(threaded: bool) -> Callable[[], Any]:
            return lambda: convert._read_verified(SafetensorsFile(path), sha, "bench", threaded=threaded)

        def unverified() -> dict[str, np.ndarray]:
            sf = SafetensorsFile(path)
            return {n: np.array(sf.get(n)) for n in sf.tensors}

        def file_sha() -> str:
            with open(path, "rb") as f:
                got = hashlib.file_digest(f, "sha256").hexdigest()
            assert got == sha
            return got

        results["sha256 in memory"] = {"warm": {"times_s": sha256_in_memory(1 << 30, args.repeats), "bytes": 1 << 30}}
        methods = {
            "verify, threaded": verified(True),
            "verify, one thread": verified(False),
            "no verify (mmap+copy)": unverified,
            "sha256 of the file": file_sha,
        }
        cold_ok = not args.no_cold and evict(path)
        for name, fn in methods.items():
            fn()  # first touch of the allocator / page cache, not timed
            results[name] = {"warm": {"times_s": timed(fn, args.repeats), "bytes": nbytes}}
            if cold_ok:
                results[name]["cold"] = {
                    "times_s": timed(fn, args.repeats, before=lambda: evict(path)),
                    "bytes": nbytes,
                }
            C.log(f"{name}: done")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    flash = layer_bytes(EXPERTS)
    rows = []
    for name, by_cache in results.items():
        for cache, r in by_cache.items():
            best = min(r["times_s"])
            gbps = r["bytes"] / best / 1e9
            r.update(best_s=best, gb_per_s=gbps, s_per_v4_flash_layer=flash / (gbps * 1e9))
            rows.append((name, cache, best, gbps, r["s_per_v4_flash_layer"]))
    base = {c: results["no verify (mmap+copy)"][c]["best_s"] for c in results["no verify (mmap+copy)"]}
    for c in base:
        results["verify, threaded"][c]["over_no_verify"] = results["verify, threaded"][c]["best_s"] / base[c]
    out = {
        "benchmark": "convert_verify_cost",
        "utc": C.utc_now(),
        "command": C.command_line(),
        "machine": machine(),
        "file_bytes": nbytes,
        "experts": args.experts,
        "v4_flash_layer_bytes": flash,
        "scaled_from_fewer_experts": args.experts != EXPERTS,
        "write_s": write_s,
        "cold_runs": cold_ok,
        "chunk_bytes": convert._CHUNK,
        "results": results,
    }
    C.write_json(args.out, out)
    m = out["machine"]
    print(
        f"\n{m['cpu']}, nproc {m['nproc']}, {nbytes / 1e9:.2f} GB file ({args.experts} experts), best of {args.repeats}"
    )
    print(f"{'':24s} {'cache':5s} {'seconds':>8s} {'GB/s':>6s} {'s / V4-Flash layer':>19s}")
    for name, cache, best, gbps, per_layer in rows:
        print(f"{name:24s} {cache:5s} {best:8.2f} {gbps:6.2f} {per_layer:19.2f}")
    for c in base:
        print(f"verify (threaded) / no verify, {c}: {results['verify, threaded'][c]['over_no_verify']:.2f}x")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
