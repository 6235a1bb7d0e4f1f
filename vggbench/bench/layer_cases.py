"""Layer-level cases: one of the study's conv -> BatchNorm -> (+residual) -> LeakyReLU units.

A `LayerCase` is a unit at one batch size, resolution, dtype and layout. `LayerBench`
builds its inputs once and, from one initial state, each implementation:

  eager    the native unit, ConvNormAct: Conv2d(bias=False) -> BatchNorm2d -> (+ residual)
           -> LeakyReLU(0.01), eager PyTorch
  compile  the same module under torch.compile(dynamic=False): one compiled module per
           case, warmed up (compiled) before any timing
  fused    the fused op, vggbench.ops.conv_bn_act (FusedConvNormAct)
  float64  the native unit in float64 on the same (rounded) values: the numerical
           reference, not timed
  eager+graph, fused+graph
           CUDA only, forward+backward only: eager's or fused's forward+backward captured
           in a CUDA graph (vggbench.graphs.replayable), timed by replaying it: what is left
           without the launches and the host

Conv weights are in the case's dtype; BatchNorm parameters and buffers stay float32 (what
the fused op requires for bfloat16, and what native BatchNorm2d accepts).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vggbench.graphs import replayable
from vggbench.memory import SavedBytes, saved_bytes
from vggbench.models import ConvNormAct, unit_for

OUT_CHANNELS = 32
# unit id: (in_channels, residual, description). Ids are chosen so that none is a substring
# of another (pytest -k matches substrings).
UNITS: dict[str, tuple[int, bool, str]] = {
    "entry": (3, False, "entry conv 3->32"),
    "conv": (32, False, "conv 32->32"),
    "res": (32, True, "conv 32->32 + residual"),
}
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
LAYOUTS: dict[str, torch.memory_format] = {"channels_last": torch.channels_last,
                                           "contiguous": torch.contiguous_format}
PASSES: dict[str, str] = {"trainfwd": "training forward", "fwdbwd": "training forward+backward",
                          "evalfwd": "eval forward"}
IMPLS: tuple[str, ...] = ("eager", "compile", "fused")  # timed in this order: eager is the baseline
GRAPH_SUFFIX = "+graph"
GRAPH_IMPLS: tuple[str, ...] = ("eager+graph", "fused+graph")  # CUDA: after IMPLS, forward+backward only
GRAPH_PASSES: tuple[str, ...] = ("fwdbwd",)
GRADIENTS = ("grad_input", "grad_weight", "grad_bn_weight", "grad_bn_bias", "grad_residual")
# What each pass's errors are taken over (those present for the unit).
PASS_TENSORS: dict[str, tuple[str, ...]] = {"trainfwd": ("out",), "fwdbwd": ("out", *GRADIENTS),
                                            "evalfwd": ("eval_out",)}


@dataclass(frozen=True)
class LayerCase:
    """One unit (`UNITS` id) at batch `n`, `size` x `size`, a dtype and a layout (names in
    DTYPES, LAYOUTS); `compile`: whether the torch.compile implementation is benchmarked;
    `graphs`: whether the CUDA-graph variants are (CUDA only)."""

    unit: str
    n: int
    size: int
    dtype: str
    layout: str
    compile: bool = True
    graphs: bool = False

    @property
    def name(self) -> str:
        """E.g. conv-N100-H32-float32-channels_last."""
        return f"{self.unit}-N{self.n}-H{self.size}-{self.dtype}-{self.layout}"

    def group(self, pass_: str) -> str:
        """The pytest-benchmark group of this case and pass: its implementations side by side."""
        return f"{self.name}-{pass_}"

    def impls(self, pass_: str) -> tuple[str, ...]:
        """The implementations benchmarked for this case and pass."""
        graphs = GRAPH_IMPLS if self.graphs and pass_ in GRAPH_PASSES else ()
        return (*(impl for impl in IMPLS if impl != "compile" or self.compile), *graphs)


def base_impl(impl: str) -> str:
    """The implementation a CUDA-graph variant replays ("fused+graph": "fused"), or `impl`."""
    return impl.removesuffix(GRAPH_SUFFIX)


def layer_cases(quick: bool, compile: bool = True, graphs: bool = False) -> list[LayerCase]:
    """The cases of a run. Full: N 100 and 256, H 32/16/8, the entry and 32->32 units in
    float32 and bfloat16, channels_last and contiguous, and the 32->32 unit with a residual
    in channels_last (the study's training layout; bfloat16 with `graphs`, the GPU's target).
    Quick (CI): N=8, two shapes, one dtype per layout, torch.compile for one case only
    (`compile=False`: for none). `graphs` (CUDA): with the CUDA-graph variants."""
    if quick:
        return [
            LayerCase("res", 8, 8, "float32", "channels_last", compile=compile, graphs=graphs),
            LayerCase("entry", 8, 16, "float32", "channels_last", compile=False),
            LayerCase("res", 8, 8, "bfloat16", "contiguous", compile=False),
            LayerCase("entry", 8, 16, "bfloat16", "contiguous", compile=False),
        ]
    res_dtypes = ("float32", "bfloat16") if graphs else ("float32",)
    return [
        LayerCase(unit, n, size, dtype, layout, compile=compile, graphs=graphs)
        for n in (100, 256) for size in (32, 16, 8) for unit in UNITS for dtype in DTYPES for layout in LAYOUTS
        if unit != "res" or (dtype in res_dtypes and layout == "channels_last")
    ]


def error_stats(actual: Tensor, expected: Tensor) -> dict[str, float]:
    """max_abs = max|a - b|; max_rel = max|a - b| / max|b| (relative to the tensor's scale,
    so entries near 0 do not blow it up); norm_rel = ||a - b|| / ||b||. Computed in float64."""
    a, b = actual.detach().double(), expected.detach().double()
    diff = (a - b).abs()
    max_abs, scale, norm = diff.max().item(), b.abs().max().item(), b.norm().item()
    return {
        "max_abs": max_abs,
        "max_rel": max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf")),
        "norm_rel": diff.norm().item() / norm if norm > 0 else (0.0 if max_abs == 0 else float("inf")),
    }


class LayerBench:
    """Inputs, modules and numerical results of one case on one device.

    Args:
        case: the case.
        device: where it runs.
        kink: grad_output is zeroed where |pre-activation| < kink * max|pre-activation| (from
            float64), where two correct implementations may take different branches of the
            LeakyReLU; tests/test_ops.py does the same. It does not change the work timed.
    """

    def __init__(self, case: LayerCase, device: torch.device, kink: float) -> None:
        self.case, self.device = case, device
        in_channels, has_residual, _ = UNITS[case.unit]
        self.in_channels = in_channels
        self.dtype, self.memory_format = DTYPES[case.dtype], LAYOUTS[case.layout]
        seed = zlib.crc32(case.name.encode())
        gen = torch.Generator().manual_seed(seed)

        def activation(channels: int, grad: bool) -> Tensor:
            values = torch.randn(case.n, channels, case.size, case.size, generator=gen, dtype=torch.float64)
            t = values.to(device, self.dtype).contiguous(memory_format=self.memory_format)
            return t.requires_grad_(grad)

        # The entry unit's input is the images: they need no gradient, as in training.
        self.input = activation(in_channels, grad=case.unit != "entry")
        self.residual = activation(OUT_CHANNELS, grad=True) if has_residual else None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            unit = ConvNormAct(in_channels, OUT_CHANNELS)
        with torch.no_grad():  # BN away from its identity init: signs, scales, shifts, running stats
            signs = torch.randint(0, 2, (OUT_CHANNELS,), generator=gen) * 2 - 1
            unit.bn.weight.copy_(signs * (0.5 + torch.rand(OUT_CHANNELS, generator=gen)))
            unit.bn.bias.copy_(0.5 * torch.randn(OUT_CHANNELS, generator=gen))
            unit.bn.running_mean.copy_(0.3 * torch.randn(OUT_CHANNELS, generator=gen))
            unit.bn.running_var.copy_(0.5 + torch.rand(OUT_CHANNELS, generator=gen))
        self.state = unit.state_dict()

        reference = self._build("float64", negative_slope=1.0)  # slope 1: the pre-activation
        with torch.no_grad():
            pre = reference(*self._inputs(torch.float64)).float()
        grad_out = torch.randn(pre.shape, generator=gen).to(device)
        grad_out[pre.abs() < kink * pre.abs().max()] = 0
        self.grad_out = grad_out.to(self.dtype).contiguous(memory_format=self.memory_format)

        self._modules: dict[str, nn.Module] = {}
        self._references: dict[str, dict[str, Tensor]] = {}
        self._errors: dict[str, dict[str, dict[str, dict[str, float]]]] = {}

    # --- modules -------------------------------------------------------------------------
    def _build(self, impl: str, negative_slope: float = 0.01) -> nn.Module:
        factory = unit_for("fused") if impl == "fused" else ConvNormAct
        unit = factory(self.in_channels, OUT_CHANNELS, negative_slope=negative_slope)
        unit.load_state_dict(self.state)
        if impl == "float64":
            unit.double()
        else:
            unit.conv.to(self.dtype)
        unit.to(self.device, memory_format=self.memory_format)
        return torch.compile(unit, dynamic=False) if impl == "compile" else unit

    def _inputs(self, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor | None]:
        """(input, residual), or detached copies in `dtype` with the same requires_grad."""
        if dtype is None:
            return self.input, self.residual

        def cast(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach().to(dtype).requires_grad_(t.requires_grad)

        return cast(self.input), cast(self.residual)

    def _grad_tensors(self, module: nn.Module, x: Tensor, residual: Tensor | None) -> dict[str, Tensor]:
        """The tensors a training step differentiates, by GRADIENTS name."""
        unit = getattr(module, "_orig_mod", module)  # a torch.compile'd module wraps the unit
        tensors = {"grad_input": x if x.requires_grad else None, "grad_weight": unit.conv.weight,
                   "grad_bn_weight": unit.bn.weight, "grad_bn_bias": unit.bn.bias, "grad_residual": residual}
        return {name: t for name, t in tensors.items() if t is not None}

    def _results(self, module: nn.Module, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """One training forward+backward, then an eval forward (with the updated running
        statistics): output, gradients, eval output."""
        x, residual = self._inputs(dtype)
        module.train()
        out = module(x, residual=residual)
        tensors = self._grad_tensors(module, x, residual)
        grads = torch.autograd.grad(out, list(tensors.values()), self.grad_out.to(out.dtype))
        module.eval()
        with torch.no_grad():
            eval_out = module(x, residual=residual)
        return {"out": out.detach(), **dict(zip(tensors, grads)), "eval_out": eval_out}

    def _reference(self, impl: str) -> dict[str, Tensor]:
        """Results of native eager or float64 native from the initial state (computed once)."""
        if impl not in self._references:
            dtype = torch.float64 if impl == "float64" else None
            self._references[impl] = self._results(self._build(impl), dtype)
        return self._references[impl]

    def module(self, impl: str) -> nn.Module:
        """The implementation's module (built once per case). Building it runs one training
        step and one eval forward from the initial state, whose results give its errors
        against native eager and float64; for torch.compile this is the compilation."""
        if impl not in self._modules:
            module = self._build(impl)
            results = self._results(module)
            if impl == "eager":
                self._references.setdefault("eager", results)
            self._errors[impl] = {
                f"vs_{ref}": {name: error_stats(results[name], self._reference(ref)[name]) for name in results}
                for ref in ("eager", "float64")
            }
            self._modules[impl] = module
        return self._modules[impl]

    # --- what the benchmarks record and time ---------------------------------------------
    def errors(self, impl: str, pass_: str) -> dict[str, dict[str, dict[str, float]]]:
        """{"vs_eager" | "vs_float64": {tensor: error_stats}} over the tensors of `pass_` (a CUDA-graph
        variant: its base implementation's, whose kernels it replays)."""
        impl = base_impl(impl)
        self.module(impl)
        return {ref: {name: stats for name, stats in by_name.items() if name in PASS_TENSORS[pass_]}
                for ref, by_name in self._errors[impl].items()}

    def saved_bytes(self, impl: str) -> SavedBytes:
        """Bytes autograd keeps for backward after a training forward; the input, residual and
        parameters are the `excluded` part."""
        module = self.module(base_impl(impl))
        module.train()
        exclude = [t for t in (self.input, self.residual, *module.parameters()) if t is not None]
        return saved_bytes(lambda: module(self.input, residual=self.residual), exclude=exclude)

    def backward_fn(self, impl: str) -> Callable[[], tuple[Tensor, ...]]:
        """Run a training forward of `impl` now; return the function that runs its backward (once)."""
        module = self.module(impl)
        x, residual = self._inputs()
        module.train()
        out = module(x, residual=residual)
        tensors = list(self._grad_tensors(module, x, residual).values())
        return lambda: torch.autograd.grad(out, tensors, self.grad_out)

    def pass_fn(self, impl: str, pass_: str) -> Callable[[], object]:
        """The function one round of `pass_` times (the module put in train or eval mode first); a
        CUDA-graph variant: the replay of its base implementation's function, captured now."""
        if impl != base_impl(impl):
            return replayable(self.pass_fn(base_impl(impl), pass_), self.device)
        module = self.module(impl)
        x, residual = self._inputs()
        if pass_ == "evalfwd":
            module.eval()

            def eval_forward() -> Tensor:
                with torch.no_grad():
                    return module(x, residual=residual)

            return eval_forward
        module.train()
        if pass_ == "trainfwd":
            return lambda: module(x, residual=residual)
        tensors = list(self._grad_tensors(module, x, residual).values())

        def forward_backward() -> tuple[Tensor, ...]:
            return torch.autograd.grad(module(x, residual=residual), tensors, self.grad_out)

        return forward_backward
