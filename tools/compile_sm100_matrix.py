#!/usr/bin/env python3
"""Compile the sm_100f Mega MoE kernel for the full configuration matrix and print a table.

Matrix: both modes (mxf4xmxf4, fp8xfp4) x DeepSeek V4-Flash and V4-Pro shapes x token caps
(default 1920, 3840, 7680) x ``--ranks`` (default 1), one call per token count of ``--tokens``
(default: the cap itself; a comma list, e.g. the decode buckets ``1,2,4,8,16,32,64,128,256``), on
``--num-sms`` SMs (default 148, a B200). The heuristics choose BLOCK_M (and with it the store rows
and stages) from the expected tokens per expert, ``T * ranks * top_k / E``, so a token sweep is the
sm_100 bucket table: token counts that share an instantiation share one cubin (the JIT cache serves
it: ``nvcc`` says whether this row ran the compiler, ``new`` whether its cubin is the first of its
kind in this run), and ``--buckets`` prints, per configuration, the token ranges of each distinct
instantiation. Every configuration goes through the library's own heuristics and JIT
(``jmm_sm100_mega_config`` / ``jmm_sm100_mega_compile``), into a temporary cache unless ``--cache``
is given. Compile-only: no B200 is needed (or was available).

Columns: the configuration, the tile choice, the wall seconds of the JIT compile (nvcc subprocess),
the cubin size, the registers per thread and stack frame read from the cubin's .nv.info
(EIATTR_REGCOUNT / EIATTR_FRAME_SIZE), and the spill stores/loads reported by ptxas (a second
``nvcc -Xptxas -v`` run of the same kernel.cu; ``--no-spills`` skips it). ``cuobjdump`` and
``nvdisasm`` are not needed.

    python -m tools.compile_sm100_matrix [--caps 1920,3840,7680] [--tokens cap|N,..] [--ranks R,..]
                                         [--num-sms 148] [--modes M,..] [--shapes S,..] [--cache DIR]
                                         [--no-spills] [--buckets] [--json OUT]

Run from the repository root (``tools`` and ``tests`` import as packages from there). A maintainer
tool over the library's C test API (``tests/ffi_testing.py``) and its kernel JIT, so it imports the
private ``jax_megamoe._src.kernels._ffi`` / ``_toolchain`` on purpose: nothing here is a user API.
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

from jax_megamoe._src.kernels import (  # the kernel JIT itself (see the docstring)
    _ffi,
    _toolchain,
)
from tests import ffi_testing as ft  # the ctypes declarations of the C test API

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
        name = d[strtab + s[0] : d.index(b"\0", strtab + s[0])]
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


def compile_row(
    lib,
    mode: str,
    kind: int,
    shape_name: str,
    s: dict[str, int],
    cap: int,
    ranks: int,
    t: int,
    args: argparse.Namespace,
    seen: set[str],
) -> dict | None:
    """One configuration's row (None when the heuristics refuse it); compiles or reuses its cubin."""
    shape = ft.mega_shape(lib, E=s["E"], P=cap, K=s["K"], H=s["H"], I=s["I"], ranks=ranks, kind=kind)
    call = ft.mega_call(lib, T=t, num_sms=args.num_sms, clamp=math.inf)
    try:
        c = ft.mega_config(lib, 100, shape, call)
    except ValueError as e:
        print(f"{mode} {shape_name} cap={cap} ranks={ranks} T={t}: {e}", file=sys.stderr)
        return None
    t0, before = time.perf_counter(), _ffi.jit_stats().compiles
    try:
        cubin_path, error = ft.mega_compile(lib, 100, shape, call), None
    except RuntimeError as e:
        cubin_path, error = None, str(e)
    seconds = time.perf_counter() - t0
    row = dict(
        nvcc=_ffi.jit_stats().compiles - before,
        mode=mode,
        shape=shape_name,
        cap=cap,
        ranks=ranks,
        tokens=t,
        per_expert=round(c["expected_tokens_per_expert"], 3),
        block_m=c["block_m"],
        block_k=c["block_k"],
        store=f"{c['store_block_m_l1']}/{c['store_block_m_l2']}",
        ring=c["num_ring_tokens"],
        sf_ring=c["num_sf_ring_tokens"],
        stages=c["num_stages"],
        smem=c["smem_size"],
        seconds=round(seconds, 1),
    )
    if error is not None:
        row["error"] = error[-2000:]
        print(f"  {mode} {shape_name} cap={cap} ranks={ranks} T={t}: FAILED ({seconds:.1f} s)", flush=True)
        return row
    cubin = Path(cubin_path)
    row["new"] = str(cubin) not in seen
    row["cubin"] = cubin.parent.name
    regs, frame = cubin_resources(cubin)
    row.update(cubin_bytes=cubin.stat().st_size, regs=regs, stack=frame)
    if not args.no_spills:
        if row["new"]:
            sp = ptxas_spills(cubin.parent)
            row["spills"] = f"{sp[0]}/{sp[1]}" if sp else "?"
        else:
            row["spills"] = "(same)"
    seen.add(str(cubin))
    print(
        f"  {mode} {shape_name} cap={cap} ranks={ranks} T={t}: BLOCK_M {c['block_m']}, "
        f"{'compiled' if row['nvcc'] else 'cached'} ({seconds:.1f} s)",
        flush=True,
    )
    return row


def print_buckets(rows: list[dict]) -> None:
    """Per (mode, shape, cap, ranks): the token range each distinct cubin serves."""
    print("\n| mode | shape | cap | ranks | tokens | BLOCK_M | store | stages | cubin |")
    print("|---|---|---|---|---|---|---|---|---|")
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if "cubin" in r:
            groups.setdefault((r["mode"], r["shape"], r["cap"], r["ranks"]), []).append(r)
    for key, rs in groups.items():
        spans: list[list] = []  # [first T, last T, row] per run of rows sharing a cubin
        for r in sorted(rs, key=lambda r: r["tokens"]):
            if spans and spans[-1][2]["cubin"] == r["cubin"]:
                spans[-1][1] = r["tokens"]
            else:
                spans.append([r["tokens"], r["tokens"], r])
        for lo, hi, r in spans:
            rng = str(lo) if lo == hi else f"{lo}-{hi}"
            print(
                f"| {' | '.join(map(str, key))} | {rng} | {r['block_m']} | {r['store']} | {r['stages']} | "
                f"{r['cubin'][-12:]} |"
            )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m tools.compile_sm100_matrix",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--caps", default="1920,3840,7680", help="token caps (multiples of 1920)")
    ap.add_argument("--tokens", default="cap", help="tokens of the call: 'cap' or numbers N,.. (each <= the cap)")
    ap.add_argument("--ranks", default="1", help="expert-parallel ranks R,.. (the kernel's num_ranks)")
    ap.add_argument("--buckets", action="store_true", help="also print the token ranges of each instantiation")
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

    rows, refused = [], 0  # refused: configurations the heuristics reject (no row)
    modes = {m: MODES[m] for m in args.modes.split(",")}
    shapes = {n: SHAPES[n] for n in args.shapes.split(",")}
    seen: set[str] = set()  # cubins already compiled (and measured) in this run
    for mode, kind in modes.items():
        for shape_name, s in shapes.items():
            for cap in (int(c) for c in args.caps.split(",")):
                for ranks in (int(r) for r in args.ranks.split(",")):
                    tokens = [cap] if args.tokens == "cap" else [int(t) for t in args.tokens.split(",")]
                    for t in tokens:
                        row = compile_row(lib, mode, kind, shape_name, s, cap, ranks, t, args, seen)
                        if row is None:
                            refused += 1
                        else:
                            rows.append(row)

    cols = [
        "mode",
        "shape",
        "cap",
        "ranks",
        "tokens",
        "per_expert",
        "block_m",
        "block_k",
        "store",
        "ring",
        "sf_ring",
        "stages",
        "smem",
        "new",
        "nvcc",
        "seconds",
        "cubin_bytes",
        "regs",
        "stack",
    ]
    cols += [] if args.no_spills else ["spills"]
    print()
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(k, "FAILED" if k == "cubin_bytes" else "")) for k in cols) + " |")
    total = sum(r["seconds"] for r in rows)
    new = sum(1 for r in rows if r.get("new"))
    compiled = sum(1 for r in rows if "cubin" in r)
    print(
        f"\n{compiled}/{len(rows) + refused} configurations compiled ({new} distinct cubins), {total:.1f} s of compiles"
    )
    if args.buckets:
        print_buckets(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 1 if compiled < len(rows) + refused else 0


if __name__ == "__main__":
    sys.exit(main())
