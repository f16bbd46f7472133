"""The GPU probe: reads NVML and returns a ``HardwareReport``.

This is the edge between the NVIDIA driver and the pure values in
``p2pgpu.core.hardware``. All pynvml knowledge lives here, and every pynvml
exception is translated here, once:

- NVML that cannot start (no driver installed, driver not loaded, no
  permission, library/driver mismatch) is a normal state of a machine, not a
  failure of the node: ``probe()`` returns a report with no GPUs,
  ``nvml_available=False`` and a sentence saying why. The node can still offer
  CPU inference if its operator says so (DESIGN.md section 6).
- A query that fails for one GPU (``NotSupported`` for utilisation on MIG or
  vGPU, say) turns that one field into None; the GPU is still listed. Only a
  GPU that cannot be opened at all is left out, and ``report.error`` says so.
- Strings are decoded whatever pynvml returns (older versions give bytes),
  clipped and cleaned so they always satisfy the core's wire limits.

``probe()`` blocks in C calls for a few milliseconds; call it from trio with
``trio.to_thread.run_sync(probe)``. ``nvmlInit``/``nvmlShutdown`` are reference
counted by NVML, so concurrent probes are safe.

``format_report`` and ``report_to_json`` render a report for ``p2pgpu gpus``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import pynvml

from p2pgpu.core.hardware import (
    MAX_COMPUTE_CAPABILITY_PART,
    MAX_ERROR_CHARS,
    MAX_GPUS,
    MAX_MEMORY_BYTES,
    MAX_NAME_CHARS,
    MAX_UUID_CHARS,
    MAX_VERSION_CHARS,
    GpuInfo,
    HardwareReport,
)

__all__ = ["probe", "format_report", "report_to_json"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# What pynvml raises when a call fails. NVMLLibraryMismatchError is what its
# version-checked wrappers raise instead of FunctionNotFound.
_NVML_FAILURES: tuple[type[Exception], ...] = (
    pynvml.NVMLError,
    getattr(pynvml, "NVMLLibraryMismatchError", pynvml.NVMLError),
)

# Why NVML would not start, in words an operator can act on. Keyed by NVML
# return code (pynvml's exception classes compare by code, and are unhashable).
_INIT_FAILURE_REASONS: dict[int, str] = {
    pynvml.NVML_ERROR_LIBRARY_NOT_FOUND: "NVML library not found (no NVIDIA driver installed)",
    pynvml.NVML_ERROR_DRIVER_NOT_LOADED: "NVIDIA driver is not loaded",
    pynvml.NVML_ERROR_NO_PERMISSION: "no permission to talk to the NVIDIA driver",
    pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH: (
        "NVML library and NVIDIA kernel driver versions differ (reboot after a driver update)"
    ),
    pynvml.NVML_ERROR_FUNCTION_NOT_FOUND: "NVML library is too old for this nvidia-ml-py",
}

_GIB = 1024**3


def probe() -> HardwareReport:
    """Read every GPU through NVML. Never raises for a driver problem.

    The result always validates: without NVML it is an empty report whose
    ``error`` says why; with NVML, each GPU's unknown fields are None.
    """
    try:
        pynvml.nvmlInit()
    except (*_NVML_FAILURES, OSError) as exc:
        reason = _init_failure_reason(exc)
        log.info("no NVIDIA GPU available: %s", reason)
        return HardwareReport(gpus=(), nvml_available=False, error=reason)
    try:
        return _read_all()
    finally:
        try:
            pynvml.nvmlShutdown()
        except _NVML_FAILURES as exc:
            # Nothing to undo: the readings are already taken.
            log.debug("nvmlShutdown failed: %s", exc)


def _read_all() -> HardwareReport:
    problems: list[str] = []
    driver_version = _text(_query(pynvml.nvmlSystemGetDriverVersion), MAX_VERSION_CHARS)
    cuda_version = _cuda_version(_query(pynvml.nvmlSystemGetCudaDriverVersion))
    try:
        count = pynvml.nvmlDeviceGetCount()
    except _NVML_FAILURES as exc:
        return _report((), [f"could not count GPUs: {_describe(exc)}"])
    if count > MAX_GPUS:
        problems.append(f"{count} GPUs found, only the first {MAX_GPUS} are listed")
    gpus: list[GpuInfo] = []
    for index in range(min(count, MAX_GPUS)):
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        except _NVML_FAILURES as exc:
            log.warning("GPU %d cannot be opened: %s", index, _describe(exc))
            problems.append(f"GPU {index} cannot be opened: {_describe(exc)}")
            continue
        gpus.append(_read_gpu(index, handle, driver_version, cuda_version))
    return _report(tuple(gpus), problems)


def _read_gpu(index: int, handle: Any, driver_version: str | None, cuda_version: str | None) -> GpuInfo:
    name = _text(_query(pynvml.nvmlDeviceGetName, handle), MAX_NAME_CHARS)
    uuid = _text(_query(pynvml.nvmlDeviceGetUUID, handle), MAX_UUID_CHARS)

    total = free = None
    memory = _query(pynvml.nvmlDeviceGetMemoryInfo, handle)
    if memory is not None:
        total = _bounded_int(getattr(memory, "total", None), 0, MAX_MEMORY_BYTES)
        free = _bounded_int(getattr(memory, "free", None), 0, MAX_MEMORY_BYTES)
        if total is not None and free is not None and free > total:
            log.debug("GPU %d reports more free memory than total; dropping free", index)
            free = None

    utilization = None
    rates = _query(pynvml.nvmlDeviceGetUtilizationRates, handle)
    if rates is not None:
        utilization = _bounded_int(getattr(rates, "gpu", None), 0, 100)

    capability = None
    pair = _query(pynvml.nvmlDeviceGetCudaComputeCapability, handle)
    if isinstance(pair, tuple) and len(pair) == 2:
        major = _bounded_int(pair[0], 0, MAX_COMPUTE_CAPABILITY_PART)
        minor = _bounded_int(pair[1], 0, MAX_COMPUTE_CAPABILITY_PART)
        if major is not None and minor is not None:
            capability = (major, minor)

    return GpuInfo(
        index=index,
        name=name,
        uuid=uuid,
        memory_total_bytes=total,
        memory_free_bytes=free,
        utilization_percent=utilization,
        driver_version=driver_version,
        cuda_version=cuda_version,
        compute_capability=capability,
    )


def _query(function: Callable[..., T], *args: Any) -> T | None:
    """One NVML call; None (and a debug line) if NVML says no."""
    try:
        return function(*args)
    except _NVML_FAILURES as exc:
        log.debug("%s failed: %s", getattr(function, "__name__", function), _describe(exc))
        return None


def _report(gpus: tuple[GpuInfo, ...], problems: list[str]) -> HardwareReport:
    error = _text("; ".join(problems), MAX_ERROR_CHARS) if problems else None
    return HardwareReport(gpus=gpus, nvml_available=True, error=error)


def _init_failure_reason(exc: BaseException) -> str:
    code = getattr(exc, "value", None)
    reason = _INIT_FAILURE_REASONS.get(code) if type(code) is int else None
    if reason is None:
        reason = f"NVML failed to start: {_describe(exc)}"
    return _text(reason, MAX_ERROR_CHARS) or "NVML failed to start"


def _describe(exc: BaseException) -> str:
    # str() of an NVMLError with an unknown code calls back into NVML.
    try:
        text = str(exc)
    except Exception:  # pragma: no cover - defensive, NVML may be half-loaded
        text = ""
    return text or type(exc).__name__


def _text(value: Any, max_chars: int) -> str | None:
    """Decode a string from pynvml (str or bytes), fit for the wire, or None."""
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).split(b"\0", 1)[0].decode("utf-8", errors="replace")
    if not isinstance(value, str):
        return None
    cleaned = "".join(ch if ch.isprintable() else " " for ch in value).strip()
    return cleaned[:max_chars].rstrip() or None


def _bounded_int(value: Any, low: int, high: int) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value if low <= value <= high else None


def _cuda_version(value: Any) -> str | None:
    """NVML's CUDA driver version (``12040``) as people write it (``12.4``)."""
    number = _bounded_int(value, 1, 10**6)
    if number is None:
        return None
    return f"{number // 1000}.{number % 1000 // 10}"


def _gib(value: int | None) -> str:
    return "?" if value is None else f"{value / _GIB:.1f}"


def format_report(report: HardwareReport) -> str:
    """A table for people: one line per GPU, then any problem the probe met."""
    if not report.nvml_available:
        return f"No NVIDIA GPU: {report.error}"
    if not report.gpus:
        lines = ["No NVIDIA GPU found (NVML is running but lists no device)."]
    else:
        rows = [("GPU", "NAME", "VRAM USED/TOTAL (GiB)", "UTIL", "CC", "DRIVER", "CUDA")]
        for gpu in report.gpus:
            rows.append(
                (
                    str(gpu.index),
                    gpu.name or "?",
                    f"{_gib(gpu.memory_used_bytes)} / {_gib(gpu.memory_total_bytes)}",
                    "?" if gpu.utilization_percent is None else f"{gpu.utilization_percent}%",
                    "?" if gpu.compute_capability is None else "%d.%d" % gpu.compute_capability,
                    gpu.driver_version or "?",
                    gpu.cuda_version or "?",
                )
            )
        widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    if report.error:
        lines.append(f"Note: {report.error}")
    return "\n".join(lines)


def report_to_json(report: HardwareReport) -> dict[str, Any]:
    """A JSON-ready dict for ``--json``: field names spelled out, bytes as ints."""
    return {
        "nvml_available": report.nvml_available,
        "error": report.error,
        "gpus": [
            {
                "index": gpu.index,
                "name": gpu.name,
                "uuid": gpu.uuid,
                "memory_total_bytes": gpu.memory_total_bytes,
                "memory_free_bytes": gpu.memory_free_bytes,
                "memory_used_bytes": gpu.memory_used_bytes,
                "utilization_percent": gpu.utilization_percent,
                "driver_version": gpu.driver_version,
                "cuda_version": gpu.cuda_version,
                "compute_capability": (
                    None if gpu.compute_capability is None else "%d.%d" % gpu.compute_capability
                ),
            }
            for gpu in report.gpus
        ],
    }
