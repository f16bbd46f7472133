"""The documents ``scripts/bench.py all`` writes: ``benchmarks.json``, the
plots (``bench_plots``) and ``benchmarks.md``, all generated from one result
object::

    {"command": "scripts/bench.py all ...", "quick": false,
     "machine": {...}, "started": "...", "duration_s": ..., "suite_seconds": {...},
     "suites": {"ledger": {...}, "sync": {...}, "job": {...},
                "gossip": [{"nodes": 5, ...}, {"nodes": 10, ...}, ...]}}

Each suite's dict is exactly what ``scripts/bench.py SUITE --json`` prints; a
suite that failed is ``{"suite": name, "error": "..."}``.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# figures where lower is better; every other target is a floor
LOWER_IS_BETTER_MARKERS = ("_ms", "seconds")

LABELS = {
    # ledger
    "entries": "entries",
    "runs": "runs (interleaved)",
    "group": "entries per synced write",
    "raw_verify_per_s": "raw ed25519 verify, 1 thread (PyNaCl), /s",
    "raw_verify_2_threads_per_s": "raw ed25519 verify, 2 threads (PyNaCl), /s",
    "verify_apply_per_s": "verify + apply, pipelined batches, 2 threads, /s",
    "verify_apply_single_thread_per_s": "verify + apply, one by one, 1 thread, /s",
    "raw_sign_per_s": "raw ed25519 sign (PyNaCl), /s",
    "local_append_per_s": "local append (sign + apply + synced write), /s",
    "verify_apply_ratio": "verify + apply (batched) / raw verify",
    "verify_apply_single_thread_ratio": "verify + apply (one by one) / raw verify",
    "verify_apply_vs_2_thread_verify_ratio": "verify + apply (batched) / 2-thread raw verify",
    "append_sign_ratio": "local append / raw sign",
    "verify_apply_chunk_median_ratio": "verify + apply (batched) / raw verify, median of per-chunk ratios",
    "append_sign_chunk_median_ratio": "local append / raw sign, median of per-chunk ratios",
    "local_append_pipelined_per_s": "local append, group writes pipelined (Ledger.begin_commit), /s",
    "append_pipelined_sign_ratio": "local append, group writes pipelined / raw sign",
    "append_pipelined_sign_chunk_median_ratio": "local append, group writes pipelined / raw sign, median of per-chunk ratios",
    # sync
    "seconds": "seconds",
    "entries_per_s": "catch-up rate, entries/s",
    "state_hash_equal": "state hashes equal",
    "applied": "entries applied",
    "sessions": "sync sessions",
    "server": "server",
    "node_rss_mb_after": "caught-up node's RSS, MiB",
    "target_entries_per_s": "target, entries/s",
    # job
    "prompts": "prompts",
    "max_tokens": "tokens per prompt",
    "standin_tokens_per_s": "stand-in rate, tokens/s",
    "direct_ttft_ms_median": "time to first token, direct, ms (median)",
    "network_ttft_ms_median": "time to first token, through the network, ms (median)",
    "added_ttft_ms_median": "added time to first token, ms (median)",
    "direct_tokens_per_s_median": "tokens/s, direct (median)",
    "network_tokens_per_s_median": "tokens/s, through the network (median)",
    "throughput_ratio": "network tokens/s / direct tokens/s",
    "concurrent_jobs": "jobs submitted at once",
    "concurrent_completed": "of those, completed",
    "concurrent_seconds": "seconds for all of them",
    # gossip
    "nodes": "node processes",
    "offers_requested": "offers asked for",
    "offers_measured": "offers seen by every node (measured)",
    "idle_window_s": "idle window, s",
    "every_node_median_ms": "until every node holds an offer, ms (median)",
    "every_node_p95_ms": "until every node holds an offer, ms (p95)",
    "per_node_median_ms": "until one node holds an offer, ms (median)",
    "idle_rss_mb_median": "RSS per node, MiB (median)",
    "idle_rss_mb_max": "RSS per node, MiB (max)",
    "idle_cpu_percent_median": "idle CPU per node, % of a core (median)",
    "idle_cpu_percent_max": "idle CPU per node, % of a core (max)",
    "up_seconds": "seconds until every node answered",
    "heartbeat_s": "offer heartbeat, s",
}

INTRO = {
    "ledger": "Entries from a peer verified and applied (200 accounts sending and receiving, LevelDB, "
              "synced groups), and local appends, against PyNaCl's raw verify and sign, timed chunk by "
              "chunk in turn so both see the same machine load.",
    "sync": "A fresh LevelDB node catching up a peer process's ledger over libp2p on 127.0.0.1, every "
            "signature verified and every rule applied, next to the raw 1-thread verify rate.",
    "job": "Three provider processes, each with an Ollama stand-in, and a consumer: the same prompts "
           "straight from a stand-in with the official client and through `p2pgpu submit` (API, "
           "ranking, hold, libp2p stream, provider, vouchers); then jobs submitted all at once.",
    "gossip": "N node processes on 127.0.0.1, one provider signing a new offer every heartbeat; every "
              "node records when it accepted each offer, all on the same clock. Then 5 s with offers "
              "flowing and no jobs, to read each node process's RSS and CPU from /proc.",
}

SUITE_ORDER = ["gossip", "job", "ledger", "sync"]
SKIP_KEYS = {"suite", "machine", "targets"}


# ------------------------------------------------------------------ machine

def _read(path: str) -> str:
    try:
        with open(path) as handle:
            return handle.read()
    except OSError:
        return ""


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def machine_info() -> dict:
    """What the figures depend on: CPU, cores, RAM, Python, OS, the code's commit, when, and the load."""
    cpu = next((line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines()
                if line.lower().startswith(("model name", "hardware", "cpu model"))), "") or platform.processor()
    mem_kb = next((int(line.split()[1]) for line in _read("/proc/meminfo").splitlines()
                   if line.startswith("MemTotal:")), 0)
    commit = _git("rev-parse", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = []
    return {
        "cpu": cpu or "unknown",
        "cores": os.cpu_count(),
        "ram_gib": round(mem_kb / 2**20, 1) if mem_kb else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": commit or "unknown",
        "git_dirty": dirty,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average_at_start": load,
    }


# ------------------------------------------------------------------ formatting

def fmt(value) -> str:
    """One figure as the markdown shows it."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e15:
            return f"{int(value):,}"
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:g}"
    if value is None:
        return "–"
    return str(value)


def lower_is_better(key: str) -> bool:
    return any(marker in key for marker in LOWER_IS_BETTER_MARKERS)


def target_text(key: str, target) -> str:
    return f"≤ {fmt(target)}" if lower_is_better(key) else f"≥ {fmt(target)}"


def met(key: str, value, target) -> bool | None:
    if not isinstance(value, (int, float)) or not isinstance(target, (int, float)):
        return None
    return value <= target if lower_is_better(key) else value >= target


def met_text(ok: bool | None) -> str:
    return {True: "met", False: "**not met**", None: "–"}[ok]


def targets_of(result: dict) -> dict:
    targets = dict(result.get("targets") or {})
    if "target_entries_per_s" in result:  # the sync suite names its one target at the top level
        targets.setdefault("entries_per_s", result["target_entries_per_s"])
    return targets


def is_figure(value) -> bool:
    return isinstance(value, (int, float, str, bool)) or value is None


def label(key: str) -> str:
    return LABELS.get(key, key.replace("_", " "))


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def gossip_runs(results: dict) -> list[dict]:
    runs = results.get("suites", {}).get("gossip") or []
    return [runs] if isinstance(runs, dict) else list(runs)


# ------------------------------------------------------------------ markdown

def target_rows(results: dict) -> list[list[str]]:
    """suite | figure | measured | target | met, for every target of every suite."""
    rows = []
    suites = results.get("suites", {})
    for name in SUITE_ORDER:
        runs = gossip_runs(results) if name == "gossip" else [suites.get(name)]
        for result in runs:
            if not isinstance(result, dict):
                continue
            where = f"gossip, {result.get('nodes', '?')} nodes" if name == "gossip" else name
            if "error" in result:
                rows.append([where, "–", "failed", "–", "**not met**"])
                continue
            for key, target in targets_of(result).items():
                value = result.get(key)
                rows.append([where, f"{label(key)} (`{key}`)", fmt(value), target_text(key, target),
                             met_text(met(key, value, target))])
    return rows


def figure_table(result: dict) -> list[str]:
    """Every scalar figure of one suite's result, with its target where it has one."""
    targets = targets_of(result)
    rows = []
    for key, value in result.items():
        if key in SKIP_KEYS or not is_figure(value):
            continue
        target = targets.get(key)
        rows.append([label(key), f"`{key}`", fmt(value),
                     target_text(key, target) if key in targets else "",
                     met_text(met(key, value, target)) if key in targets else ""])
    return _table(["figure", "key", "measured", "target", "met"], rows)


def gossip_section(runs: list[dict], plots: dict[str, str]) -> list[str]:
    lines = ["## Gossip", "", INTRO["gossip"], ""]
    good = sorted((r for r in runs if "error" not in r), key=lambda r: r.get("nodes", 0))
    for failed in (r for r in runs if "error" in r):
        lines += [f"- {failed.get('nodes', '?')} nodes: **failed**: {failed['error']}"]
    if not good:
        return lines + [""]
    largest = good[-1]
    targets = targets_of(largest)
    lines += [
        f"**At {largest['nodes']} node processes** every node held a new offer a median "
        f"**{fmt(largest.get('every_node_median_ms'))} ms** after it was signed (p95 "
        f"**{fmt(largest.get('every_node_p95_ms'))} ms**; targets {target_text('every_node_median_ms', targets.get('every_node_median_ms'))} / "
        f"{target_text('every_node_p95_ms', targets.get('every_node_p95_ms'))} ms), and each idle node process "
        f"used **{fmt(largest.get('idle_rss_mb_median'))} MiB RSS** (max {fmt(largest.get('idle_rss_mb_max'))}) "
        f"and **{fmt(largest.get('idle_cpu_percent_median'))} % of a core** (max "
        f"{fmt(largest.get('idle_cpu_percent_max'))} %).",
        "",
    ]
    rows = []
    for run in good:
        oks = [met(k, run.get(k), t) for k, t in targets_of(run).items()]
        offers = fmt(run.get("offers_measured"))
        if run.get("offers_requested") is not None:
            offers += f" of {fmt(run['offers_requested'])}"
        rows.append([
            fmt(run.get("nodes")), offers,
            fmt(run.get("every_node_median_ms")), fmt(run.get("every_node_p95_ms")), fmt(run.get("per_node_median_ms")),
            fmt(run.get("idle_rss_mb_median")), fmt(run.get("idle_rss_mb_max")),
            fmt(run.get("idle_cpu_percent_median")), fmt(run.get("idle_cpu_percent_max")),
            met_text(all(oks) if oks and None not in oks else None),
        ])
    lines += _table(["nodes", "offers", "every node: median ms", "every node: p95 ms", "one node: median ms",
                     "RSS/node median MiB", "RSS/node max MiB", "CPU/node median %", "CPU/node max %",
                     "latency targets"], rows)
    lines += [""]
    for name in ("gossip_latency", "gossip_cost"):
        if name in plots:
            lines += [f"![{name}]({plots[name]})", ""]
    # every figure of every run, one column per node count
    keys: list[str] = []
    for run in good:
        keys += [k for k, v in run.items() if k not in SKIP_KEYS and is_figure(v) and k not in keys]
    header = ["figure", "key"] + [f"{r['nodes']} nodes" for r in good]
    rows = [[label(k), f"`{k}`"] + [fmt(r.get(k)) for r in good] for k in keys]
    lines += ["All figures, by node count:", ""] + _table(header, rows) + [""]
    return lines


def suite_section(name: str, result, plots: dict[str, str]) -> list[str]:
    lines = [f"## {name.capitalize()}", "", INTRO.get(name, ""), ""]
    if not isinstance(result, dict):
        return lines + ["Not run.", ""]
    if "error" in result:
        return lines + [f"**Failed**: {result['error']}", ""]
    lines += figure_table(result) + [""]
    if name in plots:
        lines += [f"![{name}]({plots[name]})", ""]
    return lines


def render_markdown(results: dict, plots: dict[str, str]) -> str:
    """``benchmarks.md`` for ``results``; ``plots`` maps plot name to its path relative to the markdown."""
    machine = results.get("machine", {})
    lines = [
        "# Benchmarks",
        "",
        "Generated by `scripts/bench.py all` (from `benchmarks.json`, beside this file); run it again "
        "rather than editing this page. Each suite times ours and its reference ceiling in the same run, "
        "on the machine below; speed is measured here and never asserted in tests.",
        "",
    ]
    if results.get("quick"):
        lines += ["> **Smoke-test sizes (`--quick`)**: these figures are not representative.", ""]
    lines += ["Command:", "", "```sh", results.get("command", "scripts/bench.py all"), "```", ""]
    ram = machine.get("ram_gib")
    commit = machine.get("git_commit", "unknown")
    load = machine.get("load_average_at_start") or []
    lines += _table(["machine", ""], [
        ["CPU", str(machine.get("cpu", "unknown"))],
        ["cores", fmt(machine.get("cores"))],
        ["RAM", f"{fmt(ram)} GiB" if ram is not None else "unknown"],
        ["Python", str(machine.get("python", "?"))],
        ["platform", str(machine.get("platform", "?"))],
        ["commit", f"`{commit}`" + (" (with uncommitted changes)" if machine.get("git_dirty") else "")],
        ["date", str(machine.get("date", "?"))],
        ["load average at start", ", ".join(fmt(x) for x in load) if load else "–"],
        ["duration", f"{fmt(results.get('duration_s'))} s" if results.get("duration_s") is not None else "–"],
    ])
    lines += ["", "## Targets", ""]
    lines += _table(["suite", "figure", "measured", "target", "met"], target_rows(results)) + [""]
    suites = results.get("suites", {})
    for name in SUITE_ORDER:
        if name == "gossip":
            lines += gossip_section(gossip_runs(results), plots)
        else:
            lines += suite_section(name, suites.get(name), plots)
    lines += ["## Gateway", "", "Measured on its own (`scripts/bench.py gateway --json`): see "
              "[benchmarks-gateway.md](benchmarks-gateway.md).", ""]
    return "\n".join(lines).rstrip() + "\n"


# ------------------------------------------------------------------ files

def write_json(results: dict, out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "benchmarks.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path


def write_markdown(results: dict, plots: dict[str, Path], out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    relative = {name: os.path.relpath(path, out_dir).replace(os.sep, "/") for name, path in plots.items()}
    path = out_dir / "benchmarks.md"
    path.write_text(render_markdown(results, relative))
    return path


def write_report(results: dict, out_dir: Path) -> dict[str, Path]:
    """``out_dir/benchmarks.json``, ``out_dir/img/*.png``, ``out_dir/benchmarks.md``; returns every path."""
    import bench_plots  # matplotlib: only here, so the markdown alone needs nothing extra

    out_dir = Path(out_dir)
    written = {"json": write_json(results, out_dir)}
    plots = bench_plots.write_plots(results, out_dir / "img")
    written.update(plots)
    written["markdown"] = write_markdown(results, plots, out_dir)
    return written
