"""Re-launching compiled Triton kernels without the JIT's per-call work.

Every `kernel[grid](*args)` call of a `@triton.jit` function binds the arguments, computes their
specialization (dtypes, 16-byte alignment, integer ranges), hashes a cache key, checks the globals the
kernel read, and an `@triton.autotune` wrapper first builds its own tuning key from a dict of every
argument. Measured on the H100 machine's host (Triton 3.6, one process): an autotuned FP8 quantizer
launch took 26 us of host time, the same kernel through the bare JIT 18 us, its compiled launcher alone
8 us (bench/fp8_step.py compares whole layers and the model step with and without this). The FP8 layers
launch nine kernels per linear layer forward and backward, so at the mini model's sizes the step waits
on Python, not on the GPU.

`FastLaunch(kernel)` wraps a jitted or autotuned kernel. A call with a *signature* it has not seen goes
through Triton as usual (tuning and compiling as needed) and remembers the compiled kernel and the config
the autotuner picked; later calls with the same signature call the compiled kernel's launcher directly.

The signature is a superset of everything a compiled kernel depends on, so a remembered kernel is only
re-used where Triton itself would pick the same binary:

* tensors: dtype and whether the address is 16-byte aligned;
* integers: whether the value is 1, whether it is a multiple of 16, and which of i32 / i64 / u64 holds it;
  the values themselves for the autotuner's key arguments (and for every keyword argument: the
  constexprs), and the autotuner's config list itself (a test that pins one config gets that config);
* TMA descriptors: the same of their base tensor, shape and strides, plus block shape, layout and padding;
* anything else (None, floats, bools): its value or type.

Where that cannot hold the fast path is off and every call goes through Triton: under TRITON_INTERPRET=1
(no compiled kernels), and for autotuners with `reset_to_zero`/`restore_value` hooks.
MOETRON_FAST_LAUNCH=0 turns it off everywhere (`FastLaunch.on`, read on every call; bench/fp8_step.py flips
it to compare). Configs with a `pre_hook` (the FP8 GEMM sets its descriptors' block shapes in one) have it
run before every fast launch, as Triton runs it. The grid callable gets the keyword constexprs and the
chosen config's meta-parameters (the launchers here read only BLOCK sizes from it), not the positional
arguments.
"""

from __future__ import annotations

import os

from triton import knobs
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as _GluonDescriptor
from triton.runtime import driver
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_I32, _I64 = 2**31, 2**63


def _int_class(v: int) -> tuple:
    width = 0 if -_I32 <= v < _I32 else 1 if -_I64 <= v < _I64 else 2
    return (v == 1, v % 16 == 0, width)


_MEMO_BOUND = 1 << 14  # entries a memo keeps before it is cleared (token counts vary from step to step)
_INT_CLASSES: dict[int, tuple] = {}  # memo of _int_class: launches pass the same sizes and strides again and again
_DIMS_CLASSES: dict[tuple, tuple] = {}  # memo of a descriptor's (shape, strides) classes


def _remember(memo: dict, key, make):
    """memo[key], made by make(key) the first time; the memo is emptied when it reaches _MEMO_BOUND."""
    c = memo.get(key)
    if c is None:
        if len(memo) >= _MEMO_BOUND:
            memo.clear()
        c = memo[key] = make(key)
    return c


def _int_class_memo(v: int) -> tuple:
    return _remember(_INT_CLASSES, v, _int_class)


def _dims_class(shape: tuple, strides: tuple) -> tuple:
    return _remember(_DIMS_CLASSES, (shape, strides), lambda k: tuple(tuple(map(_int_class, dims)) for dims in k))


def _tensor_class(t) -> tuple:
    return (t.dtype, t.data_ptr() % 16 == 0)


def _arg_class(v):
    """What of one positional argument a compiled kernel can depend on (see the module docstring)."""
    kind = type(v)
    if kind is int:  # (not bool: bool is kept whole below)
        return _int_class_memo(v)
    if kind is bool or v is None:
        return v
    if hasattr(v, "data_ptr"):  # a tensor
        return _tensor_class(v)
    if hasattr(v, "block_shape"):  # a host-side TMA descriptor (triton.tools or Gluon)
        return (
            _tensor_class(v.base),
            _dims_class(tuple(v.shape), tuple(v.strides)),
            tuple(v.block_shape),
            getattr(v, "layout", None),
            getattr(v, "padding", None),
        )
    if isinstance(v, int):  # an int subclass other than bool (an IntEnum, say)
        return _int_class(v)
    return kind


def signature(args: tuple, key_positions: tuple[int, ...] = ()) -> tuple:
    """The specialization signature of positional `args`; the values at `key_positions` (those present) are
    kept whole. (_arg_class for each argument, with the commonest kinds, ints and tensors, tested inline: this
    runs for every argument of every launch.)"""
    out = []
    add, ints = out.append, _INT_CLASSES
    for v in args:
        kind = type(v)
        if kind is int and v in ints:
            add(ints[v])
        elif kind is not int and hasattr(v, "data_ptr"):  # a tensor (ints, bools and None have no data_ptr)
            add((v.dtype, v.data_ptr() % 16 == 0))
        else:
            add(_arg_class(v))
    for i in key_positions:
        if i < len(args):
            add(args[i])
    return tuple(out)


def host_descriptor(t, block_shape: list[int], layout):
    """Gluon's host-side TensorDescriptor of `t` (its shape and strides, `block_shape` boxes, NVMMA `layout`),
    built without the dataclass's per-call validation (~3-5 us of host time, and the attention backward builds
    17 descriptors a call). What TMA needs is checked here: a 16-byte aligned base and row strides, a unit
    last stride; the block shapes and layouts are the callers' constants."""
    strides = t.stride()
    if t.data_ptr() % 16 or strides[-1] != 1 or any(s * t.element_size() % 16 for s in strides[:-1]):
        raise ValueError(
            f"TMA descriptor: tensor {tuple(t.shape)} with strides {strides} at address {t.data_ptr():#x} needs a "
            "16-byte aligned base and row strides and a unit last stride; pass a contiguous copy"
        )
    d = object.__new__(_GluonDescriptor)
    d.base, d.shape, d.strides, d.block_shape, d.layout, d.padding = t, t.shape, strides, block_shape, layout, "zero"
    return d


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for host integers. `triton.cdiv` is itself a jit function: called from Python it costs
    ~6 us (argument unwrapping), and a public kernel call computes several grids and tile counts."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n, for host integers n >= 1 (as triton.next_power_of_2, without its ~6 us
    of jit-call overhead)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


class FastLaunch:
    """`FastLaunch(kernel)(grid, *args, **constexprs)` launches `kernel[grid](*args, **constexprs)`,
    remembering the compiled kernel per signature (module docstring). `kernel` is a `@triton.jit` function,
    optionally under one `@triton.autotune`. Returns nothing."""

    on = os.environ.get("MOETRON_FAST_LAUNCH", "1") != "0"  # the switch for every instance

    def __init__(self, kernel):
        self.kernel = kernel
        self.autotuner = kernel if isinstance(kernel, Autotuner) else None
        self.jit = kernel.fn if self.autotuner else kernel
        self.enabled = not INTERPRET and isinstance(self.jit, JITFunction)
        if self.autotuner is not None:
            hooks = (self.autotuner.reset_to_zero, self.autotuner.restore_value)
            self.enabled = self.enabled and not any(hooks)
        self.cache: dict[tuple, tuple] = {}
        if not self.enabled:
            return
        self.names = list(self.jit.arg_names)
        tuned = set(self.autotuner.keys if self.autotuner else ())
        # positions whose values (not only their class) select the binary or the config
        self.key_positions = tuple(i for i, p in enumerate(self.jit.params) if p.is_constexpr or p.name in tuned)

    def __call__(self, grid, *args, **constexprs) -> None:
        if not (self.enabled and FastLaunch.on):
            self.kernel[grid](*args, **constexprs)
            return
        device = driver.active.get_current_device()
        # the autotuner's config list in use: replacing it (tests pin one config) must not re-use the kernel of
        # another; each entry keeps its list alive, so the id cannot come back for a different list
        configs = self.autotuner.configs if self.autotuner else None
        key = (device, id(configs), signature(args, self.key_positions), tuple(constexprs.items()))
        entry = self.cache.get(key)
        if entry is None:
            self.cache[key] = (*self._first_launch(grid, args, constexprs), configs)
            return
        compiled, meta, tail, pre_hook, _ = entry
        if pre_hook is not None:
            pre_hook({**dict(zip(self.names, args)), **meta})
        grid = grid(meta) if callable(grid) else grid
        grid_x, grid_y, grid_z = (*grid, 1, 1)[:3]
        stream = driver.active.get_current_stream(device)
        enter, exit_ = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
        launch_metadata = None if enter is None else compiled.launch_metadata(grid, stream, *args, *tail)
        compiled.run(
            grid_x, grid_y, grid_z, stream, compiled.function, compiled.packed_metadata, launch_metadata,
            enter, exit_, *args, *tail,
        )  # fmt: skip

    def _first_launch(self, grid, args, constexprs) -> tuple:
        """Launch through Triton (tuning and compiling as needed); return what later launches re-use:
        (compiled kernel, meta for the grid, the trailing arguments in parameter order, config pre_hook)."""
        compiled = self.kernel[grid](*args, **constexprs)
        config = self.autotuner.best_config if self.autotuner else None
        meta = {**constexprs, **(config.all_kwargs() if config else {})}
        params = {p.name: p for p in self.jit.params}
        tail = []
        for name in self.names[len(args) :]:
            if name in meta:
                tail.append(meta[name])
            elif params[name].has_default:
                tail.append(params[name].default)
            else:
                raise TypeError(f"FastLaunch: no value for parameter {name!r} of {self.jit.__name__}")
        if hasattr(compiled, "result"):  # an asynchronous compile
            compiled = compiled.result()
        return compiled, meta, tuple(tail), config.pre_hook if config else None


def device_scratch(size: int, alignment: int, stream):
    """Global memory in which kernels build their tensor descriptors on the device: pass to triton.set_allocator
    before such a launch, in the launching thread (the allocator is per thread, and autograd runs backward
    passes in threads of its own)."""
    import torch

    return torch.empty(size, dtype=torch.int8, device="cuda")


__all__ = ["FastLaunch", "cdiv", "device_scratch", "host_descriptor", "next_power_of_2", "signature"]
