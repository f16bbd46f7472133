"""The gateway benchmark's arithmetic (``scripts/bench.py gateway``): from
synthetic stream records, no node started and nothing timed. The figures it
reports must mean what docs/benchmarks.md says they mean, and a load level
that falls short must say why from its own figures."""

from __future__ import annotations

import importlib.util
import json
import struct
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_gateway_under_test", SCRIPTS / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stream(start: float, ttft: float, tokens: int, rate: float, *, standin_rate: float | None = None,
           error: str | None = None) -> dict:
    """A stream that got its first token ``ttft`` after ``start`` and the rest at ``rate``."""
    first = start + ttft
    last = first + (tokens - 1) / rate
    standin_rate = standin_rate or rate
    return {"start": start, "first": first, "last": last, "end": last + 0.001, "tokens": tokens,
            "eval_count": tokens, "eval_duration_ns": int(tokens / standin_rate * 1e9), "error": error}


CPU_IDLE = {"gateway_node": 20.0, "provider_nodes": 30.0, "standins": 10.0, "bench_client": 5.0}


def test_a_level_that_keeps_up_sums_per_stream_rates_and_needs_no_excuse(bench):
    records = [stream(0.0, 0.010 + i / 1000, 150, 50.0) for i in range(10)]
    level = bench.load_figures(records, streams=10, rate=50.0, max_tokens=150, wall_s=3.1,
                               cpu_percent=CPU_IDLE, machine_cpu_percent=40.0, cores=2)
    assert level["completed"] == 10 and level["errors"] == 0
    assert level["nominal_tokens_per_s"] == 500
    assert level["received_tokens_per_s"] == pytest.approx(500, rel=1e-3)
    assert level["standin_tokens_per_s"] == pytest.approx(500, rel=1e-3)
    assert level["ratio"] == pytest.approx(1.0, abs=2e-3) and level["nominal_ratio"] == pytest.approx(1.0, abs=2e-3)
    assert level["per_stream_tokens_per_s_median"] == pytest.approx(50, rel=1e-3)
    assert level["ttft_ms_p50"] == pytest.approx(15, abs=1) and level["ttft_ms_p95"] == pytest.approx(19, abs=1)
    assert level["goodput_tokens_per_s"] == pytest.approx(1500 / 3.1, rel=1e-3)
    assert level["why"] is None
    json.dumps(level)  # the --json line carries it as is


def test_a_cpu_bound_gateway_is_named_with_its_share(bench):
    # the stand-ins kept their 50 tokens/s; the clients got 30 each
    records = [stream(0.0, 0.2, 150, 30.0, standin_rate=50.0) for _ in range(100)]
    cpu = {"gateway_node": 98.0, "provider_nodes": 60.0, "standins": 25.0, "bench_client": 15.0}
    level = bench.load_figures(records, streams=100, rate=50.0, max_tokens=150, wall_s=5.2,
                               cpu_percent=cpu, machine_cpu_percent=99.0, cores=2)
    assert level["ratio"] == pytest.approx(0.6, abs=0.01)
    assert "gateway node's process is CPU-bound at 98% of one core" in level["why"]
    assert "99% of its 2 cores busy" in level["why"] and "bench client 15%" in level["why"]
    assert "stand-ins themselves" not in level["why"]
    # 100 x 150 tokens in 5.2 s: 98% of a core is 0.34 ms of gateway CPU per token, 198% in all 0.69 ms,
    # so 2 cores relay at most about 2,914 tokens/s
    assert level["cpu_ms_per_token"]["gateway_node"] == pytest.approx(0.98 * 5.2 * 1000 / 15000, abs=1e-3)
    assert level["cpu_bound_tokens_per_s"] == round(2 * 15000 / (1.98 * 5.2))
    assert "each token relayed costs 0.69 ms of CPU" in level["why"] and "at most about 2,914 tokens/s" in level["why"]
    assert level["other_processes_cpu_percent"] == 0  # 99% of 2 cores, all of it ours (198% of one)
    assert "other processes" not in level["why"]


def test_other_work_on_a_shared_machine_is_counted_and_said(bench):
    records = [stream(0.0, 0.3, 150, 20.0, standin_rate=50.0) for _ in range(50)]
    cpu = {"gateway_node": 40.0, "provider_nodes": 60.0, "standins": 12.0, "bench_client": 9.0}
    level = bench.load_figures(records, streams=50, rate=50.0, max_tokens=150, wall_s=8.0,
                               cpu_percent=cpu, machine_cpu_percent=99.5, cores=2)
    assert level["other_processes_cpu_percent"] == 78.0  # 199% busy, 121% of it ours
    assert "other processes 78%" in level["why"] and "other processes on the machine took 78% of a core" in level["why"]
    assert "CPU-bound" not in level["why"]


def test_stand_ins_that_fell_behind_and_failed_streams_are_said(bench):
    records = [stream(0.0, 0.1, 150, 35.0, standin_rate=36.0) for _ in range(48)]
    records += [stream(0.0, 0.1, 20, 35.0, error="stream ended without its final chunk after 20 of 150 tokens"),
                {"start": 0.0, "first": None, "last": None, "end": 0.05, "tokens": 0, "eval_count": 0,
                 "eval_duration_ns": 0, "error": "HTTP 429: spending limit"}]
    level = bench.load_figures(records, streams=50, rate=50.0, max_tokens=150, wall_s=4.5,
                               cpu_percent=CPU_IDLE, machine_cpu_percent=60.0, cores=2)
    assert (level["completed"], level["errors"]) == (48, 2)
    assert level["first_error"].startswith("stream ended without")
    assert level["nominal_ratio"] == pytest.approx(48 * 35 / 2500, abs=0.01)
    why = level["why"]
    assert "2 of 50 streams failed" in why
    assert "stand-ins themselves decoded only 1,728 of the 2,500 tokens/s asked" in why
    assert "CPU-bound" not in why and "saturated" not in why
    # the failed streams' tokens still count as received, not as per-stream rates
    assert level["goodput_tokens_per_s"] == pytest.approx((48 * 150 + 20) / 4.5, rel=1e-3)


def test_a_shortfall_without_saturation_says_so(bench):
    records = [stream(0.0, 0.05, 150, 40.0, standin_rate=50.0) for _ in range(10)]
    level = bench.load_figures(records, streams=10, rate=50.0, max_tokens=150, wall_s=4.0,
                               cpu_percent=CPU_IDLE, machine_cpu_percent=30.0, cores=2)
    assert level["why"].startswith("no CPU saturation seen (gateway node 20% of a core, machine 30% busy)")


def test_surface_figures_pair_the_same_prompts(bench):
    direct = [{"ttft": 0.005, "tps": 500.0}, {"ttft": 0.006, "tps": 498.0}, {"ttft": 0.004, "tps": 502.0}]
    gateway = [{"ttft": 0.009, "tps": 495.0}, {"ttft": 0.030, "tps": 490.0}, {"ttft": 0.014, "tps": 497.0}]
    figures = bench.surface_figures("openai", direct, gateway)
    # the median of each pair's difference (4, 24, 10 ms), not the difference of the medians (14 - 5)
    assert figures["openai_added_ttft_ms_median"] == 10.0
    assert figures["openai_direct_ttft_ms_median"] == 5.0 and figures["openai_gateway_ttft_ms_median"] == 14.0
    assert figures["openai_throughput_ratio"] == round(495 / 500, 3)
    only_gateway = bench.surface_figures("openai", [], gateway)
    assert set(only_gateway) == {"openai_gateway_ttft_ms_median", "openai_gateway_tokens_per_s_median"}


def test_stream_counts_are_checked(bench):
    assert bench._stream_counts("100,10, 50,10") == [10, 50, 100]
    for bad in ("ten", "0,5", ""):
        with pytest.raises(SystemExit):
            bench._stream_counts(bad)


def test_the_load_plot_is_a_png(bench, tmp_path):
    pytest.importorskip("matplotlib")
    levels = []
    for streams, received in [(10, 498.0), (50, 2400.0), (100, 3100.0)]:
        records = [stream(0.0, 0.02, 150, received / streams, standin_rate=50.0) for _ in range(streams)]
        levels.append(bench.load_figures(records, streams=streams, rate=50.0, max_tokens=150, wall_s=3.5,
                                         cpu_percent=CPU_IDLE, machine_cpu_percent=70.0, cores=2))
    path = bench.plot_gateway_load({"load": levels, "load_standin_tokens_per_s": 50.0}, tmp_path / "img" / "g.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 600 and height >= 300
