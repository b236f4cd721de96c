"""Launch policy of the Triton kernels: input checks, the fused kernels' tile per op and batch size, the
batch sizes that compile every kernel, and the matrix kernels' tiles. Everything derived from a quantizer
(block coefficients, mixing matrix, symmetric search) lives on its ``Plan``; nothing here is cached or
mutable, and a benchmark that wants another tile passes it explicitly (``tile=``)."""

from __future__ import annotations

import functools
import warnings
import weakref

import torch
from triton import knobs
from triton.compiler.compiler import CompiledKernel
from triton.compiler.errors import CompilationError

from kernels.plan import Plan


def _load_gluon():
    """``kernels.triton._gluon`` (hadamard's Gluon kernels), or None where this Triton cannot build them:
    Gluon is experimental, so a Triton without what they use (before 3.6), or whose API moved, must not take
    the plain kernels down with it. The plain kernels then run hadamard too (slower: BENCHMARKS.md §9)."""
    try:
        from kernels.triton import _gluon
    except Exception as exc:  # an experimental API can fail in more ways than ImportError
        warnings.warn(f"the Gluon kernels are off ({exc}); the plain Triton kernels run their ops", stacklevel=2)
        return None
    return _gluon


GLUON = _load_gluon()

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The fused kernels' rotation families and the constexpr FAMILY that selects each in _jit._rotate; the
# "matrix" family runs in the matrix kernels instead.
FUSED_FAMILIES = {"blocks": 0, "pairs": 1, "none": 2, "hadamard": 3, "kronecker": 4}

# Tile of the fused kernels, per op: (elements of one program's tile, elements a thread holds). 2048-element
# tiles beat 4096 on an H100 (N = 2^20, float16, dim 128, bits 4: quantize 173 against 208 us, round trip
# 378 against 466 us with 16 elements a thread); smaller tiles also take fewer registers a thread.
FUSED_TILES = {"quantize": (2048, 32), "dequantize": (2048, 32), "roundtrip": (2048, 16)}
# The tiles of the hadamard Gluon kernels (``_gluon``; also kronecker at power-of-two dims): more columns of a
# row in a thread means fewer lanes a row and fewer butterfly stages through warp shuffles. H200, N = 2^20,
# time against full's, same run: the round trip with 32 elements a thread 1.12-1.19x at dim 128 (16:
# 1.23-1.24x), 1.44-1.45x at dim 256 (1.59-1.63x); quantize at dims >= 256 with 64 a thread 0.83-0.96x (32:
# 0.89-1.12x), at dim 64 worse (1.12-1.27x against 1.00-1.03x). Dequantize: 4096-element tiles; at dim 64 its
# time is bimodal run to run (1.0x or 1.5x full's, in any tile tried).
LANE_TILES = {"quantize": (2048, 32), "dequantize": (4096, 32), "roundtrip": (2048, 32)}
# ptxas's register cap of the Gluon kernels, per op (None: its own choice). The round trip took 146-183
# registers a thread at bits 3-4 (sm_90), so an SM held 10-12 of its 2-warp programs' warps; capped at 128 it
# holds 16, for up to ~1 local-memory access (spill) an element. Dequantize (52-62) and quantize need no cap.
LANE_MAXNREG = {"quantize": None, "dequantize": None, "roundtrip": 128}
LANE_WIDE_WIDTH = 256  # from this W on, hadamard's quantize takes LANE_WIDE_QUANTIZE
LANE_WIDE_QUANTIZE = (4096, 64)  # (tile elements, elements a thread)
# The round trip at W = 256 over large batches: one-warp programs of 4 rows (32 elements a thread) and no
# register cap. H200, N = 2^20, bits 2-4, time against full's in one run: 16-bit outputs 0.99-1.12x, float32
# outputs 0.98-1.01x; the 2-warp tile capped at 128 registers: 1.11-1.20x and 0.94-1.10x; 2 warps uncapped:
# up to 1.24x (float32 out, bits 3); one warp capped: up to 1.17x. Measured at W 128 too (no better) and not
# at W 512-1024, which keep LANE_TILES.
LANE_RT_256 = (1024, 1)  # (tile elements, warps)
# Below SMALL_PROGRAMS programs every program is resident at once; quantize/dequantize then hold 8 elements
# a thread (H200, 8,192 rows of 128: dequantize bits 2 0.81x the time of 2 warps). The round trip keeps 16
# (more warps measured slower there).
SMALL_PER_THREAD = {"quantize": 8, "dequantize": 8, "roundtrip": 16}
SMALL_PROGRAMS = 4096
MIN_PROGRAMS = 1024  # ~8 per SM on a 132-SM H100/H200
MIN_TILE = 1024  # elements: small batches shrink the tile down to this, not to single rows
# "blocks" rows wider than CHUNK_COLUMNS go through dequantize and the round trip in chunks of that many
# columns: a [BN, 512] tile made Triton convert each block-coefficient row between layouts through shared
# memory (37 conversions against 5 at dim 128), and chunking took the H200 round trip at dim 512 from
# 0.33-0.40 to 0.67-0.91 of copy. Quantize measured slower chunked (bits 3-4, 16-bit), so it keeps whole rows.
CHUNK_COLUMNS = 128
CHUNKED_FAMILIES = ("blocks",)
CHUNKED_OPS = ("dequantize", "roundtrip")


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for Python ints. triton.cdiv and triton.next_power_of_2 are constexpr-function wrappers
    that cost ~4-5 us a call on the host (measured on this 2-core CPU); the launch path calls them several
    times, so the host side uses these plain versions."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (n >= 1)."""
    return 1 << (n - 1).bit_length()


def check_rows(x: torch.Tensor, plan: Plan, name: str = "x") -> None:
    """Rows x [N, dim] float16 | bfloat16 | float32 on the plan's device (any strides)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {x.dtype}")
    if x.ndim != 2 or x.shape[1] != plan.dim:
        raise ValueError(f"{name} must have shape [N, {plan.dim}], got {list(x.shape)}")
    check_device(x, plan, name)


def check_device(t: torch.Tensor, plan: Plan, name: str) -> None:
    want = plan.device  # (a torch.device: Plan.build and from_op_tensors make it one)
    if t.device.type != want.type or (want.index is not None and t.device.index != want.index):
        raise ValueError(f"{name} is on {t.device} but the plan lives on {plan.device}")


# Flags already found in pinned memory (is_pinned is a CUDA query), by id, with a weak reference that tells a
# live flag from a new object at a reused id. (Not a WeakSet: its lookup compares tensors with ==, a torch op.)
_pinned_flags: dict[int, weakref.ref] = {}


def check_flag(flag: torch.Tensor | None, data: torch.Tensor) -> None:
    """A bad-row flag: None, or int32 [1] on the device of the op's data, or in pinned host memory when that is
    a CUDA device (a kernel writes it through its device mapping; the host reads it after a sync, no copy)."""
    if flag is None:
        return
    known = _pinned_flags.get(id(flag))
    if known is not None and known() is flag:
        return
    if not isinstance(flag, torch.Tensor) or flag.dtype != torch.int32 or flag.numel() != 1:
        raise ValueError(f"flag must be an int32 tensor of one element, got {flag!r}")
    if flag.device == data.device:
        return
    if not (data.device.type == "cuda" and flag.is_pinned()):
        raise ValueError(f"flag must be on {data.device} or in pinned host memory, got {flag.device}")
    key = id(flag)
    _pinned_flags[key] = weakref.ref(flag, lambda _: _pinned_flags.pop(key, None))


def flag_non_finite(norms: torch.Tensor, flag: torch.Tensor) -> None:
    """flag <- 1 if a norm float32 [N] is not finite, else 0, without a host sync (the matrix kernels, which
    write no flag of their own; unlike the fused kernels, this also writes 0)."""
    flag.copy_((~torch.isfinite(norms)).any().reshape(1), non_blocking=True)


_gluon_failed: list[str] = []  # the first Gluon compile error of this process, once one happened

# Launching a compiled kernel without Triton's dispatch. ``kernel[grid](*args)`` binds and specializes every
# argument, builds a cache key from the specializations and str(options), looks the compiled kernel up and
# checks the kernel's globals, on every call: most of the ~30-45 us of host time a bare launch took on the
# H200 host (BENCHMARKS.md §10). Which compiled kernel runs is decided by the constexprs (given by the plan
# and the launch's tile) and by the specialization of the runtime arguments: each int's class (1, a multiple
# of 16, 64-bit) and each tensor's dtype and 16-byte alignment. A launcher names those that vary between
# calls as its launch class (``key``); the plan's fixed tensors and fresh outputs never vary. The first
# launch of a class goes through Triton (which compiles or loads the kernel); later ones call the compiled
# kernel's launcher directly, with the stream Triton would have used. Launch hooks (a profiler's) send every
# launch back through Triton. What the shortcut does not re-read per call: Triton's debug and instrumentation
# knobs and pre-run hooks (set them before the first launch of a class), and the kernel object (a reloaded
# module's kernels need a new Plan). DIRECT = False turns the shortcut off (benchmarks compare the two).
DIRECT = True
_RUNTIME_KNOBS = knobs.runtime


def _idle(hook) -> bool:
    """Whether a launch hook of Triton's knobs does nothing: None, or (triton 3.6) an empty HookChain."""
    return not getattr(hook, "calls", hook)


def int_class(value: int) -> int:
    """Triton's specialization of an int argument, as a small int: 1 (a constant of its own: -1); otherwise
    whether it is a multiple of 16 (+1) and whether it needs 64 bits (+2)."""
    if value == 1:
        return -1
    return (value % 16 == 0) + 2 * (not -0x80000000 <= value < 0x80000000)


def aligned(t: torch.Tensor) -> bool:
    """Triton's specialization of a tensor argument besides its dtype: a 16-byte aligned address."""
    return t.data_ptr() % 16 == 0


def launch(cache: dict, key: tuple, kernel, grid: int, args: tuple, meta: dict) -> None:
    """``kernel[(grid,)](*args, **meta)``; ``cache`` (``Plan.launches``) maps (key, device) to the compiled
    kernel and the constexpr values after ``args`` in its signature, so that a later launch of the class skips
    Triton's dispatch (see DIRECT above). ``key`` must tell apart every launch that Triton would specialize
    differently: the kernel, the constexprs in ``meta`` that are not fixed by the plan, and the classes
    (``int_class``, dtype, ``aligned``) of the arguments that vary between calls."""
    if DIRECT and cache:  # (empty under the interpreter, which returns no compiled kernel: no CUDA query on the CPU)
        device = torch.cuda.current_device()
        entry = cache.get((key, device))
        if entry is not None and _idle(_RUNTIME_KNOBS.launch_enter_hook) and _idle(_RUNTIME_KNOBS.launch_exit_hook):
            compiled, tail = entry
            stream = torch._C._cuda_getCurrentRawStream(device)  # what Triton's driver asks torch for
            compiled.run(
                grid, 1, 1, stream, compiled.function, compiled.packed_metadata, None, None, None, *args, *tail
            )
            return
    compiled = kernel[(grid,)](*args, **meta)
    if DIRECT and isinstance(compiled, CompiledKernel):
        tail = tuple(meta[name] for name in kernel.arg_names[len(args) :])
        cache[(key, torch.cuda.current_device())] = (compiled, tail)


def lane_plan(
    plan: Plan, device: torch.device, width: int, rows: int, warps: int, stored=None, exchange=True, loaded=None
):
    """``_gluon.lane_layout`` of this launch, or None (plain kernels) where Gluon is off or does not apply."""
    if GLUON is None or _gluon_failed:
        return None
    return GLUON.lane_layout(plan, device, width, rows, warps, stored, exchange, loaded)


def launch_gluon(cache: dict, key: tuple, kernel: str, grid: int, args: tuple, meta: dict) -> bool:
    """``launch`` the Gluon kernel ``_gluon.<kernel>``; False (and Gluon off for the rest of the process, with a
    warning) where it fails to compile, so that the caller runs the plain kernel instead: Gluon is experimental,
    and an API that moved may import fine and fail only when a kernel is built. Other errors propagate."""
    try:
        launch(cache, key, getattr(GLUON, kernel), grid, args, meta)
    except CompilationError as exc:
        _gluon_failed.append(str(exc).splitlines()[-1] if str(exc) else type(exc).__name__)
        warnings.warn(f"the Gluon kernels are off ({_gluon_failed[0]}); the plain kernels run their ops", stacklevel=3)
        return False
    return True


def launch_fused(
    plan: Plan, op: str, kernel, key: tuple, grid: int, lanes, head: tuple, flag, tail: tuple, meta: dict
) -> None:
    """Launch ``op``'s fused kernel over ``grid`` programs: the Gluon kernel ``_gluon._<op>_kernel`` where
    ``lanes`` is a lane plan (arguments: ``head``, the flag, the plan's lane sign table (quantize: twice, or the
    plan's two fused parameter pointers where the plan is not hadamard's), ``tail`` (quantize: its first entry,
    the boundaries, replaced by ``Plan.search_table``); constexprs ``meta``, HAS_FLAG
    and LANES, and FAMILY for quantize), else (or where Gluon fails to compile) the plain ``kernel`` (``head``, the
    flag, the plan's two fused parameter pointers, ``tail``; ``meta``, HAS_FLAG and FAMILY). ``flag``: the
    bad-row flag (``check_flag``) or None. ``key``: the launch's class (``launch``), without the kernel and
    the flag, which are added here."""
    has_flag = flag is not None
    flag_arg = flag if has_flag else head[-1]  # (any pointer: not read without HAS_FLAG)
    head, meta = (*head, flag_arg), dict(meta, HAS_FLAG=has_flag)
    key = (*key, has_flag, aligned(flag_arg))
    if lanes is not None:
        gluon_meta = dict(meta, LANES=lanes, maxnreg=lane_maxnreg(op, meta["num_warps"]))
        gluon_tail = tail
        if op == "quantize":  # hadamard's transform, or the in-thread rotation of the plan's family
            params = (plan.lane_sign_table,) * 2 if plan.lane_signs is not None else plan.fused_params
            gluon_meta["FAMILY"] = family_id(plan)
            gluon_tail = (plan.search_table, *tail[1:])  # the boundaries, or the grid search's table (bits 4)
        else:
            params = (plan.lane_sign_table,)
        args = (*head, *params, *gluon_tail)
        if launch_gluon(plan.launches, ("gluon", op, *key), f"_{op}_kernel", grid, args, gluon_meta):
            return
    args = (*head, *plan.fused_params, *tail)
    launch(plan.launches, (op, *key), kernel, grid, args, dict(meta, FAMILY=family_id(plan)))


def lane_maxnreg(op: str, warps: int) -> int | None:
    """ptxas's register cap of the Gluon kernel of ``op`` in programs of ``warps`` warps: LANE_MAXNREG, but
    none for one-warp programs (the round trip's LANE_RT_256 tile)."""
    return None if warps == 1 else LANE_MAXNREG[op]


def fused(plan: Plan) -> bool:
    """Whether the plan's rotation runs in the fused kernels (else in the matrix kernels)."""
    return plan.kernel in FUSED_FAMILIES


def family_id(plan: Plan) -> int:
    """The constexpr FAMILY of the fused kernels for this plan's rotation."""
    return FUSED_FAMILIES[plan.kernel]


def fused_tile(plan: Plan, n: int, op: str, tile: tuple[int, int] | None = None) -> tuple[int, int, int]:
    """(W, BN, num_warps) of the fused kernel of ``op`` over n rows of this plan: ``_fused_tile`` of the plan's
    kernel family and coded width, memoised (a call is on every launch's path)."""
    chunked = plan.kernel in CHUNKED_FAMILIES and op in CHUNKED_OPS
    # The Gluon kernels' tiles only where they can run (``_gluon.lane_layout`` declines ROCm): elsewhere the
    # plain kernels run hadamard at their own tiles (LANE_RT_256's one-warp programs would hold 4 rows).
    lanes = GLUON is not None and not _gluon_failed and plan.lane_signs is not None and torch.version.hip is None
    return _fused_tile(plan.n_coded, n, op, tile, chunked, lanes)


@functools.lru_cache(maxsize=4096)
def _fused_tile(
    n_coded: int, n: int, op: str, tile: tuple[int, int] | None, chunked: bool, lanes: bool = False
) -> tuple[int, int, int]:
    """(W, BN, num_warps) for the fused kernel of ``op`` over n rows: W columns >= n_coded (or a chunk of
    CHUNK_COLUMNS for wide "blocks" rows in CHUNKED_OPS: the kernels loop over the row's chunks), BN rows
    with W * BN ~ the op's tile (FUSED_TILES), warps so that a thread holds at most the op's elements.
    BN shrinks for small batches until there are >= MIN_PROGRAMS programs, so that all SMs have work and
    each program is short; below SMALL_PROGRAMS programs a thread holds SMALL_PER_THREAD elements.
    ``tile``: (tile elements, warps) instead of the defaults (benchmark sweeps; warps 0 = derived).
    ``lanes``: the defaults of the hadamard Gluon kernels (LANE_TILES; ``Plan.lane_signs``)."""
    width = next_power_of_2(max(8, n_coded))
    elements, per_thread = (LANE_TILES if lanes else FUSED_TILES)[op]
    if lanes and op == "quantize" and width >= LANE_WIDE_WIDTH:
        elements, per_thread = LANE_WIDE_QUANTIZE
    warps = 0
    if lanes and op == "roundtrip" and width == 256 and cdiv(n, LANE_RT_256[0] // width) >= SMALL_PROGRAMS:
        elements, warps = LANE_RT_256
    if tile is not None:
        elements, warps = tile
    if chunked:
        width = min(width, CHUNK_COLUMNS)
    rows = max(1, elements // width)
    while rows > 1 and rows * width > MIN_TILE and cdiv(n, rows) < MIN_PROGRAMS:
        rows //= 2  # (rows > 1: a row of 2048 or more columns is already wider than MIN_TILE)
    if cdiv(n, rows) < SMALL_PROGRAMS:
        per_thread = SMALL_PER_THREAD[op]
    if not warps:
        warps = min(16, max(2, next_power_of_2(cdiv(width * rows, 32 * per_thread))))
    return width, rows, warps


def launch_batches(plan: Plan, max_rows: int) -> list[int]:
    """Batch sizes (rows, ascending, the first 1) that between them compile every kernel the fused ops
    launch for batches of 1..max_rows: for each launch configuration (``fused_tile``: each holds for one
    range of batch sizes) its first size that is a multiple of 16 and its first that is not, because
    Triton also specializes the integer argument N on divisibility by 16 (and on N == 1, so 1 and 2 are
    both there). Running each op once at each size, in the check mode of the calls to come (with and without
    a bad-row flag are two kernels), warms them all. [1, 2, 16] for the matrix kernels
    (their tiles do not depend on the batch). N stays specialized: ``do_not_specialize`` moved the kernels'
    times by -8% to +10% (H200, dim 128, float16)."""
    starts = {1}
    if fused(plan):
        for op in FUSED_TILES:
            n = 1
            while n <= max_rows:
                config, last = fused_tile(plan, n, op), n
                # Each configuration of fused_tile holds for one range of n (none comes back after another
                # has taken over): the last n of this one is found by doubling, then bisection.
                step = 1
                while last + step <= max_rows and fused_tile(plan, last + step, op) == config:
                    last += step
                    step *= 2
                while step > 1:
                    step //= 2
                    if last + step <= max_rows and fused_tile(plan, last + step, op) == config:
                        last += step
                starts.add(n)
                unaligned = n + 1 if n % 16 == 0 or n == 1 else n  # N == 1 is a class of its own
                if unaligned <= last:
                    starts.add(unaligned)
                aligned = -(-n // 16) * 16
                if aligned <= last:
                    starts.add(aligned)
                n = last + 1
    else:
        starts.update((2, 16))
    return sorted(s for s in starts if s <= max_rows)


def word_access(plan: Plan, codes: torch.Tensor) -> bool:
    """Whether a group of 8 codes can move as one 1/2/4/8-byte word: bits 1, 2, 4 or 8, whole groups only
    (code_bytes a multiple of bits, so no word runs into the next row), unit byte stride and aligned rows;
    or bits 3 with whole quads of groups (code_bytes a multiple of 12: 3 aligned 32-bit words each)."""
    b = plan.bits
    if b == 3:  # 4 groups (12 bytes) as 3 aligned 32-bit words: whole quads only
        return (
            plan.code_bytes % 12 == 0
            and codes.stride(1) == 1
            and codes.stride(0) % 4 == 0
            and codes.data_ptr() % 4 == 0
        )
    return (
        b in (1, 2, 4, 8)
        and plan.code_bytes % b == 0
        and codes.stride(1) == 1
        and codes.stride(0) % b == 0
        and codes.data_ptr() % b == 0
    )


def matrix_tiles(plan: Plan) -> tuple[int, int, int]:
    """(BN, BK, BO) of the matrix kernels: tl.dot needs every side >= 16; BO a multiple of 8 (packing)."""
    bo = min(64, max(16, next_power_of_2(max(plan.n_coded, plan.dim))))
    return 32, 32, bo
