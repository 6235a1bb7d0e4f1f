"""What autograd keeps for backward, counted exactly, and a native vs fused comparison.

`saved_bytes(fn)` runs `fn` under torch.autograd.graph.saved_tensors_hooks and adds up
the bytes of every distinct storage autograd saved (a tensor saved by two layers counts
once). `python -m vggbench.memory` prints the count for one conv->BN->act unit and for
VGG38 BN+RC, native vs fused.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SavedBytes:
    """Bytes autograd saved, split into the given `excluded` storages (inputs, parameters) and the rest."""

    total: int
    excluded: int

    @property
    def activations(self) -> int:
        """Bytes saved besides the excluded storages."""
        return self.total - self.excluded


def _storage_key(t: torch.Tensor) -> tuple[torch.device, int]:
    return t.device, t.untyped_storage().data_ptr()


def saved_bytes(fn: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> SavedBytes:
    """Run `fn()` and count the bytes of each distinct storage autograd saves for backward.

    Storages of `exclude` (e.g. the input and the parameters) are counted separately.
    The graph `fn` builds is dropped on return.
    """
    storages: dict[tuple[torch.device, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[_storage_key(t)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    excluded = {_storage_key(t) for t in exclude}
    return SavedBytes(
        total=sum(storages.values()), excluded=sum(n for key, n in storages.items() if key in excluded)
    )


def compare(batch: int = 100, filters: int = 32, size: int = 32) -> list[tuple[str, SavedBytes, SavedBytes]]:
    """(what, native, fused) saved bytes for one unit and for VGG38 BN+RC in training mode."""
    from vggbench.models import ConvNormAct, build_model, unit_for

    rows = []
    x = torch.randn(batch, filters, size, size, requires_grad=True)
    native_unit = ConvNormAct(filters, filters)
    fused_unit = unit_for("fused")(filters, filters)
    fused_unit.load_state_dict(native_unit.state_dict())
    counts = [saved_bytes(lambda u=u: u(x, residual=x), exclude=[x, *u.parameters()])
              for u in (native_unit, fused_unit)]
    rows.append((f"unit {filters}->{filters} BN+residual, {batch}x{filters}x{size}x{size}", *counts))
    images = torch.randn(batch, 3, size, size)
    models = [build_model("vgg38", "bn_rc", filters=filters, impl=impl) for impl in ("native", "fused")]
    counts = [saved_bytes(lambda m=m: m(images), exclude=[images, *m.parameters()]) for m in models]
    rows.append((f"VGG38 BN+RC, batch {batch}", *counts))
    return rows


def main(argv: list[str] | None = None) -> int:
    """Print native vs fused saved bytes."""
    parser = argparse.ArgumentParser(prog="python -m vggbench.memory", description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--filters", type=int, default=32)
    args = parser.parse_args(argv)
    print(f"{'saved for backward (besides input and parameters)':<52} {'native':>10} {'fused':>10} {'ratio':>6}")
    for what, native, fused in compare(args.batch, args.filters):
        print(f"{what:<52} {native.activations / 2**20:8.1f}MB {fused.activations / 2**20:8.1f}MB "
              f"{fused.activations / native.activations:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
