"""The node agent's NVML backend on a real GPU: limits, clocks and the energy counter, measured.

What it does, on GPU 0 only (other GPUs are not touched), with `wattsched_agent.nvml_backend`
exactly as the agent drives it:
1. identifies every GPU (`NvmlBackend.open`): name, UUID, limit constraints, default limit;
2. idle: reads the draw and the energy counter for a few seconds;
3. loads the GPU with an FP32 FMA kernel (PTX loaded through the CUDA driver API with ctypes: no
   CUDA toolkit, no framework) and, at each power limit from the maximum down to the minimum, sets
   the limit (`apply_limit`: clamp, set, read back), then measures the draw, the SM clock, the
   kernel's work rate and the energy counter against the integral of the sampled draw;
4. locks the SM clocks to about 60% of the highest supported clock (`apply_clocks`), measures the
   same, times how long the SM clock takes to fall to a new lock (three times), and unlocks them
   (`reset_clocks`);
5. as an unprivileged user (uid 65534), tries to set a limit and lock clocks: expects the
   `NoPermission` fault, never an exception;
6. puts back the limit GPU 0 had at the start and unlocks its clocks, whatever happened.

The FMA kernel is compute-bound, unlike LLM decode (memory-bound): its work rate against the
limit is a measured point for compute-bound work, not for tokens/s.

Run on the device machine (pynvml copied into `.device/`, the repository's `agent/` on the path):
`PYTHONPATH=.device:agent python3 benchmarks/nvml_check.py --out "$OUT"`. Prints a table and
writes `nvml_check.json`. The figures are recorded in docs/telemetry.md ("On a real GPU").
"""

from __future__ import annotations

import argparse
import ctypes
import enum
import itertools
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

if not hasattr(enum, "StrEnum"):  # Python < 3.11 on the device machine: the backend needs StrEnum
    setattr(enum, "StrEnum", type("StrEnum", (str, enum.Enum), {}))  # noqa: B010

import pynvml

from wattsched_agent.nvml_backend import NvmlBackend

GPU = 0
SAMPLE_SECONDS = 0.1
UNPRIVILEGED_UID = 65534
CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT = 16

# Eight dependent-pair FP32 FMAs per iteration over four independent chains.
PTX = b"""
.version 7.0
.target sm_70
.address_size 64

.visible .entry burn(
    .param .u64 out,
    .param .u32 iters
)
{
    .reg .pred %p;
    .reg .b32 %r<4>;
    .reg .f32 %f<10>;
    .reg .b64 %rd<3>;

    ld.param.u64 %rd1, [out];
    ld.param.u32 %r1, [iters];
    mov.u32 %r3, %tid.x;
    cvt.rn.f32.u32 %f1, %r3;
    mov.f32 %f2, 0f3F800001;
    mov.f32 %f3, %f1;
    mov.f32 %f4, %f1;
    mov.f32 %f5, %f1;
    mov.f32 %f6, %f1;
    mov.f32 %f7, 0f3F7FFFFE;
    mov.u32 %r2, 0;
LOOP:
    fma.rn.f32 %f3, %f3, %f2, %f7;
    fma.rn.f32 %f4, %f4, %f2, %f7;
    fma.rn.f32 %f5, %f5, %f2, %f7;
    fma.rn.f32 %f6, %f6, %f2, %f7;
    fma.rn.f32 %f3, %f3, %f7, %f2;
    fma.rn.f32 %f4, %f4, %f7, %f2;
    fma.rn.f32 %f5, %f5, %f7, %f2;
    fma.rn.f32 %f6, %f6, %f7, %f2;
    add.u32 %r2, %r2, 1;
    setp.lt.u32 %p, %r2, %r1;
    @%p bra LOOP;
    add.f32 %f8, %f3, %f4;
    add.f32 %f9, %f5, %f6;
    add.f32 %f8, %f8, %f9;
    cvta.to.global.u64 %rd2, %rd1;
    st.global.f32 [%rd2], %f8;
    ret;
}
\0"""


class Burner(threading.Thread):
    """Keeps GPU `GPU` busy with the FMA kernel until stopped; counts the FMAs done."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.ready = threading.Event()
        self.error: str | None = None
        self.fmas = 0.0
        self._lock = threading.Lock()

    def work_done(self) -> float:
        with self._lock:
            return self.fmas

    def run(self) -> None:
        try:
            self._run()
        except Exception as error:  # reported in the results, the check goes on idle
            self.error = f"{type(error).__name__}: {error}"
            self.ready.set()

    def _run(self) -> None:
        cuda = ctypes.CDLL("libcuda.so.1")

        def check(result: int, call: str) -> None:
            if result != 0:
                raise RuntimeError(f"{call} returned CUresult {result}")

        check(cuda.cuInit(0), "cuInit")
        device = ctypes.c_int()
        check(cuda.cuDeviceGet(ctypes.byref(device), GPU), "cuDeviceGet")
        sms = ctypes.c_int()
        check(
            cuda.cuDeviceGetAttribute(
                ctypes.byref(sms), CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, device
            ),
            "cuDeviceGetAttribute",
        )
        context = ctypes.c_void_p()
        check(cuda.cuCtxCreate_v2(ctypes.byref(context), 0, device), "cuCtxCreate_v2")
        module = ctypes.c_void_p()
        check(cuda.cuModuleLoadData(ctypes.byref(module), PTX), "cuModuleLoadData")
        function = ctypes.c_void_p()
        check(cuda.cuModuleGetFunction(ctypes.byref(function), module, b"burn"), "GetFunction")
        out = ctypes.c_uint64()
        check(cuda.cuMemAlloc_v2(ctypes.byref(out), 4), "cuMemAlloc_v2")
        cuda.cuLaunchKernel.argtypes = [
            ctypes.c_void_p,
            *([ctypes.c_uint] * 7),
            ctypes.c_void_p,
            ctypes.POINTER(ctypes.c_void_p),
            ctypes.c_void_p,
        ]
        grid, block = sms.value * 8, 256
        iterations = ctypes.c_uint32(20_000)
        arguments = (ctypes.c_void_p * 2)(
            ctypes.cast(ctypes.byref(out), ctypes.c_void_p),
            ctypes.cast(ctypes.byref(iterations), ctypes.c_void_p),
        )

        def launch() -> float:
            started = time.monotonic()
            check(
                cuda.cuLaunchKernel(function, grid, 1, 1, block, 1, 1, 0, None, arguments, None),
                "cuLaunchKernel",
            )
            check(cuda.cuCtxSynchronize(), "cuCtxSynchronize")
            return time.monotonic() - started

        # About 0.2 s a launch at full clocks, so a lower limit shows within a sample window.
        seconds = launch()
        iterations.value = max(1_000, min(2_000_000_000, int(iterations.value * 0.2 / seconds)))
        self.ready.set()
        while not self.stop.is_set():
            launch()
            with self._lock:
                self.fmas += 8.0 * grid * block * iterations.value
        cuda.cuCtxDestroy_v2(context)


def measure(backend: NvmlBackend, seconds: float, burner: Burner | None) -> dict[str, Any]:
    """Sample GPU `GPU` every `SAMPLE_SECONDS` for `seconds`: draw, SM clock, limit read back,
    the energy counter's increase against the trapezoid integral of the draw, and work rate."""
    samples = []
    work_before = burner.work_done() if burner else 0.0
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        sample = backend.sample(GPU)
        samples.append((time.monotonic(), sample))
        time.sleep(SAMPLE_SECONDS)
    work = (burner.work_done() - work_before) if burner else 0.0
    elapsed = samples[-1][0] - samples[0][0]
    draws = [s.draw_watts for _, s in samples if s.draw_watts is not None]
    clocks = [s.sm_clock_mhz for _, s in samples if s.sm_clock_mhz is not None]
    integral_joules = sum(
        (t1 - t0) * (a.draw_watts + b.draw_watts) / 2
        for (t0, a), (t1, b) in itertools.pairwise(samples)
        if a.draw_watts is not None and b.draw_watts is not None
    )
    first, last = samples[0][1].energy_millijoules, samples[-1][1].energy_millijoules
    counter_joules = None if first is None or last is None else (last - first) / 1000
    faults = sorted({s.fault.message for _, s in samples if s.fault is not None})
    return {
        "seconds": round(elapsed, 2),
        "limit_read_back_watts": samples[-1][1].applied_watts,
        "draw_mean_watts": round(sum(draws) / len(draws), 1) if draws else None,
        "draw_max_watts": max(draws) if draws else None,
        "sm_clock_mean_mhz": round(sum(clocks) / len(clocks)) if clocks else None,
        "utilisation_last": samples[-1][1].utilisation_percent,
        "energy_counter_joules": counter_joules,
        "draw_integral_joules": round(integral_joules, 1),
        "counter_vs_integral": (
            round(counter_joules / integral_joules, 4)
            if counter_joules and integral_joules
            else None
        ),
        "tflops_fp32": round(2 * work / elapsed / 1e12, 2) if burner else None,
        "faults": faults,
    }


def clock_settle_ms(backend: NvmlBackend, mhz: int, repeats: int = 3) -> list[float | None]:
    """Under load: how long after `nvmlDeviceSetGpuLockedClocks` the SM clock first reads at or
    below the lock (polled every ~2 ms, at most 2 s; None: never), each time from unlocked."""
    library, handle = backend.library, backend._handles[GPU]
    settled: list[float | None] = []
    for _ in range(repeats):
        library.nvmlDeviceResetGpuLockedClocks(handle)
        time.sleep(1.0)
        started = time.monotonic()
        library.nvmlDeviceSetGpuLockedClocks(handle, mhz, mhz)
        elapsed: float | None = None
        while time.monotonic() - started < 2.0:
            if library.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM) <= mhz:
                elapsed = round((time.monotonic() - started) * 1000, 1)
                break
            time.sleep(0.002)
        settled.append(elapsed)
    library.nvmlDeviceResetGpuLockedClocks(handle)
    return settled


def unprivileged_probe() -> dict[str, Any]:
    """Run as uid 65534: what the backend reports when it may not set limits or clocks."""
    backend = NvmlBackend(pynvml)
    faults = backend.open()
    identity = backend.identities[GPU]
    current = backend.sample(GPU).applied_watts or identity.max_watts or 0.0
    wanted = (identity.min_watts or 0.0) if current != identity.min_watts else identity.max_watts
    limit = backend.apply_limit(GPU, float(wanted or 0.0))
    clocks = backend.apply_clocks(GPU, 500, 500)
    backend.close()
    return {
        "uid": os.geteuid(),
        "open_faults": [f.message for f in faults],
        "apply_limit": {
            "requested": wanted,
            "applied": limit.applied_watts,
            "fault": _fault(limit),
        },
        "apply_clocks": {"target_mhz": clocks.target_mhz, "fault": _fault(clocks)},
    }


def _fault(outcome: Any) -> dict[str, str] | None:
    fault = outcome.fault
    return None if fault is None else {"reason": str(fault.reason), "message": fault.message}


def nvidia_smi(fields: str) -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    command = ["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader", f"--id={GPU}"]
    return subprocess.run(command, capture_output=True, text=True, check=False).stdout.strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--seconds", type=float, default=5.0, help="per measured setting")
    parser.add_argument("--probe-unprivileged", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe_unprivileged:
        print(json.dumps(unprivileged_probe()))
        return 0

    smi_fields = (
        "name,driver_version,power.limit,power.default_limit,clocks.max.sm,persistence_mode"
    )
    results: dict[str, Any] = {
        "python": platform.python_version(),
        "euid": os.geteuid(),
        "nvidia_smi_before": nvidia_smi(smi_fields),
    }
    backend = NvmlBackend(pynvml)
    results["open_faults"] = [f.message for f in backend.open()]
    if GPU not in backend.identities:
        print(json.dumps(results, indent=2))
        print("no GPU to check: NVML found none (see open_faults)", file=sys.stderr)
        return 1
    results["driver"] = pynvml.nvmlSystemGetDriverVersion()
    results["nvml"] = pynvml.nvmlSystemGetNVMLVersion()
    results["gpus"] = [
        {
            "index": i.index,
            "name": i.nvml_name,
            "uuid": i.uuid,
            "product": i.product,
            "min_watts": i.min_watts,
            "max_watts": i.max_watts,
            "default_watts": i.default_watts,
        }
        for i in backend.identities.values()
    ]
    identity = backend.identities[GPU]
    start_limit = backend.sample(GPU).applied_watts
    results["start_limit_watts"] = start_limit
    assert identity.min_watts is not None
    assert identity.max_watts is not None
    locked = False
    burner = Burner()
    try:
        results["idle"] = measure(backend, args.seconds, None)
        burner.start()
        burner.ready.wait(60)
        results["load_error"] = burner.error
        loaded = burner if burner.error is None else None
        levels = []
        low, high = identity.min_watts, identity.max_watts
        for fraction in (1.0, 0.75, 0.5, 0.0):
            requested = round(low + fraction * (high - low))
            outcome = backend.apply_limit(GPU, requested)
            time.sleep(2.0)  # nvmlDeviceGetPowerUsage averages over about a second
            level = measure(backend, args.seconds, loaded)
            level.update(
                requested_watts=requested,
                applied_watts=outcome.applied_watts,
                fault=_fault(outcome),
            )
            levels.append(level)
            print(json.dumps(level), flush=True)
        results["limits"] = levels
        backend.apply_limit(GPU, high)
        supported = backend.supported_sm_clocks_mhz(GPU)
        wanted = round(0.6 * max(supported))
        clock_outcome = backend.apply_clocks(GPU, wanted, wanted)
        locked = clock_outcome.target_mhz is not None
        time.sleep(2.0)
        clock_level = measure(backend, args.seconds, loaded)
        clock_level.update(
            requested_mhz=wanted,
            target_mhz=clock_outcome.target_mhz,
            read_back_mhz=clock_outcome.sm_clock_mhz,
            fault=_fault(clock_outcome),
            supported_sm_clocks=f"{len(supported)} from {min(supported)} to {max(supported)} MHz",
        )
        results["locked_clocks"] = clock_level
        if clock_outcome.target_mhz is not None:
            results["clock_settle_ms"] = clock_settle_ms(backend, clock_outcome.target_mhz[1])
        reset = backend.reset_clocks(GPU)
        locked = reset.fault is not None
        time.sleep(2.0)
        results["unlocked_again"] = measure(backend, args.seconds, loaded)
        results["unlocked_again"]["fault"] = _fault(reset)
    finally:
        burner.stop.set()
        if burner.is_alive():
            burner.join(30)
        if start_limit is not None:
            results["restored_limit"] = backend.apply_limit(GPU, start_limit).applied_watts
        if locked:
            backend.reset_clocks(GPU)
    if os.geteuid() == 0:

        def drop() -> None:
            os.setgroups([])
            os.setgid(UNPRIVILEGED_UID)
            os.setuid(UNPRIVILEGED_UID)

        probe = subprocess.run(
            [sys.executable, __file__, "--probe-unprivileged"],
            capture_output=True,
            text=True,
            preexec_fn=drop,
            check=False,
        )
        results["unprivileged"] = (
            json.loads(probe.stdout) if probe.returncode == 0 else {"stderr": probe.stderr[-2000:]}
        )
        # Whatever the probe did, GPU 0 ends as it started.
        if start_limit is not None:
            results["restored_limit"] = backend.apply_limit(GPU, start_limit).applied_watts
    results["nvidia_smi_after"] = nvidia_smi(smi_fields)
    backend.close()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "nvml_check.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
