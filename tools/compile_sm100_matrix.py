#!/usr/bin/env python3
"""Compile the sm_100f Mega MoE kernel for the full configuration matrix and print a table.

Matrix: both modes (mxf4xmxf4, fp8xfp4) x DeepSeek V4-Flash and V4-Pro shapes x token caps
(default 1920, 3840, 7680), one call of ``--tokens`` tokens per cap (default: the cap itself), on
``--num-sms`` SMs (default 148, a B200). Every configuration goes through the library's own
heuristics and JIT (``jmm_sm100_mega_config`` / ``jmm_sm100_mega_compile``), into a temporary
cache unless ``--cache`` is given. Compile-only: no B200 is needed (or was available).

Columns: the configuration, the tile choice, the wall seconds of the JIT compile (nvcc subprocess),
the cubin size, the registers per thread and stack frame read from the cubin's .nv.info
(EIATTR_REGCOUNT / EIATTR_FRAME_SIZE), and the spill stores/loads reported by ptxas (a second
``nvcc -Xptxas -v`` run of the same kernel.cu; ``--no-spills`` skips it). ``cuobjdump`` and
``nvdisasm`` are not needed.

    python tools/compile_sm100_matrix.py [--caps 1920,3840,7680] [--tokens cap|N] [--num-sms 148]
                                         [--modes M,..] [--shapes S,..] [--cache DIR]
                                         [--no-spills] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_ROOT))
sys.path.insert(0, str(_ROOT / "tests"))  # ffi_testing: the ctypes declarations of the C test API

import ffi_testing as ft  # noqa: E402
from jax_megamoe import _ffi, _toolchain  # noqa: E402

MODES = {"mxf4xmxf4": 2, "fp8xfp4": 1}
SHAPES = {
    "V4-Flash": dict(E=256, K=6, H=4096, I=2048),
    "V4-Pro": dict(E=384, K=6, H=7168, I=3072),
}
def cubin_resources(path: Path) -> tuple[int | None, int | None]:
    """(registers per thread, stack frame bytes) of the cubin's single kernel, from .nv.info."""
    d = path.read_bytes()
    shoff = struct.unpack_from("<Q", d, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", d, 0x3A)
    secs = [struct.unpack_from("<IIQQQQIIQQ", d, shoff + i * shentsize) for i in range(shnum)]
    strtab = secs[shstrndx][4]
    regs = frame = None
    for s in secs:
        name = d[strtab + s[0]: d.index(b"\0", strtab + s[0])]
        if name != b".nv.info":
            continue
        p, end = s[4], s[4] + s[5]
        while p < end:
            fmt, attr = d[p], d[p + 1]
            if fmt == 0x04:  # EIFMT_SVAL: u16 size, then the value
                size = struct.unpack_from("<H", d, p + 2)[0]
                if size == 8:
                    _, value = struct.unpack_from("<II", d, p + 4)
                    if attr == 0x2F:  # EIATTR_REGCOUNT
                        regs = value
                    elif attr == 0x11:  # EIATTR_FRAME_SIZE
                        frame = value if frame is None else max(frame, value)
                p += 4 + size
            elif fmt == 0x03:  # EIFMT_HVAL
                p += 4
            elif fmt == 0x01:  # EIFMT_NVAL
                p += 2
            else:
                break
    return regs, frame


def ptxas_spills(entry: Path) -> tuple[int, int] | None:
    """(spill store bytes, spill load bytes) from `nvcc -Xptxas -v` on the cached kernel.cu."""
    meta = json.loads((entry / "meta.json").read_text())
    argv = shlex.split(meta["command"])
    flags = argv[4:]  # nvcc <src> -o <out> <flags...>
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [argv[0], str(entry / "kernel.cu"), "-o", str(Path(tmp) / "k.cubin"), *flags, "-Xptxas", "-v"]
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp)
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", r.stdout + r.stderr)
    return (int(m.group(1)), int(m.group(2))) if m else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--caps", default="1920,3840,7680", help="token caps (multiples of 1920)")
    ap.add_argument("--tokens", default="cap", help="tokens of the call: 'cap' or a number (<= every cap)")
    ap.add_argument("--num-sms", type=int, default=148)
    ap.add_argument("--modes", default=",".join(MODES), help="subset of " + ",".join(MODES))
    ap.add_argument("--shapes", default=",".join(SHAPES), help="subset of " + ",".join(SHAPES))
    ap.add_argument("--cache", default="", help="JIT cache root (default: a fresh temporary folder)")
    ap.add_argument("--no-spills", action="store_true", help="skip the ptxas -v run for the spill columns")
    ap.add_argument("--json", default="", help="also write the rows as JSON here")
    args = ap.parse_args(argv)

    lib = _ffi.load_library()
    if lib is None:
        print(_ffi.library_reason(), file=sys.stderr)
        return 2
    tc, hd = _toolchain.find_nvcc(), _toolchain.find_deepgemm_headers()
    cache = args.cache or tempfile.mkdtemp(prefix="jmm_sm100_matrix_")
    _ffi.configure_jit(tc, hd, cache_dirs=cache, lib=lib)
    print(f"nvcc {tc.nvcc} ({tc.version[0]}.{tc.version[1]}), DeepGEMM headers {hd.version} ({hd.include_dir})")
    print(f"JIT cache: {cache}; {args.num_sms} SMs; sm_100f; compile-only (no B200 here)\n")

    rows, failures = [], 0
    modes = {m: MODES[m] for m in args.modes.split(",")}
    shapes = {n: SHAPES[n] for n in args.shapes.split(",")}
    for mode, kind in modes.items():
        for shape_name, s in shapes.items():
            for cap in (int(c) for c in args.caps.split(",")):
                t = cap if args.tokens == "cap" else int(args.tokens)
                shape = ft.mega_shape(lib, E=s["E"], P=cap, K=s["K"], H=s["H"], I=s["I"], kind=kind)
                call = ft.mega_call(lib, T=t, num_sms=args.num_sms, clamp=math.inf)
                try:
                    c = ft.mega_config(lib, 100, shape, call)
                except ValueError as e:
                    print(f"{mode} {shape_name} cap={cap}: {e}", file=sys.stderr)
                    failures += 1
                    continue
                t0 = time.perf_counter()
                try:
                    cubin_path, error = ft.mega_compile(lib, 100, shape, call), None
                except RuntimeError as e:
                    cubin_path, error = None, str(e)
                seconds = time.perf_counter() - t0
                row = dict(mode=mode, shape=shape_name, cap=cap, tokens=t, block_m=c["block_m"],
                           block_k=c["block_k"], store=f"{c['store_block_m_l1']}/{c['store_block_m_l2']}",
                           ring=c["num_ring_tokens"], sf_ring=c["num_sf_ring_tokens"], stages=c["num_stages"],
                           smem=c["smem_size"], seconds=round(seconds, 1))
                if error is not None:
                    row["error"] = error[-2000:]
                    failures += 1
                else:
                    cubin = Path(cubin_path)
                    regs, frame = cubin_resources(cubin)
                    row.update(cubin_bytes=cubin.stat().st_size, regs=regs, stack=frame)
                    if not args.no_spills:
                        sp = ptxas_spills(cubin.parent)
                        row["spills"] = f"{sp[0]}/{sp[1]}" if sp else "?"
                rows.append(row)
                print(f"  compiled {mode} {shape_name} cap={cap}: {row.get('error', 'ok')[:200]} ({seconds:.1f} s)",
                      flush=True)

    cols = ["mode", "shape", "cap", "tokens", "block_m", "block_k", "store", "ring", "sf_ring", "stages", "smem",
            "seconds", "cubin_bytes", "regs", "stack"] + ([] if args.no_spills else ["spills"])
    print()
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(k, "FAILED" if k == "cubin_bytes" else "")) for k in cols) + " |")
    total = sum(r["seconds"] for r in rows)
    print(f"\n{len(rows) - failures}/{len(rows)} compiled, {total:.1f} s of compiles")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
