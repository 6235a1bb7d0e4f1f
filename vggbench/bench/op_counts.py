"""How many ops that do work a step dispatches (torch.profiler, CPU activity): on a GPU each is a launch.

`dispatch_counts(step)` counts, by name, the ops `step()` dispatches: each top-level op once
(what it calls inside is its own business), except

  - ops that launch no kernel count nothing but what they call: allocation, views and metadata
    (aten::empty*, view, reshape, transpose, ...), aten::to / contiguous (when they copy, their
    aten::_to_copy / clone counts), autograd's wrappers (`autograd::engine::evaluate_function: X`,
    the node X itself, AccumulateGrad) and the profiler's or a user's record_function scopes;
  - an op registered in the vggbench namespace (the fused op and its internal ops) counts what
    it calls, or one if it calls nothing that counts (it did its work in its own kernel);
  - a scope the extension records inside its ops (RECORD_FUNCTION("vggbench::cpu::channel_stats"),
    "vggbench::recompute_xhat", ...: a `vggbench::` name that is not a registered op) is one pass.

`unit_counts(impl)` measures one 32->32 BN+residual unit (the benchmark's layer case, small)
in its three phases: training forward, its backward, eval forward.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable

import torch
from torch.autograd.profiler_util import FunctionEvent
from torch.profiler import ProfilerActivity, profile, record_function

from vggbench.bench.layer_cases import LayerBench, LayerCase
from vggbench.tolerances import TOLERANCES

PHASES: tuple[str, ...] = ("forward", "backward", "eval")
UNIT_IMPLS: tuple[str, ...] = ("native", "fused")
CPU = torch.device("cpu")

# ATen ops that launch no kernel of their own: allocation, views, metadata, and conversions
# that copy (if at all) through an op they call.
NO_KERNEL = frozenset(f"aten::{name}" for name in (
    "view", "view_as", "_unsafe_view", "as_strided", "as_strided_", "reshape", "_reshape_alias", "flatten",
    "unflatten", "narrow", "slice", "select", "expand", "expand_as", "t", "transpose", "permute", "unsqueeze",
    "squeeze", "movedim", "split", "chunk", "unbind", "alias", "detach", "detach_", "lift_fresh", "resolve_conj",
    "resolve_neg", "to", "type_as", "contiguous", "new_empty", "new_empty_strided", "resize_", "set_",
    "promote_types", "result_type", "size", "stride", "numel", "dim", "is_contiguous",
))


@functools.cache
def _registered_vggbench_op(name: str) -> bool:
    """Whether `name` is an op of the extension (vggbench::conv_bn_act), not a scope recorded in one."""
    namespace, _, op = name.partition("::")
    return namespace == "vggbench" and "::" not in op and hasattr(torch.ops.vggbench, op)


def _wrapper(name: str) -> bool:
    """Autograd's and the profiler's wrappers and record_function scopes (names without a namespace,
    e.g. an autograd node "ConvolutionBackward0", "ProfilerStep#3", "[memory]")."""
    return "::" not in name or name.startswith(("autograd::", "torch::autograd::"))


def _count(event: FunctionEvent, counts: collections.Counter[str]) -> int:
    """Add `event`'s ops that do work to `counts`; return how many it added."""
    name = event.name
    expanded = _registered_vggbench_op(name)
    if expanded or name.startswith("aten::empty") or name in NO_KERNEL or _wrapper(name):
        added = sum(_count(child, counts) for child in event.cpu_children)
        if added or not expanded:
            return added
    counts[name] += 1
    return 1


_STEP = "vggbench.bench.op_counts.step"  # the scope around the counted step


def dispatch_counts(step: Callable[[], None]) -> collections.Counter[str]:
    """The ops that do work `step()` (run once, profiled) dispatches, by name, as the module doc counts them."""
    from vggbench import ops  # noqa: F401  (registers torch.ops.vggbench.*, which the rules look up)

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function(_STEP):  # what this thread runs; other threads' ops are not the step's
            step()
    counts: collections.Counter[str] = collections.Counter()
    scope = next(event for event in prof.events() if event.name == _STEP)
    for event in scope.cpu_children:
        _count(event, counts)
    return counts


def unit_counts(impl: str, device: torch.device = CPU, n: int = 4,
                size: int = 8) -> dict[str, collections.Counter[str]]:
    """{phase: dispatch_counts} of the benchmark's 32->32 BN+residual unit (its layer case's state;
    float32, channels_last, batch `n`, `size` x `size`) for `impl` ("native" or "fused"), after a
    warm-up step: the training forward, the backward of a training forward (gradients of input,
    residual, conv weight, BN weight and bias) and the eval forward."""
    if impl not in UNIT_IMPLS:
        raise ValueError(f"impl must be one of {UNIT_IMPLS}, got {impl!r}")
    bench = LayerBench(LayerCase("res", n, size, "float32", "channels_last", compile=False), device,
                       TOLERANCES[torch.float32].kink)
    layer_impl = "eager" if impl == "native" else impl  # the layer benchmarks' name of native
    forward = dispatch_counts(bench.pass_fn(layer_impl, "trainfwd"))
    backward = dispatch_counts(bench.backward_fn(layer_impl))
    return {"forward": forward, "backward": backward, "eval": dispatch_counts(bench.pass_fn(layer_impl, "evalfwd"))}
