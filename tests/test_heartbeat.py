"""Our offer's heartbeat rules (``p2pgpu.core.heartbeat``): what a beat
reads, what it advertises, why it offers nothing, and when the next beat
is due. Pure: times are plain numbers."""

from __future__ import annotations

import math

from p2pgpu.core.heartbeat import (
    BeatPlan, HeartbeatConfig, book_max_ttl_ms, next_beat_at, offer_refusal, plan_beat, slots_free,
)

CONFIG = HeartbeatConfig(heartbeat_s=10.0, min_offer_interval_s=0.25, early_offer_delay_s=0.05,
                         backend_refresh=0.9, hardware_probe_interval_s=30.0)


def beat(now, *, models=True, asked=0.0, recheck=False, hardware=True, probed=0.0):
    return plan_beat(CONFIG, now, have_models=models, asked_at_s=asked, recheck_backend=recheck,
                     have_hardware=hardware, probed_at_s=probed)


def test_the_first_beat_reads_everything():
    assert plan_beat(CONFIG, 0.0, have_models=False, asked_at_s=-math.inf, recheck_backend=False,
                     have_hardware=False, probed_at_s=-math.inf) == BeatPlan(True, True)


def test_an_early_beat_reuses_the_model_list_unless_ollama_failed_a_job():
    assert beat(1.0) == BeatPlan(ask_backend=False, probe_hardware=False)
    assert beat(1.0, recheck=True).ask_backend
    assert beat(1.0, models=False).ask_backend  # the last beat could not read it
    assert beat(9.0).ask_backend  # about a heartbeat since it was read
    assert not beat(8.9).ask_backend


def test_the_gpus_are_probed_every_probe_interval():
    assert not beat(29.9).probe_hardware
    assert beat(30.0).probe_hardware
    assert beat(1.0, hardware=False).probe_hardware


def test_why_we_offer_nothing():
    assert offer_refusal(models=0, gpus=1, offer_cpu=False, backend_host="http://o:1") == \
        "Ollama at http://o:1 serves no models"
    no_gpu = offer_refusal(models=2, gpus=0, offer_cpu=False, backend_host="h")
    assert no_gpu is not None and "--offer-cpu" in no_gpu
    assert offer_refusal(models=2, gpus=0, offer_cpu=True, backend_host="h") is None
    assert offer_refusal(models=2, gpus=1, offer_cpu=False, backend_host="h") is None


def test_free_slots_never_go_below_zero():
    assert slots_free(4, 1) == 3
    assert slots_free(1, 1) == 0
    assert slots_free(1, 3) == 0  # a job accepted while the count raced


def test_a_beat_comes_a_heartbeat_later_or_soon_after_a_slot_changed():
    assert next_beat_at(CONFIG, 100.0) == 110.0
    # a change right after the beat: held back to the minimum spacing
    assert next_beat_at(CONFIG, 100.0, early_asked_s=100.01) == 100.25
    # a change later on: a short delay after it, off the job's first token
    assert next_beat_at(CONFIG, 100.0, early_asked_s=104.0) == 104.05
    # never later than the heartbeat itself
    assert next_beat_at(CONFIG, 100.0, early_asked_s=109.99) == 110.0


def test_the_book_accepts_offers_living_four_of_our_ttls_and_at_least_two_minutes():
    assert book_max_ttl_ms(30.0) == 120_000
    assert book_max_ttl_ms(60.0) == 240_000
    assert book_max_ttl_ms(1.5) == 120_000
