"""``scripts/bench.py all`` turns suite results into docs: benchmarks.json, PNG
plots and benchmarks.md. Fed synthetic results (no suite is run, nothing is
timed), the documents must exist, the plots must be real PNGs, and the page
must embed every plot and show every figure against its target."""

from __future__ import annotations

import copy
import importlib.util
import json
import struct
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
sys.path.insert(0, str(SCRIPTS))

import bench_report  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOTS = ["gossip_latency", "gossip_cost", "job", "ledger", "sync"]


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_under_test", SCRIPTS / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def gossip_result(nodes: int) -> dict:
    return {
        "suite": "gossip", "nodes": nodes, "offers_requested": 20, "offers_measured": 20,
        "every_node_median_ms": 10.0 + nodes, "every_node_p95_ms": 40 + 2 * nodes, "per_node_median_ms": 4.5 + nodes,
        "targets": {"every_node_median_ms": 100, "every_node_p95_ms": 250},
        "idle_rss_mb_median": 60.0 + nodes / 10, "idle_rss_mb_max": 71.3 + nodes,
        "idle_cpu_percent_median": 0.8 + nodes / 100, "idle_cpu_percent_max": 2.4 + nodes / 10,
        "idle_rss_mb_per_node": [60.0 + i / 10 for i in range(nodes)],
        "idle_cpu_percent_per_node": [0.8 + i / 100 for i in range(nodes)],
        "idle_window_s": 5.0, "up_seconds": 1.5 * nodes, "heartbeat_s": 0.5,
        "machine": {"python": "3.11.9", "cores": 8, "platform": "Linux"},
    }


def synthetic_results() -> dict:
    machine = {"python": "3.11.9", "cores": 8, "platform": "Linux"}
    return {
        "command": "scripts/bench.py all --gossip-nodes 5,10,15,20",
        "quick": False,
        "machine": {
            "cpu": "Synthetic CPU 9000 @ 3.00GHz", "cores": 8, "ram_gib": 31.2, "python": "3.11.9",
            "platform": "Linux-6.1-x86_64", "git_commit": "0123456789abcdef0123456789abcdef01234567",
            "git_dirty": False, "date": "2025-01-02T03:04:05+00:00", "load_average_at_start": [0.12, 0.3, 0.25],
        },
        "duration_s": 432.1,
        "suite_seconds": {"ledger": 40.0, "sync": 30.0, "job": 50.0, "gossip_5": 30.0, "gossip_20": 80.0},
        "suites": {
            "ledger": {
                "suite": "ledger", "entries": 20000, "runs": 3, "group": 100,
                "raw_verify_per_s": 21345, "raw_verify_2_threads_per_s": 40123, "verify_apply_per_s": 17001,
                "verify_apply_single_thread_per_s": 12987, "raw_sign_per_s": 43210, "local_append_per_s": 23456,
                "verify_apply_ratio": 0.796, "verify_apply_single_thread_ratio": 0.608,
                "verify_apply_vs_2_thread_verify_ratio": 0.424, "append_sign_ratio": 0.543,
                "targets": {"verify_apply_ratio": 0.70, "append_sign_ratio": 0.50}, "machine": machine,
            },
            "sync": {
                "suite": "sync", "entries": 50000, "seconds": 6.789, "entries_per_s": 7364.9,
                "state_hash_equal": True, "applied": 50000, "sessions": 1, "server": "separate process",
                "raw_verify_per_s": 20876, "node_rss_mb_after": 123.4, "target_entries_per_s": 5000,
                "targets": {"entries_per_s": 5000}, "machine": machine,
            },
            "job": {  # added time to first token misses its target on purpose
                "suite": "job", "prompts": 20, "max_tokens": 200, "standin_tokens_per_s": 500.0,
                "direct_ttft_ms_median": 3.1, "network_ttft_ms_median": 25.7, "added_ttft_ms_median": 22.6,
                "direct_tokens_per_s_median": 498.7, "network_tokens_per_s_median": 489.2, "throughput_ratio": 0.981,
                "concurrent_jobs": 20, "concurrent_completed": 20, "concurrent_seconds": 2.34,
                "targets": {"added_ttft_ms_median": 15, "throughput_ratio": 0.95, "concurrent_completed": 20},
                "machine": machine,
            },
            "gossip": [gossip_result(n) for n in (5, 10, 15, 20)],
        },
        "failed": [],
    }


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > 5_000, (path, len(data))
    width, height = struct.unpack(">II", data[16:24])  # IHDR
    assert width >= 300 and height >= 200, (path, width, height)


def figure_rows(markdown: str, section: str) -> dict[str, str]:
    """key -> the row of a section's figure tables that names it."""
    rows = {}
    body = markdown.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    for line in body.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        keyed = [c for c in cells if c.startswith("`") and c.endswith("`")]
        if line.startswith("|") and keyed:
            rows.setdefault(keyed[0].strip("`"), line)
    return rows


def test_report_writes_json_plots_and_a_page_showing_every_figure(tmp_path):
    results = synthetic_results()
    written = bench_report.write_report(copy.deepcopy(results), tmp_path / "docs")

    assert json.loads((tmp_path / "docs" / "benchmarks.json").read_text()) == results
    for name in PLOTS:
        assert written[name] == tmp_path / "docs" / "img" / f"{name}.png"
        assert_png(written[name])
    markdown = (tmp_path / "docs" / "benchmarks.md").read_text()
    assert written["markdown"] == tmp_path / "docs" / "benchmarks.md"

    for name in PLOTS:  # every plot embedded, by a path relative to the page
        assert f"](img/{name}.png)" in markdown
    assert "```sh\nscripts/bench.py all --gossip-nodes 5,10,15,20\n```" in markdown
    for text in ["Synthetic CPU 9000 @ 3.00GHz", "| cores | 8 |", "31.2 GiB", "3.11.9", "Linux-6.1-x86_64",
                 "0123456789abcdef0123456789abcdef01234567", "2025-01-02T03:04:05+00:00"]:
        assert text in markdown, text

    rows = {name: figure_rows(markdown, name.capitalize()) for name in ("ledger", "sync", "job", "gossip")}
    for name in ("ledger", "sync", "job"):
        for key, value in results["suites"][name].items():
            if key in ("suite", "machine", "targets"):
                continue
            assert key in rows[name], (name, key)
            assert f"| {bench_report.fmt(value)} |" in rows[name][key], (name, key, rows[name][key])
    for run in results["suites"]["gossip"]:  # one column per node count
        for key, value in run.items():
            if isinstance(value, (int, float, str)) and key != "suite":
                assert f"| {bench_report.fmt(value)} |" in rows["gossip"][key], (key, rows["gossip"][key])

    # figures against targets, met or not
    assert rows["ledger"]["verify_apply_ratio"].endswith("| 0.796 | ≥ 0.7 | met |")
    assert rows["ledger"]["append_sign_ratio"].endswith("| 0.543 | ≥ 0.5 | met |")
    assert rows["sync"]["entries_per_s"].endswith("| 7,365 | ≥ 5,000 | met |")
    assert rows["job"]["added_ttft_ms_median"].endswith("| 22.6 | ≤ 15 | **not met** |")
    assert rows["job"]["throughput_ratio"].endswith("| 0.981 | ≥ 0.95 | met |")
    assert rows["job"]["concurrent_completed"].endswith("| 20 | ≥ 20 | met |")
    assert "| gossip, 20 nodes | until every node holds an offer, ms (p95) (`every_node_p95_ms`) | 80 | ≤ 250 | met |" \
        in markdown

    # gossip at 20 nodes, and RSS and CPU per node at every size
    assert "**At 20 node processes** every node held a new offer a median **30 ms**" in markdown
    assert "**62 MiB RSS** (max 91.3) and **1 % of a core** (max 4.4 %)" in markdown
    for run in results["suites"]["gossip"]:
        n = run["nodes"]
        row = f"| {n} | 20 of 20 | {bench_report.fmt(run['every_node_median_ms'])} | {run['every_node_p95_ms']} |"
        assert row in markdown, row
        assert (f"| {bench_report.fmt(run['idle_rss_mb_median'])} | {bench_report.fmt(run['idle_rss_mb_max'])} | "
                f"{bench_report.fmt(run['idle_cpu_percent_median'])} | "
                f"{bench_report.fmt(run['idle_cpu_percent_max'])} | met |") in markdown
    assert "--quick" not in markdown


def test_a_failed_suite_is_shown_as_failed_and_the_rest_still_plotted(tmp_path):
    results = synthetic_results()
    results["suites"]["job"] = {"suite": "job", "error": "offers did not reach the consumer"}
    results["suites"]["gossip"][-1] = {"suite": "gossip", "error": "the offer never reached every node", "nodes": 20}
    results["quick"] = True
    written = bench_report.write_report(results, tmp_path)
    assert "job" not in written
    for name in ("gossip_latency", "gossip_cost", "ledger", "sync"):
        assert_png(written[name])
    markdown = written["markdown"].read_text()
    assert "**Failed**: offers did not reach the consumer" in markdown
    assert "- 20 nodes: **failed**: the offer never reached every node" in markdown
    assert "**At 15 node processes**" in markdown
    assert "| gossip, 20 nodes | – | failed | – | **not met** |" in markdown
    assert "Smoke-test sizes (`--quick`)" in markdown


def test_all_runs_every_suite_and_gossip_at_each_size(tmp_path, monkeypatch, capsys):
    bench = load_bench()
    calls = []
    synthetic = synthetic_results()["suites"]

    def fake(name):
        def run(args):
            calls.append((name, args))
            if name == "gossip":
                return gossip_result(args.nodes)
            return copy.deepcopy(synthetic[name])
        return run

    monkeypatch.setattr(bench, "SUITES", {name: fake(name) for name in ("ledger", "sync", "job", "gossip")})
    argv = ["all", "--out", str(tmp_path / "out"), "--gossip-nodes", "20,5", "--quick", "--json"]
    assert bench.main(argv) == 0

    assert [(name, getattr(args, "nodes", None) if name == "gossip" else None) for name, args in calls] == [
        ("ledger", None), ("sync", None), ("job", None), ("gossip", 5), ("gossip", 20)]
    by_name = {name: args for name, args in calls}
    assert (by_name["ledger"].entries, by_name["ledger"].runs) == (2_000, 1)  # quick sizes
    assert by_name["sync"].entries == 2_000 and by_name["job"].rounds == 3
    assert (by_name["gossip"].rounds, by_name["gossip"].settle) == (5, 2.0)

    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    written = json.loads((tmp_path / "out" / "benchmarks.json").read_text())
    assert printed == written
    assert written["command"] == "scripts/bench.py " + " ".join(argv)
    assert written["quick"] is True and written["failed"] == []
    assert [r["nodes"] for r in written["suites"]["gossip"]] == [5, 20]
    assert {"cpu", "cores", "ram_gib", "python", "platform", "git_commit", "date"} <= set(written["machine"])
    for name in PLOTS:
        assert_png(tmp_path / "out" / "img" / f"{name}.png")
    assert "](img/gossip_latency.png)" in (tmp_path / "out" / "benchmarks.md").read_text()


def test_all_sizes_without_quick_and_a_failure_exits_non_zero(tmp_path, monkeypatch):
    bench = load_bench()
    seen = {}

    def gossip(args):
        seen[args.nodes] = args
        raise SystemExit("the offer never reached every node")

    def other(name):
        def run(args):
            seen[name] = args
            return copy.deepcopy(synthetic_results()["suites"][name])
        return run

    suites = {name: other(name) for name in ("ledger", "sync", "job")}
    monkeypatch.setattr(bench, "SUITES", {**suites, "gossip": gossip})
    assert bench.main(["all", "--out", str(tmp_path)]) == 1
    assert sorted(k for k in seen if isinstance(k, int)) == [5, 10, 15, 20]
    assert (seen["ledger"].entries, seen["ledger"].runs, seen["sync"].entries, seen["job"].rounds) == (
        20_000, 3, 50_000, 20)
    written = json.loads((tmp_path / "benchmarks.json").read_text())
    assert written["failed"] == ["gossip"] * 4
    assert "the offer never reached every node" in (tmp_path / "benchmarks.md").read_text()


def test_all_refuses_without_matplotlib_and_says_how_to_get_it(tmp_path, monkeypatch):
    bench = load_bench()
    ran = []
    monkeypatch.setattr(bench, "SUITES", {name: ran.append for name in ("ledger", "sync", "job", "gossip")})
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    with pytest.raises(SystemExit) as refused:
        bench.main(["all", "--out", str(tmp_path)])
    assert "matplotlib" in str(refused.value.code) and "pip install -e '.[bench]'" in str(refused.value.code)
    assert ran == [] and list(tmp_path.iterdir()) == []
