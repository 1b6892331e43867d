"""PNG plots and markdown tables from the benchmark JSON files, and benchmarks/RESULTS.md.

``python -m benchmarks.report`` rebuilds RESULTS.md from ``benchmarks/results/*.json``: one section
per card and date (newest first), each holding that day's runs on that card, rendered by the
script that wrote them; the ``moe_layer`` runs of one card and day that ran with the default policy
are merged into one table per model (their points side by side, a point no run measured left out
and listed under "Not run"). Runs with a non-default policy (e.g. the opt-in wide tile) get their
own table. Everything from the ``## History`` heading on is hand-written and kept as it is.

    python -m benchmarks.report                 # rewrite benchmarks/RESULTS.md (+ merged PNGs)
    python -m benchmarks.report --check         # exit 1 when RESULTS.md is not what the JSON gives

A JSON file may carry an ``"annotation"`` object added by hand after the run (``date`` when the run
recorded none, ``variant`` when it ran with a setting the JSON does not show); it is shown as such.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import _common as C

RESULTS_MD = C.REPO / "benchmarks" / "RESULTS.md"
HISTORY_HEADING = "## History"

# =============================================================================================
# moe_layer: the PNG and the tables
# =============================================================================================

#: Line style per path (decode_step adds its forced-kernel rows).
STYLE = {
    "ffi": dict(color="black", lw=2.5, marker="o"),
    "xla_gather": dict(color="tab:blue", marker="v"),
    "xla_capacity": dict(color="tab:orange", marker="s"),
    "xla_ragged": dict(color="tab:green", marker="D"),
    "xla_ragged_cudnn": dict(color="darkgreen", marker="D", ls="--"),
    "xla_ragged_triton": dict(color="lime", marker="D", ls="--"),
    "tokamax_ragged": dict(color="tab:olive", marker="P"),
    "fp8w_gather": dict(color="tab:purple", marker="v", ls=":"),
    "fp8w_capacity": dict(color="tab:brown", marker="s", ls=":"),
    "fp8_gather": dict(color="tab:pink", marker="v", ls="-."),
    "fp8_capacity": dict(color="tab:cyan", marker="s", ls="-."),
    "fp8_ragged": dict(color="tab:red", marker="D", ls="-."),
    "reference": dict(color="tab:gray", marker="x"),
}


def _path_order(result: dict[str, Any]) -> list[str]:
    """Path names in the order the sweep lists them (the JSON's ``paths`` table)."""
    return list(result.get("paths") or STYLE)


def plot(result: dict[str, Any], path: Path) -> None:
    """``result``'s time per layer call vs T, one panel per model, with the FP8 and bf16 floors."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {n: p.get("label", n) for n, p in (result.get("paths") or {}).items()}
    models = [m for m in result["models"] if any("paths" in q for q in m["points"])]
    n = max(1, len(models))
    fig, axes = plt.subplots(1, n, figsize=(7.5 * n, 5.6), squeeze=False)
    for ax, m in zip(axes[0], models):
        pts = sorted((p for p in m["points"] if "paths" in p), key=lambda p: p["tokens"])
        for name in _path_order(result):
            xs, ys, lo, hi = [], [], [], []
            for p in pts:
                r = p["paths"].get(name)
                if r and r["status"] == "ok":
                    xs.append(p["tokens"])
                    ys.append(r["median_s"] * 1e6)
                    lo.append(r["p10_s"] * 1e6)
                    hi.append(r["p90_s"] * 1e6)
            if xs:
                st = dict(STYLE.get(name, {}))
                ax.plot(xs, ys, label=labels.get(name, name), ms=4, **st)
                ax.fill_between(xs, lo, hi, color=st.get("color"), alpha=0.12, lw=0)
        for key, lab, col in (
            ("fp8_weights_fp8_mma", "floor, FP8 weights + FP8 MMA", "black"),
            ("bf16_weights_bf16_mma", "floor, bf16 weights + bf16 MMA", "tab:green"),
        ):
            xs = [p["tokens"] for p in pts]
            ys = [p["floors"][key]["floor_s"] * 1e6 for p in pts]
            if xs:
                ax.plot(xs, ys, ls="--", color=col, lw=1.2, alpha=0.8, label=lab, marker="_", ms=14)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ts = sorted({p["tokens"] for p in pts})
        if ts:
            ax.set_xticks(ts, [str(t) for t in ts])
        ax.set_xlabel("tokens T")
        ax.set_ylabel("time per layer call (us), median; band p10-p90")
        title = f"{m['name']}: H={m['hidden']} I={m['intermediate']} E={m['num_experts']} K={m['top_k']}"
        if m["num_experts"] != m["full_experts"]:
            title += f" (of {m['full_experts']})"
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best", framealpha=0.7)
    dev = result.get("device", {})
    fig.suptitle(f"routed-expert layer on {dev.get('kind', '?')} ({str(result.get('date', ''))[:10]})", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def merge_moe_layer(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Several moe_layer results of one card as one: per model (name and E), every measured point
    of every run by T (a later run's point wins a tie); ``sources`` lists the runs. A point no run
    measured stays as its skip record (the table lists it under "Not run")."""
    if len(runs) == 1:
        return runs[0]
    runs = sorted(runs, key=lambda r: r.get("date") or "")
    out = copy.deepcopy(runs[-1])
    out["sources"] = [_run_header(r) for r in runs]
    paths: dict[str, Any] = {}
    models: dict[tuple[str, int], dict[str, Any]] = {}
    for r in runs:
        paths.update(r.get("paths") or {})
        for m in r["models"]:
            key = (m["name"], m.get("num_experts", 0))
            if key not in models:
                models[key] = {**copy.deepcopy(m), "points": []}
            have = {q["tokens"]: i for i, q in enumerate(models[key]["points"])}
            for q in m["points"]:
                if q["tokens"] in have:
                    if "paths" in q or "paths" not in models[key]["points"][have[q["tokens"]]]:
                        models[key]["points"][have[q["tokens"]]] = copy.deepcopy(q)
                else:
                    models[key]["points"].append(copy.deepcopy(q))
    for m in models.values():
        m["points"].sort(key=lambda q: q["tokens"])
    out["paths"] = paths
    out["models"] = [models[k] for k in sorted(models)]
    return out


def _run_header(result: dict[str, Any]) -> dict[str, Any]:
    """What a merged table says about each of its runs."""
    return {k: result.get(k) for k in ("date", "command", "device", "versions", "ceilings", "_file")}


def _versions_line(ver: dict[str, Any]) -> str:
    return (
        f"jax {ver.get('jax')}, jaxlib {ver.get('jaxlib')}, jax_megamoe {ver.get('jax_megamoe')}"
        + (f" (git {ver['git_head']})" if ver.get("git_head") else "")
        + (f", tokamax {ver['tokamax']}" if ver.get("tokamax") else "")
        + (f", {ver['platform_version']}" if ver.get("platform_version") else "")
    )


def _ceilings_line(ceil: dict[str, Any]) -> str:
    return (
        f"HBM {C.fmt_rate(ceil['hbm_bytes_per_s'], 'B/s')}; bf16 matmul {C.fmt_rate(ceil['bf16_flops_per_s'], 'FLOP/s')}; "
        "FP8 matmul "
        + (
            C.fmt_rate(ceil["fp8_flops_per_s"], "FLOP/s")
            if ceil.get("fp8_flops_per_s")
            else str(ceil.get("fp8_method"))
        )
    )


def results_markdown(result: dict[str, Any], png: str | None = None, title: str | None = None) -> str:
    """The moe_layer tables of one result (or of :func:`merge_moe_layer`'s merged one); ``png``:
    the plot's path relative to the markdown file. Points that did not run get no column."""
    dev, ceil = result["device"], result["ceilings"]
    tol = result.get("tolerances") or {}
    lines = [title or "## Routed-expert layer sweep (`python -m benchmarks.moe_layer`)", ""]
    if result.get("sources"):
        lines.append(
            f"- device: **{dev.get('kind')}** ({dev.get('platform')}); {len(result['sources'])} runs, merged by T:"
        )
        for s in result["sources"]:
            lines.append(
                f"  - {s.get('date')}"
                + (f", `results/{s['_file']}`" if s.get("_file") else "")
                + f": `{s.get('command')}`; {_versions_line(s.get('versions') or {})}; ceilings {_ceilings_line(s['ceilings'])}"
            )
    else:
        lines += [
            f"- device: **{dev.get('kind')}** ({dev.get('platform')}), date {result.get('date')}"
            + (f", `results/{result['_file']}`" if result.get("_file") else ""),
            f"- versions: {_versions_line(result.get('versions') or {})}",
            f"- command: `{result.get('command')}`",
            f"- measured ceilings: {_ceilings_line(ceil)} ({ceil.get('hbm_method')})",
        ]
    variant = run_variant(result)
    if variant:
        lines.append(f"- **variant: {variant}**")
    if result.get("shrink_note"):
        lines.append(f"- **{result['shrink_note']}**")
    if tol:
        lines.append(
            f"- checks: {result.get('check_rows', 64)} rows per point, relative L2, against the f32 oracle (bf16-activation "
            f"paths, tol {tol['bf16_vs_f32']:g}) or the reference (FP8-activation paths, tol {tol['fp8_vs_reference']:g})"
        )
    lines += [
        "- cells: median time per layer call (time / roofline floor of that path's weight format and MMA type); "
        "`-`: not run, reasons below. Timing: " + str(result.get("timing_method", "")),
        "",
    ]
    if png:
        lines += [f"![time per layer call vs tokens]({png})", ""]
    skips: dict[tuple[str, str], list[str]] = {}
    fails: list[str] = []
    order = _path_order(result)
    for m in result["models"]:
        if "error" in m:
            lines += [f"### {m['name']}", "", f"*failed: {m['error']}*", ""]
            continue
        head = f"### {m['name']}: H={m['hidden']}, I={m['intermediate']}, E={m['num_experts']}, K={m['top_k']}"
        lines.append(head)
        if m.get("e_note"):
            lines.append(f"\n*{m['e_note']}*")
        lines.append("")
        pts = [q for q in m["points"] if "paths" in q]
        for q in m["points"]:
            if "paths" not in q:
                skips.setdefault(("every path", q.get("skipped", "not run")), []).append(f"{m['name']} T={q['tokens']}")
        if not pts:
            lines += ["*No point ran.*", ""]
            continue
        lines.append("| | " + " | ".join(f"T={q['tokens']}" for q in pts) + " |")
        lines.append("|---|" + "---:|" * len(pts))

        def row(
            label: str, fn: Callable[[dict[str, Any]], str], pts: list[dict[str, Any]] = pts, lines: list[str] = lines
        ) -> None:
            lines.append(f"| {label} | " + " | ".join(fn(q) for q in pts) + " |")

        row("experts hit", lambda q: f"{q['distinct_experts']:.1f}")
        row("floor FP8 (fp8 MMA)", lambda q: C.fmt_time(q["floors"]["fp8_weights_fp8_mma"]["floor_s"]))
        row("floor bf16", lambda q: C.fmt_time(q["floors"]["bf16_weights_bf16_mma"]["floor_s"]))
        names = [n for n in order if any(n in q["paths"] for q in pts)]
        for n in names:

            def cell(q: dict[str, Any], n: str = n, model: str = m["name"]) -> str:
                r = q["paths"].get(n, {})
                if r.get("status") == "ok":
                    mark = "" if r["check"]["pass"] else " **check FAIL**"
                    if not r["check"]["pass"]:
                        fails.append(
                            f"{model} T={q['tokens']} {n}: rel L2 {r['check']['rel_l2']:.3g} > {r['check']['tol']:g}"
                        )
                    return f"{C.fmt_time(r['median_s'])} ({r['time_over_floor']:.1f}x){mark}"
                if r.get("reason"):
                    skips.setdefault((n, r["reason"]), []).append(f"{model} T={q['tokens']}")
                elif not r:
                    skips.setdefault((n, "not asked for in this run (--paths)"), []).append(f"{model} T={q['tokens']}")
                return "-" if r.get("status") != "failed" else "failed"

            row(f"`{n}`", cell)
        if any(q["paths"].get("ffi", {}).get("status") == "ok" for q in pts):

            def acc(q: dict[str, Any], key: str) -> str:
                r = q["paths"].get("ffi", {})
                v = (r.get("check") or {}).get(key) if r.get("status") == "ok" else None
                return "-" if v is None else f"{v:.2e}"

            # the kernel against the reference it follows, and against exact f32 math (which differs by
            # the FP8 activation rounding that both share)
            row("`ffi` rel. L2 vs reference", lambda q: acc(q, "rel_l2"))
            row("`ffi` rel. L2 vs f32", lambda q: acc(q, "rel_l2_vs_f32"))
        row(
            "**best XLA**",
            lambda q: (
                f"`{q['best']['best_xla_any']}` {C.fmt_time(q['best']['best_xla_any_s'])}"
                if q["best"].get("best_xla_any")
                else "-"
            ),
        )
        row("best XLA bf16 (b)", lambda q: f"`{q['best']['best_xla_bf16']}`" if q["best"].get("best_xla_bf16") else "-")
        row(
            "**FFI speed-up**",
            lambda q: (
                f"{q['best']['ffi_speedup_vs_best_xla']:.2f}x" if q["best"].get("ffi_speedup_vs_best_xla") else "-"
            ),
        )
        lines.append("")
    if fails:
        lines += ["### Check failures", ""] + [f"- {f}" for f in fails] + [""]
    if skips:
        lines += ["### Not run or failed", ""]
        for (n, why), where in sorted(skips.items()):
            lines.append(
                f"- `{n}` ({', '.join(where)}): {why}" if n != "every path" else f"- {', '.join(where)}: {why}"
            )
        lines.append("")
    return "\n".join(lines)


def summary_table(result: dict[str, Any]) -> str:
    """A few lines per model for the terminal: best XLA path and the FFI's time per point."""
    rows = []
    for m in result["models"]:
        for q in m["points"]:
            if "paths" not in q:
                continue
            b = q["best"]
            ffi = q["paths"].get("ffi", {})
            rows.append(
                f"{m['name']:9s} T={q['tokens']:5d}  best XLA {b.get('best_xla_any') or '-':15s} "
                f"{C.fmt_time(b.get('best_xla_any_s')):>10s}   ffi "
                + (C.fmt_time(ffi["median_s"]) if ffi.get("status") == "ok" else f"({ffi.get('status', '-')})")
            )
    return "\n".join(rows)


def render_moe_layer(result: dict[str, Any], out: Path, write_results: str | os.PathLike | None = None) -> None:
    """``moe_layer.png`` in ``out`` and, with ``write_results``, the ``moe_layer`` section of that
    markdown file (linking the PNG)."""
    png = Path(out) / "moe_layer.png"
    try:
        plot(result, png)
        C.log(f"wrote {png}")
    except Exception as e:  # noqa: BLE001 - the JSON and the table are worth more than the plot
        C.log(f"plot failed: {type(e).__name__}: {e}")
    if write_results:
        md = Path(write_results)
        rel = os.path.relpath(png.resolve(), md.resolve().parent) if png.is_file() else None
        C.replace_section(md, "moe_layer", results_markdown(result, rel))
        C.log(f"wrote the moe_layer section of {md}")


# =============================================================================================
# RESULTS.md: every JSON of benchmarks/results, one section per card and date
# =============================================================================================

#: Everything after this line of RESULTS.md is hand-written (runs without JSON, history) and kept.
KEEP_MARKER = "<!-- Hand-written from here on; python -m benchmarks.report keeps it as it is. -->"

INTRO = """# Benchmark results

Generated by `python -m benchmarks.report` from the JSON files in [`results/`](results) (do not
edit above the hand-written part at the end; rerun the command instead). One section per card and
date, newest first; in each, the runs of that day on that card. How to run the benchmarks, what
each path is and how the floors are computed: [README.md](README.md). Runs that left no JSON and
the history of the numbers are at the end."""

TITLES = {
    "ep_step": "## Expert parallelism, one layer step over several GPUs (`python -m benchmarks.ep_step`)",
    "ep_recv_sim": "## Collective EP path on a simulated receive buffer (`python -m benchmarks.ep_recv_sim`)",
    "small_t_probe": "## Single-GPU kernel at decode-size T (`python -m benchmarks.small_t_probe`)",
    "convert_verify_cost": "## Cost of verifying a converted layer (`python -m benchmarks.convert_verify_cost`)",
    "model_step": "## Whole-model steps, attention / MoE / rest (`python -m benchmarks.model_step`)",
}


def run_kind(result: dict[str, Any], path: Path) -> str:
    """Which benchmark wrote ``result``: its schema's name, its ``benchmark`` key, or the file stem."""
    m = re.match(r"jax_megamoe\.benchmarks\.(\w+)/", str(result.get("schema", "")))
    if m:
        return m.group(1)
    if result.get("benchmark"):
        return str(result["benchmark"])
    for kind in (
        "small_t_probe",
        "convert_verify_cost",
        "moe_layer",
        "decode_step",
        "ep_step",
        "ep_recv_sim",
        "ffi_overhead",
    ):
        if path.stem.startswith(kind):
            return kind
    return path.stem


def run_date(result: dict[str, Any]) -> str:
    """``YYYY-MM-DD`` of the run (an annotation's date when the run recorded none)."""
    ann = result.get("annotation") or {}
    d = result.get("date") or result.get("created") or result.get("utc") or ann.get("date")
    return str(d)[:10] if d else "date not recorded"


def run_card(result: dict[str, Any]) -> str:
    """The device a run measured: the GPU's name, or the CPU machine of a host-only benchmark."""
    dev = result.get("device")
    if isinstance(dev, dict) and dev.get("kind"):
        return str(dev["kind"]) if dev.get("platform") != "cpu" else f"CPU ({dev['kind']})"
    mach = result.get("machine") or {}
    return f"CPU: {mach.get('cpu', '?')}, {mach.get('nproc', '?')} cores" if mach else "unknown device"


def run_variant(result: dict[str, Any]) -> str:
    """Why a run is not the headline configuration ('' when it is): an annotated variant, or the
    policy fields it ran with that differ from the defaults."""
    ann = result.get("annotation") or {}
    if ann.get("variant"):
        return f"{ann['variant']} (annotated after the run)"
    nd = ((result.get("versions") or {}).get("policy") or {}).get("non_default") or {}
    parts = [f"policy {', '.join(f'{k}={v}' for k, v in nd.items())}"] if nd else []
    cap = (result.get("args") or {}).get("ffi_num_max_tokens")
    if cap:  # not each point's own T: larger T run the kernel in chunks of this cap
        parts.append(f"ffi buffer cap {cap} (--ffi-num-max-tokens; larger T in chunks of it)")
    return "; ".join(parts)


def _demote(md: str) -> str:
    """Every markdown heading one level down (a script's ``## X`` becomes ``### X``)."""
    return "\n".join(("#" + ln) if ln.startswith("#") else ln for ln in md.splitlines())


def _convert_verify_markdown(result: dict[str, Any]) -> str:
    m = result.get("machine") or {}
    lines = [
        TITLES["convert_verify_cost"],
        "",
        f"- {m.get('cpu')}, {m.get('nproc')} cores, {m.get('openssl')}; {result['file_bytes'] / 1e9:.2f} GB layer file "
        f"({result['experts']} experts), best of the repeats; `{result.get('command')}`",
        "",
        "| method | page cache | best | GB/s | s per V4-Flash layer |",
        "|---|---|---:|---:|---:|",
    ]
    for name, by_cache in result["results"].items():
        for cache, r in by_cache.items():
            lines.append(
                f"| {name} | {cache} | {r['best_s']:.2f} s | {r['gb_per_s']:.2f} | {r['s_per_v4_flash_layer']:.2f} |"
            )
    ratios = [
        f"{c}: {r['over_no_verify']:.2f}x"
        for c, r in result["results"].get("verify, threaded", {}).items()
        if "over_no_verify" in r
    ]
    if ratios:
        lines += ["", "Verified (threaded) over unverified load: " + ", ".join(ratios) + "."]
    return "\n".join(lines)


def _renderer(kind: str) -> Callable[[dict[str, Any], str | None], str] | None:
    """The function that renders one run of ``kind`` as markdown (png link or None)."""
    if kind == "decode_step":
        from benchmarks import decode_step

        return decode_step.results_markdown
    if kind == "ffi_overhead":
        from benchmarks import ffi_overhead

        return lambda r, png: ffi_overhead.results_markdown(r)
    if kind in ("ep_step", "ep_recv_sim", "small_t_probe"):
        import importlib

        mod = importlib.import_module(f"benchmarks.{kind}")
        return lambda r, png: TITLES[kind] + "\n\n" + mod.table(r) + (f"\n\n![{kind}]({png})" if png else "")
    if kind == "convert_verify_cost":
        return lambda r, png: _convert_verify_markdown(r)
    if kind == "model_step":
        from benchmarks import model_step

        return model_step.results_markdown
    return None


def load_runs(folder: Path) -> list[dict[str, Any]]:
    """Every ``*.json`` of ``folder`` with ``_file``, ``_kind``, ``_card`` and ``_date`` added."""
    runs = []
    for path in sorted(Path(folder).glob("*.json")):
        r = json.loads(path.read_text())
        r.update(_file=path.name, _kind=run_kind(r, path), _card=run_card(r), _date=run_date(r))
        runs.append(r)
    return runs


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", s.lower()).strip("_")


KIND_ORDER = (
    "moe_layer",
    "decode_step",
    "model_step",
    "ffi_overhead",
    "small_t_probe",
    "ep_step",
    "ep_recv_sim",
    "convert_verify_cost",
)


def build(folder: Path = C.RESULTS_DIR, md_path: Path = RESULTS_MD, *, draw: bool = True) -> str:
    """The text of RESULTS.md from the JSON files in ``folder`` (the hand-written tail of the
    existing ``md_path`` kept); ``draw``: (re)draw the merged moe_layer PNGs in ``folder``."""
    runs = load_runs(folder)
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["_card"], r["_date"]), []).append(r)

    def order(key: tuple[str, str]) -> tuple[bool, str, int]:  # GPUs first, by card, newest day first
        card, date = key
        return card.startswith("CPU"), card, -int(date.replace("-", "")) if date[:1].isdigit() else 0

    keys = sorted(groups, key=order)
    rel = os.path.relpath(folder.resolve(), md_path.resolve().parent)
    toc, body = [], []
    for card, date in keys:
        title = f"{card}, {date}"
        toc.append(f"- [{title}](#{_anchor(title)})")
        body += [f"## {title}", ""]
        rs = sorted(
            groups[(card, date)],
            key=lambda r: (KIND_ORDER.index(r["_kind"]) if r["_kind"] in KIND_ORDER else 99, r["_file"]),
        )
        moe = [r for r in rs if r["_kind"] == "moe_layer"]
        headline = [r for r in moe if not run_variant(r)]
        if headline:
            merged = merge_moe_layer(headline)
            if len(headline) > 1:
                png_name = f"moe_layer_{_slug(card)}_{date}.png"
                if draw:
                    plot(merged, folder / png_name)
            else:
                png_name = Path(headline[0]["_file"]).with_suffix(".png").name
            png = f"{rel}/{png_name}" if (folder / png_name).is_file() else None
            title = "## Routed-expert layer, one dispatched call per layer (`python -m benchmarks.moe_layer`)"
            body += [_demote(results_markdown(merged, png, title)), ""]
        for r in rs:
            if r["_kind"] == "moe_layer" and not run_variant(r):
                continue
            png_file = folder / Path(r["_file"]).with_suffix(".png").name
            png = f"{rel}/{png_file.name}" if png_file.is_file() else None
            if r["_kind"] == "moe_layer":
                text = results_markdown(
                    r, png, "## Routed-expert layer, a variant run (`python -m benchmarks.moe_layer`)"
                )
            else:
                fn = _renderer(r["_kind"])
                text = fn(r, png) if fn else f"## `{r['_file']}`\n\n*No renderer for this JSON ({r['_kind']}).*"
                if not text.lstrip().startswith("#"):
                    text = f"## `{r['_file']}`\n\n" + text
            note = (r.get("annotation") or {}).get("note")
            body += [
                _demote(text).rstrip(),
                "",
                f"*Source: `results/{r['_file']}`" + (f"; annotated: {note}" if note else "") + ".*",
                "",
            ]
    tail = ""
    if md_path.is_file():
        old = md_path.read_text()
        if KEEP_MARKER in old:
            tail = old[old.index(KEEP_MARKER) + len(KEEP_MARKER) :].strip("\n")
    out = [INTRO, "", *toc, "", *body, KEEP_MARKER, ""]
    if tail:
        out += [tail, ""]
    return "\n".join(out).rstrip() + "\n"


def _anchor(title: str) -> str:
    """GitHub's anchor of a heading."""
    return re.sub(r"[^a-z0-9 _-]", "", title.lower()).replace(" ", "-")


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.report``: rewrite (or ``--check``) RESULTS.md from the JSON files."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=C.RESULTS_DIR, help="folder of the JSON files")
    p.add_argument("--out", type=Path, default=RESULTS_MD, help="the markdown file to write")
    p.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 when --out differs from what the JSON gives"
    )
    a = p.parse_args(argv)
    text = build(a.results, a.out, draw=not a.check)
    if a.check:
        same = a.out.is_file() and a.out.read_text() == text
        print(f"{a.out}: {'up to date' if same else 'differs from the JSON (run python -m benchmarks.report)'}")
        return 0 if same else 1
    a.out.write_text(text)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
