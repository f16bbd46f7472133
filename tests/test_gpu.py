"""The GPU probe: pure values and their wire form, then the NVML edge.

Most of this runs on machines without an NVIDIA driver (CI, laptops), so the
NVML edge is tested against ``FakeNvml``: it replaces the pynvml functions the
probe calls and fails the way pynvml does, by raising ``pynvml.NVMLError(code)``
(which pynvml turns into the matching ``NVMLError_*`` subclass). Two tests
touch the real library: one that expects no driver (skipped where there is
one) and one that expects a GPU (skipped where there is none).
"""

from __future__ import annotations

import ctypes
import json
from dataclasses import dataclass, field, replace
from typing import Any

import msgpack
import pynvml
import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pgpu import gpu as gpu_module
from p2pgpu.core.hardware import (
    MAX_GPUS,
    MAX_MEMORY_BYTES,
    MAX_NAME_CHARS,
    GpuInfo,
    HardwareReport,
)
from p2pgpu.errors import MalformedInput
from p2pgpu.gpu import format_report, probe, report_to_json

GIB = 1024**3


def nvml_error(code: int) -> pynvml.NVMLError:
    """An exception exactly as pynvml's ``_nvmlCheckReturn`` raises it."""
    return pynvml.NVMLError(code)


def driver_present() -> bool:
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return False
    return True


# --- strategies ---------------------------------------------------------------

printable_char = st.characters(codec="utf-8").filter(str.isprintable)


def text(max_size: int) -> st.SearchStrategy[str]:
    return st.text(printable_char, max_size=max_size)


@st.composite
def gpu_infos(draw: st.DrawFn, index: st.SearchStrategy[int] | None = None) -> GpuInfo:
    total = draw(st.none() | st.integers(0, MAX_MEMORY_BYTES))
    if total is None:
        free = draw(st.none() | st.integers(0, MAX_MEMORY_BYTES))
    else:
        free = draw(st.none() | st.integers(0, total))
    return GpuInfo(
        index=draw(index if index is not None else st.integers(0, MAX_GPUS - 1)),
        name=draw(st.none() | text(MAX_NAME_CHARS)),
        uuid=draw(st.none() | text(96)),
        memory_total_bytes=total,
        memory_free_bytes=free,
        utilization_percent=draw(st.none() | st.integers(0, 100)),
        driver_version=draw(st.none() | text(80)),
        cuda_version=draw(st.none() | text(80)),
        compute_capability=draw(st.none() | st.tuples(st.integers(0, 255), st.integers(0, 255))),
    )


@st.composite
def hardware_reports(draw: st.DrawFn) -> HardwareReport:
    if not draw(st.booleans()):
        return HardwareReport(gpus=(), nvml_available=False, error=draw(text(512)))
    indices = draw(st.lists(st.integers(0, MAX_GPUS - 1), unique=True, max_size=MAX_GPUS))
    gpus = tuple(draw(gpu_infos(index=st.just(i))) for i in indices)
    return HardwareReport(gpus=gpus, nvml_available=True, error=draw(st.none() | text(512)))


def h100(index: int = 0, **changes: Any) -> GpuInfo:
    values = dict(
        index=index,
        name="NVIDIA H100 80GB HBM3",
        uuid="GPU-3b2f5c1e-8f0d-4c1a-9e7b-0a1b2c3d4e5f",
        memory_total_bytes=80 * GIB,
        memory_free_bytes=60 * GIB,
        utilization_percent=25,
        driver_version="550.54.15",
        cuda_version="12.4",
        compute_capability=(9, 0),
    )
    values.update(changes)
    return GpuInfo(**values)


# --- wire form ----------------------------------------------------------------


@given(gpu_infos())
def test_gpu_info_round_trips_through_msgpack(gpu: GpuInfo) -> None:
    assert GpuInfo.from_wire(gpu.to_wire()) == gpu
    assert GpuInfo.from_wire(msgpack.unpackb(msgpack.packb(gpu.to_wire()))) == gpu


@given(hardware_reports())
def test_hardware_report_round_trips_through_msgpack(report: HardwareReport) -> None:
    assert HardwareReport.from_wire(report.to_wire()) == report
    decoded = msgpack.unpackb(msgpack.packb(report.to_wire()), use_list=False)
    assert HardwareReport.from_wire(decoded) == report


def test_wire_form_is_positional_scalars() -> None:
    assert h100().to_wire() == [
        0,
        "NVIDIA H100 80GB HBM3",
        "GPU-3b2f5c1e-8f0d-4c1a-9e7b-0a1b2c3d4e5f",
        80 * GIB,
        60 * GIB,
        25,
        "550.54.15",
        "12.4",
        9,
        0,
    ]


GOOD_GPU_WIRE = h100().to_wire()


def gpu_wire(position: int, value: Any) -> list[Any]:
    wire = list(GOOD_GPU_WIRE)
    wire[position] = value
    return wire


@pytest.mark.parametrize(
    "wire",
    [
        None,
        {"index": 0},
        b"\x00" * 10,
        "0123456789",
        GOOD_GPU_WIRE[:-1],
        [*GOOD_GPU_WIRE, None],
        gpu_wire(0, True),
        gpu_wire(0, -1),
        gpu_wire(0, MAX_GPUS),
        gpu_wire(0, None),
        gpu_wire(0, 0.0),
        gpu_wire(1, "x" * (MAX_NAME_CHARS + 1)),
        gpu_wire(1, b"NVIDIA H100"),
        gpu_wire(1, "H100\x1b[2J"),
        gpu_wire(1, "H100\n"),
        gpu_wire(2, "G" * 97),
        gpu_wire(3, -1),
        gpu_wire(3, MAX_MEMORY_BYTES + 1),
        gpu_wire(3, 80.0 * GIB),
        gpu_wire(4, 81 * GIB),  # free > total
        gpu_wire(5, 101),
        gpu_wire(5, -1),
        gpu_wire(5, "25"),
        gpu_wire(5, False),
        gpu_wire(6, 550),
        gpu_wire(7, "1" * 81),
        gpu_wire(8, None),  # major without minor
        gpu_wire(9, None),
        gpu_wire(8, 256),
        gpu_wire(9, "0"),
    ],
)
def test_malformed_gpu_wire_is_rejected(wire: Any) -> None:
    with pytest.raises(MalformedInput):
        GpuInfo.from_wire(wire)


@pytest.mark.parametrize(
    "wire",
    [
        None,
        [],
        [True, None],
        [True, None, [GOOD_GPU_WIRE], 0],
        [1, None, []],  # an int is not a bool
        [True, None, {0: GOOD_GPU_WIRE}],
        [True, None, [GOOD_GPU_WIRE] * 2],  # same index twice
        [True, None, [h100(i).to_wire() for i in range(MAX_GPUS)] + [GOOD_GPU_WIRE]],
        [True, None, [GOOD_GPU_WIRE[:5]]],
        [True, "x" * 513, []],
        [True, 7, []],
        [False, "no driver", [GOOD_GPU_WIRE]],  # no NVML yet GPUs
        [False, None, []],  # no NVML and no reason
    ],
)
def test_malformed_report_wire_is_rejected(wire: Any) -> None:
    with pytest.raises(MalformedInput):
        HardwareReport.from_wire(wire)


wire_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text() | st.binary(),
    lambda children: st.lists(children, max_size=12) | st.dictionaries(st.text(), children),
    max_leaves=40,
)


@given(st.integers(0, len(GOOD_GPU_WIRE) - 1), wire_values)
def test_a_changed_gpu_field_decodes_or_is_malformed(position: int, value: Any) -> None:
    try:
        GpuInfo.from_wire(gpu_wire(position, value))
    except MalformedInput:
        pass


@given(wire_values)
def test_any_input_decodes_or_is_malformed(value: Any) -> None:
    for decode in (GpuInfo.from_wire, HardwareReport.from_wire):
        try:
            decode(value)
        except MalformedInput:
            pass


def test_invalid_values_cannot_be_constructed() -> None:
    with pytest.raises(MalformedInput):
        h100(utilization_percent=150)
    with pytest.raises(MalformedInput):
        HardwareReport(gpus=(h100(),) * 2, nvml_available=True)
    with pytest.raises(MalformedInput):
        HardwareReport(gpus=[h100()], nvml_available=True)  # type: ignore[arg-type]


def test_memory_used_is_total_minus_free() -> None:
    assert h100().memory_used_bytes == 20 * GIB
    assert h100(memory_free_bytes=None).memory_used_bytes is None


# --- the probe without a driver ----------------------------------------------


@pytest.mark.skipif(driver_present(), reason="this machine has an NVIDIA driver")
def test_probe_without_driver_reports_why() -> None:
    report = probe()
    assert report == HardwareReport(
        gpus=(),
        nvml_available=False,
        error="NVML library not found (no NVIDIA driver installed)",
    )
    assert HardwareReport.from_wire(report.to_wire()) == report


# --- the probe against a fake NVML -------------------------------------------


@dataclass(frozen=True)
class Fails:
    """In place of a value: the NVML call returns this error code instead."""

    code: int


@dataclass
class FakeDevice:
    """What one fake GPU answers to each query."""

    name: Any = b"NVIDIA H100 80GB HBM3"  # old pynvml returned bytes
    uuid: Any = "GPU-3b2f5c1e-8f0d-4c1a-9e7b-0a1b2c3d4e5f"
    memory: tuple[int, int] | Fails = (80 * GIB, 60 * GIB)
    utilization: int | Fails = 25
    capability: tuple[int, int] | Fails = (9, 0)
    handle: Fails | None = None


@dataclass
class FakeNvml:
    """Stands in for libnvidia-ml behind pynvml's functions, errors included."""

    devices: list[FakeDevice] = field(default_factory=lambda: [FakeDevice()])
    init: Fails | None = None
    count: Fails | None = None
    shutdown: Fails | None = None
    driver_version: Any = "550.54.15"
    cuda_version: int | Fails = 12040
    initialised: int = 0
    shutdowns: int = 0

    def install(self, monkeypatch: pytest.MonkeyPatch) -> FakeNvml:
        for name in (
            "nvmlInit",
            "nvmlShutdown",
            "nvmlSystemGetDriverVersion",
            "nvmlSystemGetCudaDriverVersion",
            "nvmlDeviceGetCount",
            "nvmlDeviceGetHandleByIndex",
            "nvmlDeviceGetName",
            "nvmlDeviceGetUUID",
            "nvmlDeviceGetMemoryInfo",
            "nvmlDeviceGetUtilizationRates",
            "nvmlDeviceGetCudaComputeCapability",
        ):
            assert hasattr(pynvml, name), name  # the probe must call real functions
            monkeypatch.setattr(pynvml, name, getattr(self, name))
        return self

    def _answer(self, value: Any) -> Any:
        if self.initialised <= 0:
            raise nvml_error(pynvml.NVML_ERROR_UNINITIALIZED)
        if isinstance(value, Fails):
            raise nvml_error(value.code)
        return value

    def nvmlInit(self) -> None:
        if self.init is not None:
            raise nvml_error(self.init.code)
        self.initialised += 1

    def nvmlShutdown(self) -> None:
        self._answer(None)
        self.shutdowns += 1
        self.initialised -= 1
        self._answer(self.shutdown)

    def nvmlSystemGetDriverVersion(self) -> Any:
        return self._answer(self.driver_version)

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return self._answer(self.cuda_version)

    def nvmlDeviceGetCount(self) -> int:
        self._answer(self.count)
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        self._answer(self.devices[index].handle)
        return index

    def nvmlDeviceGetName(self, handle: int) -> Any:
        return self._answer(self.devices[handle].name)

    def nvmlDeviceGetUUID(self, handle: int) -> Any:
        return self._answer(self.devices[handle].uuid)

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> pynvml.c_nvmlMemory_t:
        total, free = self._answer(self.devices[handle].memory)
        return pynvml.c_nvmlMemory_t(total=total, free=free, used=max(total - free, 0))

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> pynvml.c_nvmlUtilization_t:
        return pynvml.c_nvmlUtilization_t(gpu=self._answer(self.devices[handle].utilization), memory=0)

    def nvmlDeviceGetCudaComputeCapability(self, handle: int) -> Any:
        return self._answer(self.devices[handle].capability)


def test_fake_errors_are_pynvml_subclasses() -> None:
    assert type(nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)) is pynvml.NVMLError_NotSupported
    assert type(nvml_error(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)) is pynvml.NVMLError_LibraryNotFound


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, "NVML library not found (no NVIDIA driver installed)"),
        (pynvml.NVML_ERROR_DRIVER_NOT_LOADED, "NVIDIA driver is not loaded"),
        (pynvml.NVML_ERROR_NO_PERMISSION, "no permission to talk to the NVIDIA driver"),
        (pynvml.NVML_ERROR_UNKNOWN, "NVML failed to start: Unknown Error"),
    ],
)
def test_init_failure_is_a_report_not_an_exception(
    monkeypatch: pytest.MonkeyPatch, code: int, reason: str
) -> None:
    nvml = FakeNvml(init=Fails(code)).install(monkeypatch)
    report = probe()
    assert report == HardwareReport(gpus=(), nvml_available=False, error=reason)
    assert nvml.shutdowns == 0  # nothing to shut down


def test_init_failure_with_an_unknown_code_still_reports(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeNvml(init=Fails(999)).install(monkeypatch)
    report = probe()
    assert not report.nvml_available
    assert report.error is not None and report.error.startswith("NVML failed to start")


def test_probe_reads_every_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = FakeNvml(
        devices=[
            FakeDevice(),
            FakeDevice(
                name="NVIDIA L4",
                uuid=b"GPU-0000",
                memory=(24 * GIB, 24 * GIB),
                utilization=0,
                capability=(8, 9),
            ),
        ]
    ).install(monkeypatch)
    report = probe()
    assert report == HardwareReport(
        gpus=(
            h100(0),
            GpuInfo(
                index=1,
                name="NVIDIA L4",
                uuid="GPU-0000",
                memory_total_bytes=24 * GIB,
                memory_free_bytes=24 * GIB,
                utilization_percent=0,
                driver_version="550.54.15",
                cuda_version="12.4",
                compute_capability=(8, 9),
            ),
        ),
        nvml_available=True,
        error=None,
    )
    assert nvml.shutdowns == 1 and nvml.initialised == 0


@pytest.mark.parametrize(
    ("device", "changes"),
    [
        (FakeDevice(utilization=Fails(pynvml.NVML_ERROR_NOT_SUPPORTED)), {"utilization_percent": None}),
        (
            FakeDevice(memory=Fails(pynvml.NVML_ERROR_NOT_SUPPORTED)),
            {"memory_total_bytes": None, "memory_free_bytes": None},
        ),
        (FakeDevice(capability=Fails(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)), {"compute_capability": None}),
        (FakeDevice(name=Fails(pynvml.NVML_ERROR_UNKNOWN)), {"name": None}),
        (FakeDevice(uuid=Fails(pynvml.NVML_ERROR_NO_PERMISSION)), {"uuid": None}),
        (FakeDevice(utilization=250), {"utilization_percent": None}),  # nonsense from NVML
        (FakeDevice(memory=(80 * GIB, 81 * GIB)), {"memory_free_bytes": None}),  # free > total
        (FakeDevice(name=b"H100\x00garbage"), {"name": "H100"}),
        (FakeDevice(name="H100\x1b[31m red"), {"name": "H100 [31m red"}),
        (FakeDevice(name=b"\xffH100"), {"name": "\ufffdH100"}),
        (FakeDevice(name="x" * 300), {"name": "x" * MAX_NAME_CHARS}),
        (FakeDevice(name=""), {"name": None}),
    ],
)
def test_a_failing_query_degrades_one_field(
    monkeypatch: pytest.MonkeyPatch, device: FakeDevice, changes: dict[str, Any]
) -> None:
    FakeNvml(devices=[device]).install(monkeypatch)
    report = probe()
    assert report.nvml_available and report.error is None
    assert report.gpus == (replace(h100(0), **changes),)


def test_system_queries_degrade_on_every_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeNvml(
        devices=[FakeDevice(), FakeDevice()],
        driver_version=Fails(pynvml.NVML_ERROR_UNKNOWN),
        cuda_version=Fails(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND),
    ).install(monkeypatch)
    report = probe()
    assert [gpu.driver_version for gpu in report.gpus] == [None, None]
    assert [gpu.cuda_version for gpu in report.gpus] == [None, None]


@pytest.mark.parametrize(("raw", "text"), [(12040, "12.4"), (13000, "13.0"), (11080, "11.8")])
def test_cuda_version_is_written_as_people_do(
    monkeypatch: pytest.MonkeyPatch, raw: int, text: str
) -> None:
    FakeNvml(cuda_version=raw).install(monkeypatch)
    assert probe().gpus[0].cuda_version == text


def test_a_gpu_that_cannot_be_opened_is_left_out_and_said(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeNvml(
        devices=[FakeDevice(), FakeDevice(handle=Fails(pynvml.NVML_ERROR_GPU_IS_LOST)), FakeDevice()]
    ).install(monkeypatch)
    report = probe()
    assert [gpu.index for gpu in report.gpus] == [0, 2]
    assert report.error == "GPU 1 cannot be opened: GPU is lost"


def test_count_failure_gives_an_empty_report(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = FakeNvml(count=Fails(pynvml.NVML_ERROR_UNKNOWN)).install(monkeypatch)
    report = probe()
    assert report == HardwareReport(
        gpus=(), nvml_available=True, error="could not count GPUs: Unknown Error"
    )
    assert nvml.shutdowns == 1


def test_more_gpus_than_an_offer_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeNvml(devices=[FakeDevice() for _ in range(MAX_GPUS + 2)]).install(monkeypatch)
    report = probe()
    assert len(report.gpus) == MAX_GPUS
    assert report.error == f"{MAX_GPUS + 2} GPUs found, only the first {MAX_GPUS} are listed"


def test_shutdown_failure_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeNvml(shutdown=Fails(pynvml.NVML_ERROR_UNKNOWN)).install(monkeypatch)
    assert probe().gpus == (h100(0),)


def test_shutdown_runs_even_when_reading_breaks(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = FakeNvml().install(monkeypatch)

    def broken(handle: int) -> Any:
        raise RuntimeError("a bug, not an NVML answer")

    monkeypatch.setattr(pynvml, "nvmlDeviceGetName", broken)
    with pytest.raises(RuntimeError):
        probe()
    assert nvml.shutdowns == 1


def test_probe_logs_no_driver_at_info(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    FakeNvml(init=Fails(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)).install(monkeypatch)
    with caplog.at_level("INFO", logger=gpu_module.__name__):
        probe()
    assert "NVIDIA driver is not loaded" in caplog.text


# --- rendering ----------------------------------------------------------------


def test_format_report_is_a_table() -> None:
    report = HardwareReport(
        gpus=(h100(0), h100(1, utilization_percent=None, compute_capability=None)),
        nvml_available=True,
    )
    lines = format_report(report).splitlines()
    assert lines[0].split() == ["GPU", "NAME", "VRAM", "USED/TOTAL", "(GiB)", "UTIL", "CC", "DRIVER", "CUDA"]
    assert lines[1].split() == [
        "0", "NVIDIA", "H100", "80GB", "HBM3", "20.0", "/", "80.0", "25%", "9.0", "550.54.15", "12.4",
    ]  # fmt: skip
    assert lines[2].split()[-5:] == ["80.0", "?", "?", "550.54.15", "12.4"]
    assert len(lines) == 3


def test_format_report_without_nvml_says_why() -> None:
    report = HardwareReport(gpus=(), nvml_available=False, error="NVIDIA driver is not loaded")
    assert format_report(report) == "No NVIDIA GPU: NVIDIA driver is not loaded"


def test_format_report_shows_partial_problems() -> None:
    report = HardwareReport(gpus=(h100(),), nvml_available=True, error="GPU 1 cannot be opened: GPU is lost")
    assert format_report(report).splitlines()[-1] == "Note: GPU 1 cannot be opened: GPU is lost"


@given(hardware_reports())
def test_any_report_renders(report: HardwareReport) -> None:
    assert isinstance(format_report(report), str)
    assert json.loads(json.dumps(report_to_json(report)))["nvml_available"] == report.nvml_available


def test_report_to_json() -> None:
    report = HardwareReport(gpus=(h100(),), nvml_available=True)
    assert report_to_json(report) == {
        "nvml_available": True,
        "error": None,
        "gpus": [
            {
                "index": 0,
                "name": "NVIDIA H100 80GB HBM3",
                "uuid": "GPU-3b2f5c1e-8f0d-4c1a-9e7b-0a1b2c3d4e5f",
                "memory_total_bytes": 80 * GIB,
                "memory_free_bytes": 60 * GIB,
                "memory_used_bytes": 20 * GIB,
                "utilization_percent": 25,
                "driver_version": "550.54.15",
                "cuda_version": "12.4",
                "compute_capability": "9.0",
            }
        ],
    }


# --- the real thing, where there is one --------------------------------------


@pytest.mark.skipif(not driver_present(), reason="no NVIDIA driver on this machine")
def test_probe_reads_a_real_gpu() -> None:
    report = probe()
    assert report.nvml_available, report.error
    assert report.gpus, "NVML is up but lists no GPU"
    for gpu in report.gpus:
        assert gpu.name and gpu.uuid and gpu.driver_version
        assert gpu.memory_total_bytes and gpu.memory_free_bytes is not None
    assert HardwareReport.from_wire(msgpack.unpackb(msgpack.packb(report.to_wire()))) == report
