"""Tables (markdown), targets (PASS/FAIL) and the plot of a benchmark run.

A run is ``{"meta": {...}, "guests": [{"size_gib", "kind", "samples":
{metric: [values]}, "notes": {metric: why}}]}`` (``bench/out/results.json``).
Every cell is the median of the samples with (min–max) when there are several.
"""

from __future__ import annotations

import statistics
from typing import Any, Callable

GiB = 1 << 30
MiB = 1 << 20


def _s(v: float) -> str:
    return f"{v:.3f} s" if v < 1 else f"{v:.2f} s" if v < 100 else f"{v:.0f} s"


def _ms(v: float) -> str:
    return f"{v:.1f} ms" if v < 100 else f"{v:.0f} ms"


def _us(v: float) -> str:
    return f"{v:.1f} µs" if v < 100 else f"{v:.0f} µs"


def _bytes(v: float) -> str:
    if abs(v) < 10 * MiB:
        return f"{v / MiB:.2f} MiB"
    if abs(v) < 10 * GiB:
        return f"{v / MiB:.0f} MiB"
    return f"{v / GiB:.1f} GiB"


def _gbps(v: float) -> str:
    return f"{v:.2f} GB/s"


def _x(v: float) -> str:
    return f"{v:.2f}×" if v < 10 else f"{v:.0f}×"


def _pct(v: float) -> str:
    return f"{v * 100:.2f} %" if v < 0.1 else f"{v * 100:.0f} %"


#: metric -> (label, formatter), in table order.
METRICS: list[tuple[str, str, Callable[[float], str]]] = [
    ("boot_s", "guest boot (QEMU start to init ready)", _s),
    ("ttfa_vmcorefs_s", "(1a) mount + drgn on MNT/vmcore: linux_banner", _s),
    ("ttfa_vmcorefs_drgn_s", "(1a) of which drgn (kallsyms + read)", _s),
    ("ttfa_vmcorefs_freeze_s", "(1a') the same, mounted --freeze", _s),
    ("ttfa_dump_s", "(1b) dump-guest-memory to /dev/shm + drgn on the file", _s),
    ("dump_s", "(1b) of which QEMU's dump", _s),
    ("ttfa_qemu_s", "(1c) drgn --qemu (set_qemu_qmp): linux_banner", _s),
    ("daemon_hwm_bytes", "(2) daemon peak RSS (VmHWM) after all workloads", _bytes),
    ("fullread_fraction", "(2) part of vmcore read (1 MiB reads, time-boxed)", _pct),
    ("fullread_gbps", "(2) full read throughput (1 MiB preadv, default mount)", _gbps),
    ("fullread_growth_bytes", "(2) host growth after full read (memfd blocks / QEMU RSS private)", _bytes),
    ("fullread_qemu_pte_growth_bytes", "(2) QEMU page-table growth after full read", _bytes),
    ("dump_host_bytes", "(2) host memory taken by (1b) (/dev/shm file + memfd faults)", _bytes),
    ("seq_vmcore_128k_gbps", "(3) dd vmcore, 128 KiB blocks (default: cached)", _gbps),
    ("seq_direct_128k_gbps", "(3) dd vmcore, 128 KiB blocks, --direct", _gbps),
    ("seq_backing_128k_gbps", "(3) dd backing, 128 KiB blocks", _gbps),
    ("seq_vmcore_1m_gbps", "(3) dd vmcore, 1 MiB blocks (default: cached)", _gbps),
    ("seq_direct_1m_gbps", "(3) dd vmcore, 1 MiB blocks, --direct", _gbps),
    ("seq_backing_1m_gbps", "(3) dd backing, 1 MiB blocks", _gbps),
    ("rand_vmcore_p50_us", "(4) random 4 KiB pread of vmcore, p50 (default: cached)", _us),
    ("rand_vmcore_p99_us", "(4) random 4 KiB pread of vmcore, p99 (default: cached)", _us),
    ("rand_vmcoredirect_p50_us", "(4) random 4 KiB pread of vmcore, p50, --direct", _us),
    ("rand_vmcoredirect_p99_us", "(4) random 4 KiB pread of vmcore, p99, --direct", _us),
    ("rand_backing_p50_us", "(4) random 4 KiB pread of backing, p50", _us),
    ("rand_backing_p99_us", "(4) random 4 KiB pread of backing, p99", _us),
    ("mount_s", "(5) vmcorefs mount (command returns)", _s),
    ("freeze_pause_ms", "(5) --freeze: guest paused by one open+close (STOP→RESUME)", _ms),
    ("freeze_openclose_ms", "(5) --freeze: open+close as the reader sees it", _ms),
    ("mdf_s", "(6) makedumpfile -c -d 31 of vmcore: wall time", _s),
    ("mdf_read_bytes", "(6) makedumpfile: bytes vmcorefs served (readahead included)", _bytes),
    ("mdf_out_bytes", "(6) makedumpfile: output size", _bytes),
    ("qkdump_s", "(6) QEMU dump-guest-memory kdump-zlib: wall time", _s),
    ("qkdump_read_bytes", "(6) QEMU kdump-zlib: bytes read (all of guest RAM)", _bytes),
    ("qkdump_out_bytes", "(6) QEMU kdump-zlib: output size", _bytes),
    ("qkdump_growth_bytes", "(6) guest pages QEMU's dumps faulted into host memory", _bytes),
    ("dump_file_bytes", "(7) dump-guest-memory ELF (1b): allocated size", _bytes),
    ("vdump_s", "(7) vmcorefs dump (sparse ELF to /dev/shm): wall time", _s),
    ("vdump_pause_s", "(7) vmcorefs dump: guest paused (STOP→RESUME)", _s),
    ("vdump_size_bytes", "(7) vmcorefs dump: file size", _bytes),
    ("vdump_alloc_bytes", "(7) vmcorefs dump: allocated size", _bytes),
    ("vdump_rss_bytes", "(7) vmcorefs dump: its peak RSS", _bytes),
    ("vdump_growth_bytes", "(7) vmcorefs dump: guest pages it made the host hold", _bytes),
    ("vkdump_s", "(7) vmcorefs dump --format kdump-zlib: wall time", _s),
    ("vkdump_pause_s", "(7) vmcorefs dump --format kdump-zlib: guest paused", _s),
    ("vkdump_size_bytes", "(7) vmcorefs dump --format kdump-zlib: output size", _bytes),
    ("fill_s", "(7) before the dumps: the guest writes --fill-mib MiB of random bytes to a tmpfs", _s),
    ("vdump_populated_bytes", "(7) guest RAM the host held before the dump (QEMU's resident guest pages)", _bytes),
    ("vdumpdisk_s", "(7) vmcorefs dump (sparse ELF to the scratch disk): wall time", _s),
    ("vdumpdisk_pause_s", "(7) vmcorefs dump to disk: guest paused (STOP→RESUME)", _s),
    ("vdumpdisk_alloc_bytes", "(7) vmcorefs dump to disk: allocated size", _bytes),
    ("vdumpdisk_growth_bytes", "(7) vmcorefs dump to disk: guest pages it made the host hold", _bytes),
    ("dumpdisk_s", "(7) dump-guest-memory ELF to the scratch disk: wall time (= guest pause)", _s),
    ("dumpdisk_alloc_bytes", "(7) dump-guest-memory ELF to disk: allocated size", _bytes),
    ("dumpnull_s", "(7) dump-guest-memory ELF into /dev/null (no storage): wall time (= guest pause)", _s),
    ("vfilter_s", "(7) vmcorefs dump --format kdump-zlib --filter 31: wall time (after QEMU's dumps)", _s),
    ("vfilter_out_bytes", "(7) vmcorefs dump --filter 31: output size", _bytes),
    ("qfilter_s", "(7) dump-guest-memory ELF + makedumpfile -c -d 31 of it (its program headers moved to offset 64 first): wall time", _s),
    ("qfilter_dump_s", "(7) of which QEMU's dump (the guest's pause)", _s),
    ("qfilter_out_bytes", "(7) makedumpfile -c -d 31 of QEMU's dump: output size", _bytes),
]
FORMAT = {k: f for k, _, f in METRICS}

#: Ratios against anchors of the same run: (label, numerator, denominator).
RATIOS: list[tuple[str, str, str]] = [
    ("(1) speed-up of (1a) over (1b) (1b ÷ 1a)", "ttfa_dump_s", "ttfa_vmcorefs_s"),
    ("(1) (1a) ÷ (1c)", "ttfa_vmcorefs_s", "ttfa_qemu_s"),
    ("(3) vmcore ÷ backing, 128 KiB (cached)", "seq_vmcore_128k_gbps", "seq_backing_128k_gbps"),
    ("(3) vmcore ÷ backing, 128 KiB (--direct)", "seq_direct_128k_gbps", "seq_backing_128k_gbps"),
    ("(3) vmcore ÷ backing, 1 MiB (cached)", "seq_vmcore_1m_gbps", "seq_backing_1m_gbps"),
    ("(3) vmcore ÷ backing, 1 MiB (--direct)", "seq_direct_1m_gbps", "seq_backing_1m_gbps"),
    ("(4) p50 vmcore ÷ backing", "rand_vmcore_p50_us", "rand_backing_p50_us"),
    ("(6) makedumpfile ÷ QEMU kdump-zlib, time", "mdf_s", "qkdump_s"),
    ("(6) makedumpfile ÷ QEMU kdump-zlib, bytes read", "mdf_read_bytes", "qkdump_read_bytes"),
    ("(6) makedumpfile ÷ QEMU kdump-zlib, output", "mdf_out_bytes", "qkdump_out_bytes"),
    ("(7) speed-up of vmcorefs dump over dump-guest-memory ELF (dump_s ÷ vdump_s)", "dump_s", "vdump_s"),
    ("(7) guest pause, dump-guest-memory ÷ vmcorefs dump (QEMU pauses for its whole dump)", "dump_s",
     "vdump_pause_s"),
    ("(7) allocated size, dump-guest-memory ÷ vmcorefs dump", "dump_file_bytes", "vdump_alloc_bytes"),
    ("(7) kdump-zlib wall time, QEMU ÷ vmcorefs dump", "qkdump_s", "vkdump_s"),
    ("(7) kdump-zlib output, vmcorefs dump ÷ QEMU", "vkdump_size_bytes", "qkdump_out_bytes"),
    ("(7) disk: speed-up of vmcorefs dump over dump-guest-memory ELF (dumpdisk_s ÷ vdumpdisk_s)", "dumpdisk_s",
     "vdumpdisk_s"),
    ("(7) disk: guest pause, dump-guest-memory ÷ vmcorefs dump", "dumpdisk_s", "vdumpdisk_pause_s"),
    ("(7) dump-guest-memory into /dev/null ÷ vmcorefs dump to disk (QEMU's lower bound)", "dumpnull_s",
     "vdumpdisk_s"),
    ("(7) allocated size of vmcorefs dump ÷ populated guest RAM", "vdump_alloc_bytes", "vdump_populated_bytes"),
    ("(7) --filter 31 output, vmcorefs dump ÷ makedumpfile on QEMU's dump", "vfilter_out_bytes", "qfilter_out_bytes"),
]


def med(values: list[float]) -> float:
    return statistics.median(values)


def cell(values: list[float] | None, fmt: Callable[[float], str]) -> str:
    if not values:
        return ""
    if len(values) == 1 or min(values) == max(values):
        return fmt(values[0])
    return f"{fmt(med(values))} ({fmt(min(values))}–{fmt(max(values))})"


def _guest(run: dict[str, Any], size: int, kind: str) -> dict[str, Any] | None:
    for g in run["guests"]:
        if g["size_gib"] == size and g["kind"] == kind:
            return dict(g)
    return None


def _median(run: dict[str, Any], size: int, kind: str, metric: str) -> float | None:
    g = _guest(run, size, kind)
    if g is None or not g["samples"].get(metric):
        return None
    return med(g["samples"][metric])


def sizes_kinds(run: dict[str, Any]) -> tuple[list[int], list[str]]:
    sizes = sorted({g["size_gib"] for g in run["guests"]})
    kinds = [k for k in ("memfd", "private") if any(g["kind"] == k for g in run["guests"])]
    return sizes, kinds


def measurements_table(run: dict[str, Any], kind: str) -> str:
    sizes, _ = sizes_kinds(run)
    notes: list[str] = []
    head = "| measurement | " + " | ".join(f"{s} GiB" for s in sizes) + " |"
    lines = [head, "|---|" + "---|" * len(sizes)]
    for metric, label, fmt in METRICS:
        row, any_value = [], False
        for s in sizes:
            g = _guest(run, s, kind)
            if g is None:
                row.append("")
                continue
            vals = g["samples"].get(metric)
            if vals:
                row.append(cell(vals, fmt))
                any_value = True
            elif metric in g["notes"]:
                text = f"{s} GiB: {g['notes'][metric]}"
                if text not in notes:
                    notes.append(text)
                row.append(f"n/a[^{kind}{notes.index(text) + 1}]")
                any_value = True
            else:
                row.append("")
        if any_value:
            lines.append(f"| {label} | " + " | ".join(row) + " |")
    loads = [(_guest(run, s, kind) or {}).get("loadavg") for s in sizes]
    if any(loads):
        lines.append("| host load average, start → end of this guest's run | "
                     + " | ".join(f"{la[0]:.1f} → {la[1]:.1f}" if la else "" for la in loads) + " |")
    for label, num, den in RATIOS:
        row, any_value = [], False
        for s in sizes:
            a, b = _median(run, s, kind, num), _median(run, s, kind, den)
            if a is not None and b:
                row.append(_x(a / b))
                any_value = True
            else:
                row.append("")
        if any_value:
            lines.append(f"| {label} | " + " | ".join(row) + " |")
    out = "\n".join(lines)
    if notes:
        out += "\n\n" + "\n".join(f"[^{kind}{i + 1}]: {n}" for i, n in enumerate(notes))
    return out


# -- targets ------------------------------------------------------------------

def targets(run: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (target, backend): cells per size, and the verdict."""
    sizes, kinds = sizes_kinds(run)
    rows: list[dict[str, Any]] = []

    def per_size(tid: str, text: str, kind: str, metric: str, ok: Callable[[float, int], bool],
                 fmt: Callable[[float], str]) -> None:
        cells = {}
        for s in sizes:
            v = _median(run, s, kind, metric)
            if v is not None:
                cells[s] = (fmt(v), ok(v, s))
        rows.append({"id": tid, "target": text, "kind": kind, "cells": cells})

    for k in kinds:
        for metric, tag in (("ttfa_vmcorefs_s", "1a"), ("ttfa_vmcorefs_freeze_s", "1a'")):
            if not any(_median(run, s, k, metric) is not None for s in sizes):
                continue
            per_size(tag, f"({tag}) time to first answer ≤ 1 s", k, metric, lambda v, s: v <= 1.0, _s)
            first, last = (min(sizes), max(sizes))
            a, b = _median(run, first, k, metric), _median(run, last, k, metric)
            cells = {}
            if a and b is not None and last > first:
                cells[last] = (f"{_x(b / a)} the {first} GiB time", b / a <= 1.3)
            rows.append({"id": f"{tag}-flat", "target": f"({tag}) flat: {last} GiB ≤ 1.3× {first} GiB", "kind": k,
                         "cells": cells})
            if 4 in sizes:
                a, b, c = (_median(run, 4, k, m) for m in (metric, "ttfa_dump_s", "ttfa_qemu_s"))
                cells = {4: (f"(1b) ÷ ({tag}) = {_x(b / a)}", b / a >= 10)} if a and b else {}
                rows.append({"id": f"{tag}-vs-1b", "target": f"({tag}) ≥ 10× faster than (1b) at 4 GiB", "kind": k,
                             "cells": cells})
                cells = {4: (f"({tag}) ÷ (1c) = {_x(a / c)}", a <= c)} if a and c else {}
                rows.append({"id": f"{tag}-vs-1c", "target": f"({tag}) no slower than (1c) at 4 GiB", "kind": k,
                             "cells": cells})
        per_size("2-rss", "(2) daemon peak RSS ≤ 80 MiB", k, "daemon_hwm_bytes", lambda v, s: v <= 80 * MiB,
                 _bytes)
        cells = {}
        for s in sizes:
            v = _median(run, s, k, "fullread_growth_bytes")
            if v is not None:
                frac = _median(run, s, k, "fullread_fraction") or 0
                cells[s] = (_bytes(v) + ("" if frac > 0.999 else f" ({_pct(frac)} read)"),
                            v <= 0.01 * s * GiB)
        rows.append({"id": "2-growth", "kind": k, "cells": cells,
                     "target": "(2) full read grows the memfd (memfd) / QEMU RSS (private) ≤ 1 % of RAM"})
        for tag, bs, limit in (("1m", "1 MiB", 0.6), ("128k", "128 KiB", 0.35)):
            for which, mode in (("vmcore", "default (cached)"), ("direct", "--direct")):
                cells = {}
                for s in sizes:
                    a, b = (_median(run, s, k, f"seq_{w}_{tag}_gbps") for w in (which, "backing"))
                    if a is not None and b:
                        cells[s] = (_x(a / b), a / b >= limit)
                rows.append({"id": f"3-{tag}-{which}", "kind": k, "cells": cells,
                             "target": f"(3) {bs} blocks ≥ {limit}× dd of backing, {mode}"})
        per_size("4", "(4) random 4 KiB p50 ≤ 60 µs, default (cached)", k, "rand_vmcore_p50_us",
                 lambda v, s: v <= 60, _us)
        per_size("4-direct", "(4) random 4 KiB p50 ≤ 60 µs, --direct", k, "rand_vmcoredirect_p50_us",
                 lambda v, s: v <= 60, _us)
        per_size("5", "(5) mount ≤ 1.5 s", k, "mount_s", lambda v, s: v <= 1.5, _s)
    for r in rows:
        oks = [ok for _, ok in r["cells"].values()]
        r["verdict"] = "n/a" if not oks else "PASS" if all(oks) else "FAIL"
    return rows


def targets_table(run: dict[str, Any]) -> str:
    sizes, _ = sizes_kinds(run)
    lines = ["| target | RAM | " + " | ".join(f"{s} GiB" for s in sizes) + " | PASS/FAIL |",
             "|---|---|" + "---|" * len(sizes) + "---|"]
    for r in targets(run):
        cells = []
        for s in sizes:
            if s in r["cells"]:
                text, ok = r["cells"][s]
                cells.append(f"{text} {'✓' if ok else '✗'}")
            else:
                cells.append("")
        lines.append(f"| {r['target']} | {r['kind']} | " + " | ".join(cells) + f" | **{r['verdict']}** |")
    return "\n".join(lines)


def markdown(run: dict[str, Any]) -> str:
    meta = run["meta"]
    _, kinds = sizes_kinds(run)
    parts = [
        f"Run of {meta['date']} on {meta['machine']}; {meta['repeat']} repetition(s) per measurement "
        f"unless noted; `{meta['command']}`, {meta['duration_s'] / 60:.0f} min.",
        "",
        "### Targets",
        "",
        targets_table(run),
    ]
    for k in kinds:
        parts += ["", f"### All measurements, {k} guests",
                  "", "Median (min–max) of the repetitions; ratios are of medians.", "",
                  measurements_table(run, k)]
    configs = [f"{g['size_gib']} GiB {g['kind']}: {g['config']}" for g in run["guests"] if g.get("config")]
    if meta.get("notes") or configs:
        parts += ["", "Notes:", ""] + [f"* {n}" for n in meta["notes"] + configs]
    return "\n".join(parts) + "\n"


# -- (8) VMCOREINFO from guest RAM --------------------------------------------------

def finder_markdown(run: dict[str, Any]) -> str:
    """The finder's section: per guest, mount + first open of ``vmcore`` with
    ``-device vmcoreinfo`` and without (VMCOREINFO found in guest RAM), the
    ratio of their medians, their parts, and the host's load average.  Empty
    when the run has no finder samples."""
    guests = [g for g in run["guests"]
              if any(k.startswith("finder_") for k in (*g["samples"], *g["notes"]))]
    if not guests:
        return ""
    meta = run["meta"]
    lines = [
        f"Run of {meta['date']} on {meta['machine']}; {meta['repeat']} mount(s) per guest, each a new daemon "
        f"(so a new scan); `{meta['command']}`, {meta['duration_s'] / 60:.0f} min.",
        "",
        "| guest | mount + first open, device | same, no device | ratio | mount: device / none "
        "| first open: device / none | later opens: device / none | load average |",
        "|---|---|---|---|---|---|---|---|",
    ]
    notes: list[str] = []

    def both(g: dict[str, Any], metric: str, fmt: Callable[[float], str]) -> str:
        out = []
        for tag in ("dev", "nodev"):
            key = metric.format(tag)
            vals = g["samples"].get(key)
            if vals:
                out.append(cell(vals, fmt))
            elif key in g["notes"]:
                text = f"{g['size_gib']} GiB {g['kind']}: {g['notes'][key]}"
                if text not in notes:
                    notes.append(text)
                out.append(f"n/a[^finder{notes.index(text) + 1}]")
            else:
                out.append("")
        return " / ".join(out)

    for g in guests:
        dev, nodev = (g["samples"].get(f"finder_first_{t}_s") for t in ("dev", "nodev"))
        ratio = _x(med(nodev) / med(dev)) if dev and nodev else ""
        first = both(g, "finder_first_{}_s", _s).split(" / ")
        la = g.get("loadavg")
        lines.append(f"| {g['size_gib']} GiB {g['kind']} | {first[0]} | {first[1]} | {ratio} "
                     f"| {both(g, 'finder_mount_{}_s', _s)} | {both(g, 'finder_open1_{}_ms', _ms)} "
                     f"| {both(g, 'finder_open_{}_ms', _ms)} "
                     f"| {f'{la[0]:.1f} → {la[1]:.1f}' if la else ''} |")
    out = "\n".join(lines) + "\n"
    if notes:
        out += "\n" + "\n".join(f"[^finder{i + 1}]: {n}" for i, n in enumerate(notes)) + "\n"
    return out


# -- plot -----------------------------------------------------------------------

STYLE = {"memfd": "-", "private": "--"}


def _series(ax: Any, run: dict[str, Any], kind: str, metric: str, label: str, color: str, scale: float = 1.0,
            floor: float = 0.0, marker: str = "o") -> None:
    """One line of a plot: the median (bars: min to max) of ``metric`` over
    the run's guest sizes of ``kind``, divided by ``scale``, at least ``floor``."""
    xs, ys, lo, hi = [], [], [], []
    for s in sizes_kinds(run)[0]:
        g = _guest(run, s, kind)
        vals = g["samples"].get(metric) if g else None
        if vals:
            vals = [max(v / scale, floor) for v in vals]
            xs.append(s)
            ys.append(med(vals))
            lo.append(med(vals) - min(vals))
            hi.append(max(vals) - med(vals))
    if xs:
        ax.errorbar(xs, ys, yerr=[lo, hi], fmt=marker + STYLE[kind], color=color, capsize=3,
                    label=f"{label} ({kind})")


def _finish(fig: Any, axes: Any, sizes: list[int], title: str, paths: list[str]) -> None:
    for ax in axes:
        ax.minorticks_off()
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    for p in paths:
        fig.savefig(p, dpi=110)


def plot(run: dict[str, Any], paths: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes, kinds = sizes_kinds(run)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 6.2))

    def series(ax: Any, kind: str, metric: str, label: str, color: str, scale: float = 1.0) -> None:
        _series(ax, run, kind, metric, label, color, scale, floor)

    floor = 0.0
    for k in kinds:
        series(ax1, k, "ttfa_vmcorefs_s", "(1a) vmcorefs mount + drgn", "C0")
        series(ax1, k, "ttfa_vmcorefs_freeze_s", "(1a') mount --freeze + drgn", "C3")
        series(ax1, k, "ttfa_dump_s", "(1b) dump to /dev/shm + drgn", "C1")
        series(ax1, k, "ttfa_qemu_s", "(1c) drgn --qemu", "C2")
    ax1.axhline(1.0, color="grey", lw=0.8, ls=":", label="target for (1a): ≤ 1 s")
    ax1.set(xscale="log", yscale="log", xlabel="guest RAM (GiB)", ylabel="seconds (median, min–max)",
            title="Time to first answer (drgn reads linux_banner)")
    floor = 0.01  # MiB: "nothing" on a log scale
    ax2.plot(sizes, [s * 1024 for s in sizes], color="grey", lw=0.8, ls="-.", label="guest RAM")
    for k in kinds:
        series(ax2, k, "daemon_hwm_bytes", "vmcorefs daemon peak RSS", "C0", MiB)
        series(ax2, k, "fullread_growth_bytes", "memfd/QEMU RSS growth, full read of vmcore", "C3", MiB)
        if k == "private":
            series(ax2, k, "fullread_qemu_pte_growth_bytes", "QEMU page tables growth, full read", "C5", MiB)
        series(ax2, k, "dump_host_bytes", "(1b) /dev/shm file + memfd faults", "C1", MiB)
        series(ax2, k, "qkdump_growth_bytes", "pages QEMU's dumps fault in", "C4", MiB)
    ax2.axhline(80, color="grey", lw=0.8, ls=":", label="target daemon ≤ 80 MiB")
    ax2.set(xscale="log", yscale="log", xlabel="guest RAM (GiB)", ylabel="MiB (0.01 = nothing)",
            title="Host memory")
    _finish(fig, (ax1, ax2), sizes, f"vmcorefs benchmarks — {run['meta']['date']}", paths)
    plt.close(fig)


def plot_dump(run: dict[str, Any], paths: list[str]) -> None:
    """The dump groups (7) of ``run`` as four log-log panels against guest
    RAM: ELF wall time and guest pause (vmcorefs dump vs dump-guest-memory,
    /dev/shm and disk), kdump-zlib and ``--filter 31`` wall time, and the
    output's allocated size against the guest's populated RAM.  Raises
    ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes, kinds = sizes_kinds(run)
    fig, axes = plt.subplots(2, 2, figsize=(13, 12))
    (wall, pause), (kdump, alloc) = axes
    for k in kinds:
        _series(wall, run, k, "vdump_s", "vmcorefs dump → /dev/shm", "C0")
        _series(wall, run, k, "vdumpdisk_s", "vmcorefs dump → disk", "C2", marker="s")
        _series(wall, run, k, "dump_s", "dump-guest-memory → /dev/shm", "C1")
        _series(wall, run, k, "dumpdisk_s", "dump-guest-memory → disk", "C3", marker="s")
        _series(wall, run, k, "dumpnull_s", "dump-guest-memory → /dev/null", "C7", marker="^")
        _series(pause, run, k, "vdump_pause_s", "vmcorefs dump → /dev/shm", "C0")
        _series(pause, run, k, "vdumpdisk_pause_s", "vmcorefs dump → disk", "C2", marker="s")
        _series(pause, run, k, "dump_s", "dump-guest-memory → /dev/shm", "C1")
        _series(pause, run, k, "dumpdisk_s", "dump-guest-memory → disk", "C3", marker="s")
        _series(kdump, run, k, "vkdump_s", "vmcorefs dump --format kdump-zlib", "C0")
        _series(kdump, run, k, "qkdump_s", "dump-guest-memory format=kdump-zlib", "C1")
        _series(kdump, run, k, "vfilter_s", "vmcorefs dump --filter 31", "C2", marker="s")
        _series(kdump, run, k, "qfilter_s", "dump-guest-memory + makedumpfile -d 31", "C3", marker="s")
        _series(alloc, run, k, "vdump_populated_bytes", "guest RAM populated before the dump", "C7", GiB,
                marker="^")
        _series(alloc, run, k, "vdump_alloc_bytes", "vmcorefs dump (ELF): allocated", "C0", GiB)
        _series(alloc, run, k, "dumpdisk_alloc_bytes", "dump-guest-memory (ELF): allocated", "C1", GiB)
    alloc.plot(sizes, sizes, color="grey", lw=0.8, ls="-.", label="guest RAM")
    wall.set(title="ELF dump: wall time", ylabel="seconds (median, min–max)")
    pause.set(title="ELF dump: guest paused (dump-guest-memory: its whole dump)", ylabel="seconds")
    kdump.set(title="kdump-zlib and --filter 31 (to disk): wall time", ylabel="seconds")
    alloc.set(title="ELF dump: allocated size of the output", ylabel="GiB")
    for ax in (wall, pause, kdump, alloc):
        ax.set(xscale="log", yscale="log", xlabel="guest RAM (GiB)")
    _finish(fig, (wall, pause, kdump, alloc), sizes,
            f"vmcorefs dump vs dump-guest-memory — {run['meta']['date']} (missing points: QEMU cannot run there)",
            paths)
    plt.close(fig)
