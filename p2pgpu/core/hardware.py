"""What a node's GPUs are, as values: the pure half of the GPU probe.

``p2pgpu.gpu`` reads NVML (the edge); this module only holds the result. It is
kept apart because the same values travel inside signed offers: a provider
tells the market its GPU names, VRAM and load, and a buyer chooses by them. So
these values need a fixed positional wire form (``to_wire``/``from_wire``, plain
lists of ints, strings and nil, ready for msgpack) and strict validation, since
on the way in they come from a peer who may lie or be broken. Nothing here
imports pynvml: it is the edge's business, and the core must not need a driver.

Theory of operation:

- ``None`` means "NVML could not tell us" (a query failed or is not supported
  on that GPU, e.g. utilisation on some MIG or vGPU setups). A field is never
  guessed. Only ``index`` is always known.
- Instances validate themselves on construction, with the same checks that
  ``from_wire`` applies to a peer's input, so ``to_wire`` always produces
  something ``from_wire`` accepts. Bad values raise ``MalformedInput``.
- Strings must be printable (no control characters): GPU names from peers end
  up in terminal tables, where an escape sequence would be an attack.

Wire layouts (positional; a new field means a new offer version):

- ``GpuInfo``: ``[index, name, uuid, memory_total_bytes, memory_free_bytes,
  utilization_percent, driver_version, cuda_version, cc_major, cc_minor]``
  where everything after ``index`` may be nil, and ``cc_major``/``cc_minor``
  are both nil or both ints.
- ``HardwareReport``: ``[nvml_available, error, [gpu, ...]]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from p2pgpu.errors import MalformedInput

MAX_GPUS = 16
"""Most GPUs one report (and so one offer) may list."""

MAX_NAME_CHARS = 128
MAX_UUID_CHARS = 96  # NVML_DEVICE_UUID_V2_BUFFER_SIZE; MIG uuids are longer than GPU ones
MAX_VERSION_CHARS = 80  # NVML_SYSTEM_DRIVER_VERSION_BUFFER_SIZE
MAX_ERROR_CHARS = 512
# NVML reports uint64, but signed int64 is what every msgpack reader handles,
# and 8 EiB of VRAM is far off.
MAX_MEMORY_BYTES = 2**63 - 1
MAX_COMPUTE_CAPABILITY_PART = 255

GPU_WIRE_FIELDS = 10
REPORT_WIRE_FIELDS = 3


def _check_int(value: Any, what: str, low: int, high: int, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    # bool is an int subclass; True is not a GPU index.
    if type(value) is not int:
        raise MalformedInput(f"{what} must be an integer, got {type(value).__name__}")
    if not low <= value <= high:
        raise MalformedInput(f"{what} must be in [{low}, {high}], got {value}")


def _check_text(value: Any, what: str, max_chars: int, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if type(value) is not str:
        raise MalformedInput(f"{what} must be a string, got {type(value).__name__}")
    if len(value) > max_chars:
        raise MalformedInput(f"{what} is {len(value)} characters, the limit is {max_chars}")
    if not value.isprintable():
        raise MalformedInput(f"{what} contains control or unprintable characters")


def _check_sequence(value: Any, what: str, length: int | None = None) -> None:
    # msgpack decodes arrays as lists (or tuples with use_list=False).
    if type(value) not in (list, tuple):
        raise MalformedInput(f"{what} must be an array, got {type(value).__name__}")
    if length is not None and len(value) != length:
        raise MalformedInput(f"{what} must have {length} fields, got {len(value)}")


@dataclass(frozen=True, slots=True)
class GpuInfo:
    """One GPU as NVML saw it at probe time.

    ``memory_free_bytes`` and ``utilization_percent`` are a snapshot; offers
    republish them on every heartbeat. ``compute_capability`` is CUDA's
    ``(major, minor)``, e.g. ``(9, 0)`` for Hopper: it tells a buyer which
    kernels (FP8, FlashAttention versions) the card can run.
    """

    index: int
    name: str | None
    uuid: str | None
    memory_total_bytes: int | None
    memory_free_bytes: int | None
    utilization_percent: int | None
    driver_version: str | None
    cuda_version: str | None
    compute_capability: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        _check_int(self.index, "GPU index", 0, MAX_GPUS - 1)
        _check_text(self.name, "GPU name", MAX_NAME_CHARS, optional=True)
        _check_text(self.uuid, "GPU uuid", MAX_UUID_CHARS, optional=True)
        _check_int(self.memory_total_bytes, "total memory", 0, MAX_MEMORY_BYTES, optional=True)
        _check_int(self.memory_free_bytes, "free memory", 0, MAX_MEMORY_BYTES, optional=True)
        if (
            self.memory_total_bytes is not None
            and self.memory_free_bytes is not None
            and self.memory_free_bytes > self.memory_total_bytes
        ):
            raise MalformedInput("free memory exceeds total memory")
        _check_int(self.utilization_percent, "utilization", 0, 100, optional=True)
        _check_text(self.driver_version, "driver version", MAX_VERSION_CHARS, optional=True)
        _check_text(self.cuda_version, "CUDA version", MAX_VERSION_CHARS, optional=True)
        if self.compute_capability is not None:
            if type(self.compute_capability) is not tuple or len(self.compute_capability) != 2:
                raise MalformedInput("compute capability must be a (major, minor) pair")
            major, minor = self.compute_capability
            _check_int(major, "compute capability major", 0, MAX_COMPUTE_CAPABILITY_PART)
            _check_int(minor, "compute capability minor", 0, MAX_COMPUTE_CAPABILITY_PART)

    @property
    def memory_used_bytes(self) -> int | None:
        """Total minus free (what NVML counts as used, reserved memory included)."""
        if self.memory_total_bytes is None or self.memory_free_bytes is None:
            return None
        return self.memory_total_bytes - self.memory_free_bytes

    def to_wire(self) -> list[int | str | None]:
        """The positional form (see the module docstring for the layout)."""
        major, minor = self.compute_capability or (None, None)
        return [
            self.index,
            self.name,
            self.uuid,
            self.memory_total_bytes,
            self.memory_free_bytes,
            self.utilization_percent,
            self.driver_version,
            self.cuda_version,
            major,
            minor,
        ]

    @classmethod
    def from_wire(cls, value: Any) -> GpuInfo:
        """Inverse of ``to_wire``; raises ``MalformedInput`` on any wrong shape."""
        _check_sequence(value, "GPU entry", GPU_WIRE_FIELDS)
        (index, name, uuid, total, free, utilization, driver, cuda, major, minor) = value
        if (major is None) != (minor is None):
            raise MalformedInput("compute capability needs both major and minor, or neither")
        return cls(
            index=index,
            name=name,
            uuid=uuid,
            memory_total_bytes=total,
            memory_free_bytes=free,
            utilization_percent=utilization,
            driver_version=driver,
            cuda_version=cuda,
            compute_capability=None if major is None else (major, minor),
        )


@dataclass(frozen=True, slots=True)
class HardwareReport:
    """Everything one probe found.

    ``nvml_available`` is False when NVML could not start at all (no driver,
    driver not loaded, no permission); ``gpus`` is then empty and ``error``
    says why, in words for the operator. With NVML up, ``error`` is None unless
    something made the list incomplete (a GPU that could not be opened, more
    than ``MAX_GPUS`` GPUs), in which case it says what.
    """

    gpus: tuple[GpuInfo, ...]
    nvml_available: bool
    error: str | None = None

    def __post_init__(self) -> None:
        if type(self.gpus) is not tuple:
            raise MalformedInput("gpus must be a tuple")
        if len(self.gpus) > MAX_GPUS:
            raise MalformedInput(f"at most {MAX_GPUS} GPUs, got {len(self.gpus)}")
        if not all(type(gpu) is GpuInfo for gpu in self.gpus):
            raise MalformedInput("gpus must hold GpuInfo values")
        if len({gpu.index for gpu in self.gpus}) != len(self.gpus):
            raise MalformedInput("GPU indices must be distinct")
        if type(self.nvml_available) is not bool:
            raise MalformedInput("nvml_available must be a boolean")
        _check_text(self.error, "probe error", MAX_ERROR_CHARS, optional=True)
        if not self.nvml_available:
            if self.gpus:
                raise MalformedInput("a report without NVML cannot list GPUs")
            if self.error is None:
                raise MalformedInput("a report without NVML must say why")

    def to_wire(self) -> list[Any]:
        return [self.nvml_available, self.error, [gpu.to_wire() for gpu in self.gpus]]

    @classmethod
    def from_wire(cls, value: Any) -> HardwareReport:
        """Inverse of ``to_wire``; raises ``MalformedInput`` on any wrong shape."""
        _check_sequence(value, "hardware report", REPORT_WIRE_FIELDS)
        nvml_available, error, gpus = value
        _check_sequence(gpus, "GPU list")
        # Checked before decoding the entries, so a huge list costs nothing.
        if len(gpus) > MAX_GPUS:
            raise MalformedInput(f"at most {MAX_GPUS} GPUs, got {len(gpus)}")
        return cls(
            gpus=tuple(GpuInfo.from_wire(gpu) for gpu in gpus),
            nvml_available=nvml_available,
            error=error,
        )


class HardwareProbe(Protocol):
    """The seam where tests put a fake: anything that returns a report.

    ``p2pgpu.gpu.probe`` is the real one. It blocks (NVML is a C library), so
    async callers run it in a worker thread.
    """

    def __call__(self) -> HardwareReport: ...
