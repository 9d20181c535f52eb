"""What the schedule phase made of a model, and how long each kernel takes: the TVM half
of ``graphopt profile`` and of the compile summary's fast-path coverage.

:func:`record_schedule` watches a build (a TVM pass instrument; no target's pipeline
changes) and keeps the Relax module as it stands when scheduling is over, right before
``CallTIRRewrite``: every kernel is a scheduled PrimFunc carrying the rule that made it
(``graphopt.schedule_rule``) and ``main`` still names each call. :func:`kernels` reads
that module into :class:`Kernel` records:

- *conv/matmul kernel*: one whose TIR holds a multiply-accumulate reduction block,
  ``C[..] = C[..] + a * b`` with ``a`` and ``b`` reading two different buffers (neither
  ``C``) over a reduction of more than one element. That is every conv (dense, grouped,
  depthwise, transposed), Gemm, MatMul and batched matmul, whatever the fused epilogue,
  and excludes pools, softmax, means and variances (``x * x`` reads one buffer).
- its FLOPs: 2 per multiply-accumulate, the product of that block's iteration extents
  (the usual convention; epilogues are not counted; a symbolic extent, a dynamic batch,
  counts as 1).
- *fast-path coverage*: the share of conv/matmul FLOPs in kernels that a rule other than
  the generic ``reduction``/``fallback`` scheduled (:data:`GENERIC_RULES`).

:func:`time_kernels` times each kernel of the built executable on its own (random
inputs; integer inputs zero, so that gathers stay in range).
"""

from __future__ import annotations

import contextlib
import platform
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from graphopt.errors import TargetError
from graphopt.targets._runner import load_library

__all__ = [
    "GENERIC_RULES",
    "Kernel",
    "ScheduleRecord",
    "record_schedule",
    "kernels",
    "packed_kernel",
    "TENSORIZED_KERNELS",
    "FAST_ALGORITHM_KERNELS",
    "schedule_summary",
    "coverage_line",
    "device_for",
    "time_kernels",
    "time_executable",
    "instrumented_call",
    "time_library",
    "bare_call",
]

# The schedule rules that take any kernel: a conv or matmul they schedule is off the fast path.
GENERIC_RULES = ("reduction", "fallback")
_RULE_ATTR = "graphopt.schedule_rule"
_KERNEL_ATTR = "graphopt.kernel"  # the anchor block of a rule's TE compute
# Kernels whose rule tensorizes the MAC block away (x86 vdpbf16ps, targets/_bf16.py; AMX
# tiles, targets/_amx.py; ARM fmlal, targets/_fp16_arm.py, whose conv keeps the NHWC
# conv's name): their FLOPs come from the call's shapes.
TENSORIZED_KERNELS = (
    "conv2d_nchwc_bf16",
    "matmul_bf16",
    "matmul_amx",
    "conv_amx",
    "conv2d_nhwc",
    "matmul_fp16",
)
# Kernels that compute a conv with fewer multiplies than its definition (Winograd,
# targets/_winograd.py): their FLOPs are the direct conv's, from the call's shapes, so
# GFLOP/s compare with other engines' (which count the model's FLOPs).
FAST_ALGORITHM_KERNELS = ("conv2d_winograd",)
_TAPS_ATTR = "graphopt.taps"  # on a stride-2 Winograd part: its taps of the 3x3 kernel
_SNAPSHOT_BEFORE = "CallTIRRewrite"  # scheduling is over; main still calls kernels by name
_CALL_TIR = ("relax.call_tir", "relax.call_tir_inplace")


@dataclass(frozen=True)
class Kernel:
    """One scheduled PrimFunc that ``main`` calls."""

    name: str
    rule: str | None  # None: the target's schedules do not record their rule
    calls: int  # per inference
    family: str | None  # "conv", "matmul", or None for any other kernel
    flops: int  # per call: 2 x multiply-accumulates of conv/matmul kernels, else 0
    args: tuple = field(repr=False, default=())  # ((shape, dtype), ...): inputs then outputs

    @property
    def generic(self) -> bool:
        return self.rule in GENERIC_RULES


@dataclass
class ScheduleRecord:
    """Filled by :func:`record_schedule`: the module when scheduling was over."""

    module: object = None  # tvm.IRModule, or None before the build got there


@contextlib.contextmanager
def record_schedule() -> Iterator[ScheduleRecord]:
    """Within this block, a build (``graphopt.targets.build``) leaves its scheduled
    Relax module in the yielded record. The current pass context is kept; only the
    instrument is added."""
    import tvm

    record = ScheduleRecord()

    @tvm.instrument.pass_instrument
    class _Snapshot:
        def run_before_pass(self, mod, info) -> None:  # noqa: ANN001
            if info.name.rsplit(".", 1)[-1] == _SNAPSHOT_BEFORE and record.module is None:
                record.module = mod

    cur = tvm.transform.PassContext.current()
    with tvm.transform.PassContext(
        opt_level=cur.opt_level,
        required_pass=list(cur.required_pass),
        disabled_pass=list(cur.disabled_pass),
        instruments=[*cur.instruments, _Snapshot()],
        config=dict(cur.config),
    ):
        yield record


def kernels(mod) -> list[Kernel]:  # noqa: ANN001 - tvm.IRModule from record_schedule
    """The kernels ``main`` calls, in the order of their first call (none when the build
    never reached ``CallTIRRewrite``: ``mod`` None)."""
    from tvm import tirx

    if mod is None:
        return []
    calls = _calls(mod)
    found = []
    for name, (n, args) in calls.items():
        func = mod[name]
        if not isinstance(func, tirx.PrimFunc):
            continue
        rule = func.attrs.get(_RULE_ATTR) if func.attrs is not None else None
        macs = _multiply_accumulates(func)
        annotations = _kernel_annotations(func)
        packed = _kind(annotations)
        if packed in FAST_ALGORITHM_KERNELS or (not macs and packed in TENSORIZED_KERNELS):
            macs = _packed_macs(packed, args, int(annotations.get(_TAPS_ATTR, 9)))
            name_hint = packed
        else:
            name_hint = name
        family = None
        if macs:
            family = "conv" if "conv" in name_hint else "matmul"
        found.append(Kernel(name, None if rule is None else str(rule), n, family, 2 * macs, args))
    return found


def schedule_summary(found: list[Kernel]) -> dict:
    """What the manifest records under ``schedule``: the fast-path coverage in percent
    (None without conv/matmul kernels, or when a target's schedules do not name their
    rules), the conv/matmul kernels the generic rules took, and kernels per rule."""
    heavy = [k for k in found if k.family]
    total = sum(k.flops * k.calls for k in heavy)
    fast = sum(k.flops * k.calls for k in heavy if not k.generic)
    unknown = any(k.rule is None for k in heavy)
    rules: dict[str, int] = {}
    for k in found:
        rules[k.rule or "-"] = rules.get(k.rule or "-", 0) + 1
    return {
        "coverage": None if unknown or not total else round(100.0 * fast / total, 3),
        "conv_matmul_flops": total,
        "fallback_kernels": [k.name for k in heavy if k.generic],
        "rules": dict(sorted(rules.items())),
    }


def coverage_line(schedule: dict) -> str:
    """``fast-path coverage: 97.3% of conv/matmul FLOPs``, from :func:`schedule_summary`'s
    record (what ``graphopt profile`` and the compile summary print)."""
    cov = schedule.get("coverage")
    if not schedule.get("conv_matmul_flops"):
        return "fast-path coverage: no conv/matmul kernels"
    if cov is None:
        return "fast-path coverage: unknown (this target's schedules do not name their rules)"
    shown = "99.9" if cov < 100 and round(cov, 1) >= 100 else f"{cov:.1f}"  # never rounds up
    return f"fast-path coverage: {shown}% of conv/matmul FLOPs"


def _calls(mod) -> dict[str, tuple[int, tuple]]:  # noqa: ANN001
    """kernel name -> (calls from main, ((shape, dtype) of its args, then its outputs))."""
    from tvm import relax

    found: dict[str, tuple[int, tuple]] = {}
    for block in mod["main"].body.blocks:
        for binding in block.bindings:
            call = binding.value
            if not isinstance(call, relax.Call) or getattr(call.op, "name", "") not in _CALL_TIR:
                continue
            name = call.args[0].name_hint
            sig = []
            for ty in [a.ty for a in call.args[1].fields] + [binding.var.ty]:
                for t in getattr(ty, "fields", [ty]):
                    sig.append((tuple(_dim(d) for d in t.shape.values), str(t.dtype)))
            found[name] = (found.get(name, (0, ()))[0] + 1, tuple(sig))
    return found


def _multiply_accumulates(func) -> int:  # noqa: ANN001 - tirx.PrimFunc
    """Multiply-accumulates of ``func``'s MAC reduction blocks (0: none)."""
    from tvm import s_tir, tirx

    try:
        sch = s_tir.Schedule(func)
        todo = list(sch.get_child_blocks(sch.get_sblock("root")))
    except Exception:  # noqa: BLE001 - a kernel without blocks (extern, lowered): no MAC
        return 0
    total = 0
    while todo:
        rv = todo.pop()
        todo.extend(sch.get_child_blocks(rv))
        block = sch.get(rv)
        reduce = [iv for iv in block.iter_vars if iv.iter_type == tirx.IterVar.CommReduce]
        if not reduce or not _is_mac(block.body):
            continue
        if int(np.prod([_dim(iv.dom.extent) for iv in reduce])) > 1:
            total += int(np.prod([_dim(iv.dom.extent) for iv in block.iter_vars]))
    return total


def packed_kernel(func) -> str | None:  # noqa: ANN001 - tirx.PrimFunc
    """The ``graphopt.kernel`` annotation a rule's compute left on a block of ``func``
    (``"conv2d_nchwc_bf16"``, ``"matmul_bf16"``), or None."""
    return _kind(_kernel_annotations(func))


def _kind(annotations: dict) -> str | None:
    kind = annotations.get(_KERNEL_ATTR)
    return None if kind is None else str(kind)


def _kernel_annotations(func) -> dict:  # noqa: ANN001 - tirx.PrimFunc
    """The annotations of the block of ``func`` that carries ``graphopt.kernel`` (a
    Winograd part's taps beside it), or none."""
    from tvm import s_tir

    try:
        sch = s_tir.Schedule(func)
        todo = list(sch.get_child_blocks(sch.get_sblock("root")))
    except Exception:  # noqa: BLE001 - a kernel without blocks
        return {}
    while todo:
        rv = todo.pop()
        todo.extend(sch.get_child_blocks(rv))
        annotations = sch.get(rv).annotations
        if annotations.get(_KERNEL_ATTR) is not None:
            return dict(annotations)
    return {}


def _packed_macs(kind: str, args: tuple, taps: int = 9) -> int:
    """Multiply-accumulates of an annotated kernel from its call's shapes (its last arg
    the output): a conv's NCHWc data times kh x kw of its OIHW{i}i{o}o weight, a matmul's
    [m, k] input times k, a Winograd conv's the direct conv's ``taps`` (a stride-2
    part's fewer). The real input channels, not the zero one a pair pads."""
    out = int(np.prod(args[-1][0]))
    if kind == "conv2d_nhwc":  # NHWC data, OHWI[b]o weight
        w = next((s for s, _ in args[:-1] if len(s) == 5), None)
        return 0 if w is None else out * w[1] * w[2] * w[3]
    if kind == "conv2d_winograd":  # U [e, n, oc chunk, ic chunk, ic lane, oc lane], 3x3
        u = next((s for s, _ in args[:-1] if len(s) == 6), None)
        return 0 if u is None else out * u[3] * u[4] * taps
    if kind == "conv_amx":  # rows [R, C], weight [O/16, taps, C/2, 16, 2]; out [wide, O]
        w = next((s for s, _ in args[:-1] if len(s) == 5 and s[-2:] == (16, 2)), None)
        return 0 if w is None else out * w[1] * w[2] * 2  # the padded width's columns too
    if kind == "matmul_fp16":  # x [..., K], also with a packed [J, K, B] weight
        x = next((s for s, _ in args[:-1] if len(s) >= 2), None)
        return 0 if x is None else out * x[-1]
    if "conv" in kind:
        data = next((s for s, _ in args[:-1] if len(s) == 5), None)
        weight = next((s for s, _ in args[:-1] if len(s) == 7), None)
        if data is None or weight is None:
            return 0
        return out * data[1] * data[4] * weight[2] * weight[3]
    x = next((s for s, _ in args[:-1] if len(s) == 2), None)
    return 0 if x is None else out * x[1]


def _dim(expr) -> int:  # noqa: ANN001
    """A constant extent or dim; a symbolic one (a dynamic batch) counts as 1."""
    from tvm import tirx

    return int(expr.value) if isinstance(expr, tirx.IntImm) else 1


def _is_mac(body) -> bool:  # noqa: ANN001
    """``C[..] = C[..] + a * b`` (either order), ``a`` and ``b`` loading different buffers.

    Nodes are matched by class name: TVM 0.27 builds loads as ``TensorLoad`` (reading
    ``source``) behind a ``BufferLoad`` constructor function, and ``Call`` is ``tvm.ir``'s."""
    if _node(body) != "BufferStore" or _node(body.value) != "Add":
        return False
    out = body.buffer
    for acc, prod in ((body.value.a, body.value.b), (body.value.b, body.value.a)):
        acc, prod = _strip_cast(acc), _strip_cast(prod)
        if _loads_from(acc) is None or not _loads_from(acc).same_as(out) or _node(prod) != "Mul":
            continue
        left = {b for b in _loaded(prod.a) if not b.same_as(out)}
        right = {b for b in _loaded(prod.b) if not b.same_as(out)}
        if left and right and (left - right or right - left):
            return True
    return False


def _node(expr) -> str:  # noqa: ANN001
    return type(expr).__name__


def _loads_from(expr):  # noqa: ANN001, ANN202
    """The buffer a load reads, or None when ``expr`` is not a load."""
    if _node(expr) == "TensorLoad":
        return expr.source
    if _node(expr) == "BufferLoad":
        return expr.buffer
    return None


def _strip_cast(expr):  # noqa: ANN001, ANN202
    while _node(expr) == "Cast":
        expr = expr.value
    return expr


def _loaded(expr) -> set:  # noqa: ANN001
    """The buffers an expression loads (through casts, if_then_else, selects, arithmetic)."""
    found, todo = set(), [expr]
    while todo:
        e = todo.pop()
        kind = _node(e)
        if _loads_from(e) is not None:
            found.add(_loads_from(e))
        elif kind == "Cast":
            todo.append(e.value)
        elif kind == "Call":
            todo.extend(e.args)
        elif kind == "Select":
            todo += [e.true_value, e.false_value]
        elif hasattr(e, "a") and hasattr(e, "b"):  # binary arithmetic
            todo += [e.a, e.b]
    return found


def device_for(spec) -> object:  # noqa: ANN001 - graphopt.targets.TargetSpec
    """The TVM device ``spec``'s kernels run on in this process, or a :class:`TargetError`
    saying in one line why they cannot (no GPU; another CPU architecture, whose kernels
    would run only under emulation, where times mean nothing)."""
    import tvm

    blocked = spec.target.cannot_run_here(spec.tvm)
    if blocked:
        raise TargetError(f"cannot profile target {spec.name} here: {blocked}")
    kind = spec.tvm.get("kind")
    if kind == "llvm":
        arch = str(spec.tvm.get("mtriple", platform.machine())).split("-")[0].lower()
        here = platform.machine().lower()
        same = {"amd64": "x86_64", "arm64": "aarch64"}
        if same.get(arch, arch) != same.get(here, here):
            raise TargetError(
                f"cannot profile target {spec.name} on this {here} machine: its kernels run "
                f"only on {arch} (emulated times mean nothing); profile on an {arch} machine"
            )
    return tvm.cpu() if kind == "llvm" else tvm.device(str(kind))


def _random_args(args: tuple, device) -> list:  # noqa: ANN001
    import tvm

    rng = np.random.default_rng(0)
    out = []
    for shape, dtype in args:
        if np.dtype(dtype).kind == "f":
            arr = rng.standard_normal(shape).astype(dtype)
        else:  # indices, masks: zero stays in range
            arr = np.zeros(shape, dtype)
        out.append(tvm.runtime.tensor(arr, device))
    return out


_ROUNDS = 3  # kernels alone and inside the model: the best of these rounds counts


def time_kernels(executable, found: list[Kernel], device, repeat: int) -> dict[str, float]:  # noqa: ANN001
    """Seconds per call of each kernel, called alone from the built executable's library
    with random inputs (:func:`_median_per_call`): the lowest of ``_ROUNDS`` rounds, the
    kernels taking turns, so a stretch in which a shared machine runs slow (a VM's
    neighbours; 2x here at times) does not land on one kernel alone.

    Timed here with ``perf_counter`` around plain calls, as the VM calls a kernel: on a
    single thread TVM's ``time_evaluator`` reported 3x the time a direct call takes (a
    conv of 0.17 ms as 0.57 ms), which would make the kernels add up to 3x the model."""
    lib = executable.mod.imports[0]  # the kernels' library (its imports: _link's parts)
    calls = []
    for k in found:
        func = lib.get_function(k.name, query_imports=True)
        args = _random_args(k.args, device)
        calls.append((k.name, lambda f=func, a=args: f(*a)))
    times: dict[str, float] = {}
    for _ in range(_ROUNDS):
        for name, call in calls:
            secs = _median_per_call(call, device, repeat)
            times[name] = min(times.get(name, secs), secs)
    return times


def _median_per_call(call, device, repeat: int) -> float:  # noqa: ANN001
    """The median of single timed calls (at least ``repeat``, about 20 ms of them): on a
    busy machine a median ignores the calls another process interrupted, where a mean
    over a batch of calls does not."""
    start = time.perf_counter()
    call()  # warm up, and a first estimate
    device.sync()
    once = max(time.perf_counter() - start, 1e-7)
    times = []
    for _ in range(max(repeat, min(int(0.02 / once), 20 * repeat))):
        start = time.perf_counter()
        call()
        device.sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_executable(
    executable,  # noqa: ANN001 - relax.VMExecutable
    device,  # noqa: ANN001
    arrays: list[np.ndarray],
    repeat: int,
) -> tuple[list[float], dict[str, float]]:
    """``repeat`` calls of a built executable's ``main`` through the bare TVM runtime
    (:func:`main_call`), taking turns with as many instrumented ones
    (:func:`instrumented_call`), in ``_ROUNDS`` rounds: of the round whose plain calls took
    least (a shared VM drifts between speeds; the kernels alone are the best of rounds
    too), the seconds of each plain call, and each function's seconds per inference inside
    the model (its summed time in an instrumented call, the median over the round).

    Why a kernel's time inside the model: called over and over alone, it keeps its
    weights in cache; in the model they come from memory, written long before (ResNet-50
    on a Zen 4: the 7x7-stage Winograd convs, 16.8 MB of transformed weights, 1.6x their
    time alone; the classifier's 8 MB GEMV 2.4x; the 1x1 convs 1.0-1.2x)."""
    lib = executable.jit()
    plain = main_call(lib, device, arrays)
    instrumented, seconds = instrumented_call(lib, device, arrays)
    for _ in range(min(repeat, 3)):
        plain()
        instrumented()
    device.sync()
    times, runs = [], []
    for _ in range(repeat):
        start = time.perf_counter()
        plain()
        device.sync()
        times.append(time.perf_counter() - start)
        seconds.clear()
        instrumented()
        runs.append({name: sum(each) for name, each in seconds.items()})
    # the calls in _ROUNDS rounds; the round whose plain calls took least counts
    size = max(len(runs) // _ROUNDS, 1)
    rounds = [range(i, min(i + size, len(runs))) for i in range(0, len(runs), size)]
    best = min(rounds, key=lambda r: statistics.median(times[i] for i in r))
    names = set().union(*(runs[i] for i in best))
    return [times[i] for i in best], {
        n: statistics.median(runs[i].get(n, 0.0) for i in best) for n in names
    }


def instrumented_call(lib, device, arrays: list[np.ndarray], only: set[str] | None = None):  # noqa: ANN001, ANN201
    """A call of ``main`` as :func:`main_call` (the device synchronized after it), with a
    Relax VM instrument around each function it calls (``only``: around these): returns
    the call and the dict it fills, function name -> the seconds of each of its calls, a
    list appended to call after call (clear it for one call's figures). The tuner's
    in-model kernel times (``tuning._latency``) and ``graphopt profile`` use it."""
    import tvm

    vm = tvm.runtime.vm.VirtualMachine(lib, device)
    main = vm["main"]
    args = [tvm.runtime.tensor(np.ascontiguousarray(a), device) for a in arrays]
    clock = time.perf_counter
    started = [0.0]
    seconds: dict[str, list[float]] = {}

    def instrument(_func, symbol, before, _ret, *_args) -> int:  # noqa: ANN001
        name = str(symbol)
        if only is not None and name not in only:
            return 0
        device.sync()
        if before:
            started[0] = clock()
        else:
            seconds.setdefault(name, []).append(clock() - started[0])
        return 0  # VMInstrumentReturnKind.NO_OP: run the call as usual

    vm.set_instrument(instrument)

    def call() -> None:
        main(*args)
        device.sync()

    return call, seconds


def time_library(path, device, arrays: list[np.ndarray], repeat: int) -> list[float]:  # noqa: ANN001
    """The same for an artifact's library at ``path`` (loaded as ``Artifact`` loads it)."""
    return _time_main(load_library(path), device, arrays, repeat)


def main_call(lib, device, arrays: list[np.ndarray]):  # noqa: ANN001, ANN201 - () -> outputs
    """A call of ``main`` in one Relax VM of ``lib`` (any graphopt artifact's library),
    inputs already tensors on ``device``, outputs left there: the cost of a call without
    graphopt's conversions."""
    import tvm

    main = tvm.runtime.vm.VirtualMachine(lib, device)["main"]
    args = [tvm.runtime.tensor(np.ascontiguousarray(a), device) for a in arrays]
    return lambda: main(*args)


def _time_main(lib, device, arrays: list[np.ndarray], repeat: int) -> list[float]:  # noqa: ANN001
    """Seconds of each of ``repeat`` calls of :func:`main_call`."""
    call = main_call(lib, device, arrays)
    for _ in range(min(repeat, 10)):
        call()
    device.sync()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        device.sync()
        times.append(time.perf_counter() - start)
    return times


def bare_call(path, device, arrays: list[np.ndarray]):  # noqa: ANN001, ANN201 - () -> None
    """A call of the artifact at ``path`` through the bare TVM runtime, for timing: one
    Relax VM, ``arrays`` already tensors on ``device``, outputs left there, the device
    synchronized. What is left is TVM's own cost of a call (and the kernels')."""
    import tvm

    main = tvm.runtime.vm.VirtualMachine(load_library(path), device)["main"]
    args = [tvm.runtime.tensor(np.ascontiguousarray(a), device) for a in arrays]
    sync = device.sync

    def call() -> None:
        main(*args)
        sync()

    return call
