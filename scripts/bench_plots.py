"""PNG plots of a ``scripts/bench.py all`` result (headless, matplotlib Agg).

    write_plots(results, img_dir) -> {name: path}

``results`` is the object ``all`` writes to ``benchmarks.json``: its
``suites`` hold the ``ledger``, ``sync`` and ``job`` dicts and a list of
``gossip`` dicts, one per node count. A suite that is missing or failed
(``{"error": ...}``) gets no plot; a figure missing from a suite is left out
of its plot rather than failing it.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

OURS = "#1f77b4"
CEILING = "#9e9e9e"
TARGET = "#d62728"
DPI = 110

# what each plot is called in the docs, in the order they appear there
TITLES = {
    "gossip_latency": "Gossip: time until every node holds a new offer",
    "gossip_cost": "Gossip: idle RSS and CPU per node process",
    "job": "Jobs: straight from the stand-in vs through the network",
    "ledger": "Ledger: our rates vs the raw PyNaCl ceilings",
    "sync": "Sync: a fresh node's catch-up rate",
}


def usable(result) -> bool:
    return isinstance(result, dict) and "error" not in result


def gossip_runs(results: dict) -> list[dict]:
    runs = results.get("suites", {}).get("gossip") or []
    if isinstance(runs, dict):
        runs = [runs]
    return sorted((r for r in runs if usable(r)), key=lambda r: r["nodes"])


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _series(runs: list[dict], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["nodes"], r[key]) for r in runs if r.get(key) is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def plot_gossip_latency(runs: list[dict], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for key, label, style in [
        ("every_node_median_ms", "every node holds it: median", "o-"),
        ("every_node_p95_ms", "every node holds it: p95", "s-"),
        ("per_node_median_ms", "one node holds it: median", "^:"),
    ]:
        xs, ys = _series(runs, key)
        if xs:
            ax.plot(xs, ys, style, label=label)
    targets = runs[-1].get("targets", {}) if runs else {}
    for key, label, style in [("every_node_median_ms", "target median", "--"), ("every_node_p95_ms", "target p95", ":")]:
        if key in targets:
            ax.axhline(targets[key], color=TARGET, linestyle=style, linewidth=1, label=f"{label} {targets[key]} ms")
    ax.set_xlabel("node processes")
    ax.set_ylabel("ms from signature")
    ax.set_xticks([r["nodes"] for r in runs])
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(TITLES["gossip_latency"], fontsize=10)
    return _save(fig, path)


def plot_gossip_cost(runs: list[dict], path: Path) -> Path:
    fig, (rss_ax, cpu_ax) = plt.subplots(1, 2, figsize=(9, 3.8))
    for ax, prefix, unit, title in [
        (rss_ax, "idle_rss_mb", "MiB", "RSS per node"),
        (cpu_ax, "idle_cpu_percent", "% of one core", "idle CPU per node"),
    ]:
        for run in runs:  # every node's own figure, where the run kept them
            values = run.get(f"{prefix}_per_node") or []
            ax.scatter([run["nodes"]] * len(values), values, s=8, color=CEILING, alpha=0.6, zorder=1)
        top = 0.0
        for key, label, style in [(f"{prefix}_median", "median", "o-"), (f"{prefix}_max", "max", "s--")]:
            xs, ys = _series(runs, key)
            if xs:
                ax.plot(xs, ys, style, label=label, zorder=2)
                top = max(top, *ys)
        for run in runs:
            top = max(top, *(run.get(f"{prefix}_per_node") or [0]))
        ax.set_xlabel("node processes")
        ax.set_ylabel(unit)
        ax.set_xticks([r["nodes"] for r in runs])
        ax.set_ylim(0, top * 1.3 or 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(title, fontsize=10)
    fig.suptitle(TITLES["gossip_cost"], fontsize=10)
    return _save(fig, path)


def _bars(ax, labels: list[str], values: list[float], colors: list[str], unit: str) -> None:
    bars = ax.barh(labels, values, color=colors)
    ax.bar_label(bars, labels=[f"{v:,.0f}" if v >= 100 else f"{v:,.1f}" for v in values], padding=3, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(unit)
    ax.set_xlim(0, max(values, default=1) * 1.25 or 1)
    ax.grid(axis="x", alpha=0.3)


def _pairs(result: dict, rows: list[tuple[str, str, str]]) -> tuple[list[str], list[float], list[str]]:
    present = [(label, result[key], color) for key, label, color in rows if result.get(key) is not None]
    return [p[0] for p in present], [p[1] for p in present], [p[2] for p in present]


def plot_job(result: dict, path: Path) -> Path:
    fig, (ttft_ax, tps_ax) = plt.subplots(1, 2, figsize=(9, 3.2))
    targets = result.get("targets", {})
    labels, values, colors = _pairs(result, [
        ("direct_ttft_ms_median", "direct", CEILING),
        ("network_ttft_ms_median", "network", OURS),
    ])
    _bars(ttft_ax, labels, values, colors, "ms (median)")
    if "added_ttft_ms_median" in targets and result.get("direct_ttft_ms_median") is not None:
        limit = result["direct_ttft_ms_median"] + targets["added_ttft_ms_median"]
        ttft_ax.axvline(limit, color=TARGET, linestyle="--", linewidth=1,
                        label=f"target: direct + {targets['added_ttft_ms_median']} ms")
        ttft_ax.set_xlim(0, max([*values, limit]) * 1.25)
        ttft_ax.legend(fontsize=8, loc="lower right")
    ttft_ax.set_title("time to first token", fontsize=10)
    labels, values, colors = _pairs(result, [
        ("direct_tokens_per_s_median", "direct", CEILING),
        ("network_tokens_per_s_median", "network", OURS),
    ])
    _bars(tps_ax, labels, values, colors, "tokens/s (median)")
    if "throughput_ratio" in targets and result.get("direct_tokens_per_s_median") is not None:
        floor = targets["throughput_ratio"] * result["direct_tokens_per_s_median"]
        tps_ax.axvline(floor, color=TARGET, linestyle="--", linewidth=1,
                       label=f"target: {targets['throughput_ratio']:.0%} of direct")
        tps_ax.legend(fontsize=8, loc="lower right")
    tps_ax.set_title("tokens per second", fontsize=10)
    fig.suptitle(TITLES["job"], fontsize=10)
    return _save(fig, path)


def _ratio_target(ax, result: dict, ratio_key: str, ceiling_key: str, ceiling_name: str) -> None:
    """A target given as a share of a ceiling, drawn where it falls."""
    target = result.get("targets", {}).get(ratio_key)
    if target is not None and result.get(ceiling_key):
        ax.axvline(target * result[ceiling_key], color=TARGET, linestyle="--", linewidth=1,
                   label=f"target: {target:.0%} of {ceiling_name}")
        ax.legend(fontsize=8, loc="lower right")


def plot_ledger(result: dict, path: Path) -> Path:
    fig, (append_ax, verify_ax) = plt.subplots(2, 1, figsize=(8, 4.8), gridspec_kw={"height_ratios": [2, 4]})
    labels, values, colors = _pairs(result, [
        ("raw_sign_per_s", "raw ed25519 sign (ceiling)", CEILING),
        ("local_append_per_s", "local append (ours)", OURS),
        ("local_append_pipelined_per_s", "local append, pipelined group writes (ours)", OURS),
    ])
    _bars(append_ax, labels, values, colors, "entries/s")
    _ratio_target(append_ax, result, "append_sign_ratio", "raw_sign_per_s", "raw sign")
    append_ax.set_title("signing: local append vs raw sign", fontsize=10)
    labels, values, colors = _pairs(result, [
        ("raw_verify_per_s", "raw verify, 1 thread (ceiling)", CEILING),
        ("raw_verify_2_threads_per_s", "raw verify, 2 threads", CEILING),
        ("verify_apply_single_thread_per_s", "verify + apply, one by one (ours)", OURS),
        ("verify_apply_per_s", "verify + apply, batched (ours)", OURS),
    ])
    _bars(verify_ax, labels, values, colors, "entries/s")
    _ratio_target(verify_ax, result, "verify_apply_ratio", "raw_verify_per_s", "raw verify")
    verify_ax.set_title("a peer's entries: verify + apply vs raw verify", fontsize=10)
    fig.suptitle(TITLES["ledger"], fontsize=10)
    return _save(fig, path)


def plot_sync(result: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(8, 2.4))
    labels, values, colors = _pairs(result, [
        ("raw_verify_per_s", "raw verify, 1 thread (ceiling)", CEILING),
        ("entries_per_s", "catch-up from a peer process (ours)", OURS),
    ])
    _bars(ax, labels, values, colors, "entries/s")
    target = result.get("targets", {}).get("entries_per_s", result.get("target_entries_per_s"))
    if target is not None:
        ax.axvline(target, color=TARGET, linestyle="--", linewidth=1, label=f"target {target:,} entries/s")
        ax.legend(fontsize=8, loc="lower right")
    ax.set_title(f"{TITLES['sync']} ({result.get('entries', '?'):,} entries)", fontsize=10)
    return _save(fig, path)


def write_plots(results: dict, img_dir: Path) -> dict[str, Path]:
    """Every plot the results allow, as ``img_dir/<name>.png``; returns them by name."""
    img_dir = Path(img_dir)
    img_dir.mkdir(parents=True, exist_ok=True)
    suites = results.get("suites", {})
    written: dict[str, Path] = {}
    runs = gossip_runs(results)
    if runs:
        written["gossip_latency"] = plot_gossip_latency(runs, img_dir / "gossip_latency.png")
        written["gossip_cost"] = plot_gossip_cost(runs, img_dir / "gossip_cost.png")
    for name, plot in [("job", plot_job), ("ledger", plot_ledger), ("sync", plot_sync)]:
        if usable(suites.get(name)):
            written[name] = plot(suites[name], img_dir / f"{name}.png")
    return written
