"""Shared helpers of the bench/bench_*.py scripts: CLI, device facts, rates measured in the
same run (bf16 matmul peak, copy bandwidth), CUDA-event timing, peak memory, JSON output.

Every bench calls `parse_args` then `require_cuda` (exit 0 with a message on a CPU-only box),
and writes one JSON per run (`result_path`, `write_result`) whose "rows" `summarize` tabulates
for bench/gpu_suite.sh. Import it from a bench script as `from common import ...` (the script's
directory is first on sys.path).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch


def parse_args(description: str, argv=None, extra: Callable[[argparse.ArgumentParser], None] | None = None):
    """--out DIR (JSON goes there; default bench/results) and --quick (tiny shapes, smoke test)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results",
                        help="directory for the JSON result (created if missing)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test, not a measurement")
    if extra is not None:
        extra(parser)
    return parser.parse_args(argv)


def require_cuda(bench_name: str) -> None:
    """Exit 0 with a message when there is no CUDA device: benches are GPU-only."""
    if not torch.cuda.is_available():
        print(f"{bench_name}: skipped, no CUDA device (torch {torch.__version__})")
        sys.exit(0)


def seconds_left() -> float:
    """Seconds until BENCH_DEADLINE (epoch seconds, set by gpu_suite.sh); inf when unset."""
    deadline = os.environ.get("BENCH_DEADLINE")
    return float(deadline) - time.time() if deadline else float("inf")


def device_info() -> dict:
    """What ran the bench: GPU, capability, memory, software versions."""
    info = dict(torch=torch.__version__, python=platform.python_version(), cuda=torch.version.cuda)
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / 2**30, 1), sm_count=props.multi_processor_count)
    return info


def time_cuda(fn: Callable[..., object], *, warmup: int = 2, iters: int = 5, phases: Sequence[str] = ()) -> dict:
    """Median / min milliseconds of fn() between CUDA events, each call timed on its own.

    host_ms: the median wall-clock time fn() took to return, before the wait for the GPU: the host's
    time to issue the work (plus any sync inside fn). Close to ms, the step is host-bound; well under
    it, the GPU is the limit. Unlike a profiler's host events it adds no overhead of its own.

    phases: names of the parts of the call, for a step that can be host-bound in one part only. fn is
    then called as fn(mark), and calls mark() before, between and after the parts; the result adds, per
    name, `<name>_ms` (GPU time between CUDA events recorded at the marks) and `<name>_host_ms` (the
    host's), medians like ms. Without CUDA it times wall-clock instead: only for --allow-cpu smoke
    runs, never a figure."""
    cuda = torch.cuda.is_available()
    args = ((lambda: None),) if phases else ()
    for _ in range(warmup):
        fn(*args)
    if cuda:
        torch.cuda.synchronize()
    times, host, parts = [], [], []
    for _ in range(iters):
        events, clock = [], []

        def mark():
            if cuda:
                events.append(torch.cuda.Event(enable_timing=True))
                events[-1].record()
            clock.append(time.perf_counter())

        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        issued = time.perf_counter()
        fn(*((mark,) if phases else ()))
        host.append(1e3 * (time.perf_counter() - issued))
        if cuda:
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            times.append(host[-1])
        if phases:
            if len(clock) != len(phases) + 1:
                raise ValueError(f"time_cuda: {len(phases)} phases need {len(phases) + 1} marks, fn made {len(clock)}")
            spans = range(len(phases))
            wall = [1e3 * (clock[i + 1] - clock[i]) for i in spans]
            parts.append(([events[i].elapsed_time(events[i + 1]) for i in spans] if cuda else wall, wall))
    out = dict(ms=statistics.median(times), ms_min=min(times), host_ms=statistics.median(host), iters=iters)
    for i, name in enumerate(phases):
        out[f"{name}_ms"] = statistics.median(device[i] for device, _ in parts)
        out[f"{name}_host_ms"] = statistics.median(wall[i] for _, wall in parts)
    return out


def kernel_profile(fn: Callable[[], object], *, baseline: Callable[[], object] | None = None,
                   units: int = 1, top: int = 8, timed_ms: float | None = None, host: bool = False) -> dict:
    """Where fn()'s device time goes, per unit of work: kernels launched, busy milliseconds (the sum
    of kernel durations) and the `top` kernels by time, from torch.profiler.

    fn() - baseline() is what is reported (e.g. a generate call with k more decode steps minus one
    without them), divided by `units`. Given `timed_ms`, the same work's CUDA-event time per unit,
    it adds idle_fraction: how much of that time the GPU sat between kernels (launch-bound).
    Without CUDA it profiles CPU ops instead ("cpu ops"; smoke runs only, no figure).

    host=True (CUDA) profiles the host side too, in a separate run of fn() (its overhead must not
    touch the kernel figures): "host" holds the `top` host events by self time (ops and CUDA runtime
    calls) and the synchronising calls (count and ms): what the host did while the GPU sat idle.
    """
    from torch.profiler import ProfilerActivity

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]
    device_type = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    work = profile_tally(fn, activities, device_type)
    base = profile_tally(baseline, activities, device_type) if baseline is not None else {}
    out = profile_difference(work, base, units=units, top=top, timed_ms=timed_ms)
    result = dict(unit="cuda kernels" if cuda else "cpu ops", **out)
    if host and cuda:
        result["host"] = host_profile(fn, top=top)
    return result


SYNCING_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
                 "cudaMemcpyAsync")     # the copies sync when they bring data to the host (e.g. .item())


def profile_tally(call: Callable[[], object], activities: list, device_type) -> dict[str, list[float]]:
    """{name: [count, ms]} of the profiled events of `device_type` in one call(): a kernel's duration
    on the device, an op's or runtime call's self time on the host."""
    from torch.profiler import profile

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        call()
        if cuda:
            torch.cuda.synchronize()
    on_host = device_type == torch.autograd.DeviceType.CPU
    by_name: dict[str, list[float]] = {}
    for event in prof.events():
        if event.device_type == device_type:
            stats = by_name.setdefault(event.name, [0, 0.0])
            stats[0] += 1
            stats[1] += (event.self_cpu_time_total if on_host else event.time_range.elapsed_us()) / 1e3
    return by_name


def host_profile(fn: Callable[[], object], top: int = 8) -> dict:
    """The host side of one fn() call: top host events by self time, and the synchronising calls."""
    from torch.profiler import ProfilerActivity

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    by_name = profile_tally(fn, activities, torch.autograd.DeviceType.CPU)
    ranked = sorted(by_name.items(), key=lambda item: -item[1][1])[:top]
    syncs = {name: stats for name, stats in by_name.items() if name in SYNCING_CALLS}
    return dict(self_ms=sum(ms for _, ms in by_name.values()),
                top=[dict(name=name[:120], count=count, ms=ms) for name, (count, ms) in ranked],
                syncing_calls={name: dict(count=count, ms=ms) for name, (count, ms) in syncs.items()})


def profile_difference(work: dict[str, list[float]], base: dict[str, list[float]], *, units: int = 1,
                       top: int = 8, timed_ms: float | None = None) -> dict:
    """kernel_profile's arithmetic on two {name: [count, ms]} tallies: work minus base, per unit; the
    names whose count grew, ranked by time."""
    diff = {name: (count - base.get(name, (0, 0.0))[0], ms - base.get(name, (0, 0.0))[1])
            for name, (count, ms) in work.items()}
    diff = {name: (count / units, ms / units) for name, (count, ms) in diff.items() if count > 0}
    busy = sum(ms for _, ms in diff.values())
    ranked = sorted(diff.items(), key=lambda item: -item[1][1])[:top]
    out = dict(count=round(sum(c for c, _ in diff.values()), 1),
               busy_ms=busy, top=[dict(name=name[:120], count=round(count, 2), ms=ms,
                                       share=ms / busy if busy else None) for name, (count, ms) in ranked])
    if timed_ms is not None:
        out.update(timed_ms=timed_ms, idle_fraction=max(0.0, 1 - busy / timed_ms))
    return out


def peak_extra_memory(fn: Callable[[], object]) -> int:
    """Bytes allocated by fn() above what was allocated before it, at its peak (including
    what fn returns while it is alive)."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del result
    return peak - before


def matmul_peak_tflops(dtype: torch.dtype = torch.bfloat16, size: int = 8192, iters: int = 10) -> float:
    """Achieved TFLOP/s of a large square matmul in `dtype`: the practical tensor-core peak
    of this GPU, measured in the same run as the bench it normalises.

    Without CUDA: a 512 fp32 matmul on the CPU, for --allow-cpu smoke runs only, never a figure."""
    cuda = torch.cuda.is_available()
    size, dtype = (size, dtype) if cuda else (512, torch.float32)
    a = torch.randn(size, size, device="cuda" if cuda else "cpu", dtype=dtype)
    b = torch.randn_like(a)
    timing = time_cuda(lambda: a @ b, warmup=3 if cuda else 1, iters=iters if cuda else 5)
    return 2 * size**3 / (timing["ms_min"] * 1e-3) / 1e12


def copy_bandwidth_gbs(nbytes: int = 2 * 2**30, iters: int = 10) -> float:
    """Achieved HBM bandwidth of a device-to-device copy, counting read + write bytes.

    Without CUDA: a 64 MiB copy in host memory, for --allow-cpu smoke runs only, never a figure."""
    cuda = torch.cuda.is_available()
    nbytes, iters = (nbytes, iters) if cuda else (64 << 20, 5)
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda" if cuda else "cpu")
    dst = torch.empty_like(src)
    timing = time_cuda(lambda: dst.copy_(src), warmup=3 if cuda else 1, iters=iters)
    return 2 * nbytes / (timing["ms_min"] * 1e-3) / 1e9


def linear_weights(module: torch.nn.Module) -> list[torch.Tensor]:
    """The weight of every nn.Linear in `module`: the matmuls of a forward through it."""
    return [m.weight for m in module.modules() if isinstance(m, torch.nn.Linear)]


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def result_path(out_dir: Path, bench: str) -> Path:
    """<out>/<bench>-<gpu>-<timestamp>.json (directory created)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    gpu = device_info().get("gpu", "cpu").replace(" ", "_").replace("/", "_")
    return out_dir / f"{bench}-{gpu}-{time.strftime('%Y%m%d-%H%M%S')}.json"


def write_result(path: Path, bench: str, payload: dict) -> Path:
    """(Re)write one run's JSON: device facts + payload. Benches call it after every shape, so
    a run cut short by a timeout still leaves what it measured. By convention payload["rows"]
    is a list of flat dicts, one per measurement; summarize() tabulates them."""
    record = dict(bench=bench, written=time.strftime("%Y-%m-%d %H:%M:%S"), device=device_info(), **payload)
    Path(path).write_text(json.dumps(record, indent=2, default=str) + "\n")
    return Path(path)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return "" if value is None else str(value).replace("|", "/").replace("\n", " ")[:80]


def summarize(out_dir: Path) -> str:
    """Markdown: one table per JSON under out_dir (columns = union of its rows' keys)."""
    lines = []
    for path in sorted(Path(out_dir).glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            lines += [f"## {path.name}", "", f"unreadable: {err}", ""]
            continue
        dev = record.get("device", {})
        lines += [f"## {record.get('bench', path.stem)} ({path.name})", "",
                  f"{dev.get('gpu', '?')}, torch {dev.get('torch')}, triton {dev.get('triton')}, CUDA {dev.get('cuda')}"]
        for key in ("matmul_peak_tflops", "copy_bandwidth_gbs", "note"):
            if key in record:
                lines.append(f"- {key}: {_cell(record[key])}")
        rows = record.get("rows", [])
        if rows:
            flat = (k for row in rows for k, v in row.items() if not isinstance(v, (dict, list)))
            cols = list(dict.fromkeys(flat))
            lines += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            lines += ["| " + " | ".join(_cell(row.get(c)) for c in cols) + " |" for row in rows]
        profiled = [(row, row["profile"]) for row in rows if isinstance(row.get("profile"), dict)]
        if profiled:
            lines += ["", "Kernel profiles (per unit of work; `kernel_profile`):", ""]
        for row, prof in profiled:
            label = ", ".join(f"{k} {row[k]}" for k in ("shape", "batch", "variant", "method") if k in row)
            lines.append(f"- {label}: {_cell(prof.get('count'))} {prof.get('unit')}, "
                         f"busy {_cell(prof.get('busy_ms'))} ms"
                         + (f" of {_cell(prof['timed_ms'])} ms timed (idle {prof['idle_fraction']:.0%})"
                            if prof.get("idle_fraction") is not None else ""))
            lines += [f"  - {_cell(k['ms'])} ms ({k['share']:.0%}), x{_cell(k['count'])}: `{k['name'][:80]}`"
                      for k in prof.get("top", []) if k.get("share") is not None]
            host = prof.get("host")
            if isinstance(host, dict):
                syncs = ", ".join(f"{name} x{_cell(c['count'])} {_cell(c['ms'])} ms"
                                  for name, c in host.get("syncing_calls", {}).items()) or "none"
                lines.append(f"  - host: {_cell(host.get('self_ms'))} ms of host events; syncing calls: {syncs}")
                lines += [f"    - {_cell(k['ms'])} ms, x{_cell(k['count'])}: `{k['name'][:80]}`"
                          for k in host.get("top", [])]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    # python bench/common.py summarize DIR  -> markdown on stdout
    if len(sys.argv) != 3 or sys.argv[1] != "summarize":
        sys.exit("usage: python bench/common.py summarize DIR")
    print(summarize(Path(sys.argv[2])))
