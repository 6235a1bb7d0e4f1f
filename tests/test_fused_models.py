"""The fused implementation inside the models: same maths, same checkpoints, less memory, compiles."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers import assert_fused_trains_like_native, option, set_option, twin_models
from vggbench.config import ConfigError, TrainConfig
from vggbench.memory import saved_bytes
from vggbench.models import ConvNormAct, build_model, unit_for
from vggbench.models.vgg import ProcessingBlock
from vggbench.train import main

FusedConvNormAct = unit_for("fused")


def test_vgg38_bn_rc_trains_the_same_fused_and_native():
    """Adam steps of VGG38 BN+RC from the same initialisation give matching losses and weights
    (tests/helpers.py: assert_fused_trains_like_native says how they are compared).

    How far each float32 run drifts from float64 depends on the CPU's kernels (AVX2 or
    AVX-512 oneDNN/ATen, Winograd): e.g. by step 4 native ~1e-3, fused 2e-7 (AVX2 EPYC)
    to 6e-5 (AVX-512 Xeon), so no fixed figure would hold on every machine.
    """
    assert_fused_trains_like_native()


@pytest.mark.parametrize("variant", ["plain", "bn", "rc", "bn_rc"])
def test_every_variant_runs_fused_with_native_outputs(variant):
    """Training-mode and eval-mode forward of each study variant (with a projection shortcut) match.

    In float64: 37 layers without residuals amplify float32 rounding differences to
    ~1e-3 relative in the logits (for native float32 against float64 too).
    """
    torch.manual_seed(0)
    native, fused = (m.double() for m in twin_models(variant, residual_reduction=True))
    images = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    for train in (True, False):
        native.train(train), fused.train(train)
        torch.testing.assert_close(fused(images), native(images), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(fused.state_dict(), native.state_dict())  # same running statistics


def test_checkpoints_load_across_implementations():
    native, fused = twin_models("bn_rc")
    assert list(native.state_dict()) == list(fused.state_dict())
    build_model("vgg38", "bn_rc", filters=8).load_state_dict(fused.state_dict(), strict=True)
    build_model("vgg38", "bn_rc", filters=8, impl="fused").load_state_dict(native.state_dict(), strict=True)


def test_fused_unit_keeps_one_activation_besides_its_input():
    """Saved bytes, each storage once: fused keeps its output only; native also keeps conv and BN outputs."""
    x = torch.randn(8, 16, 16, 16, requires_grad=True)
    activation = x.numel() * x.element_size()
    native, fused = ConvNormAct(16, 16), FusedConvNormAct(16, 16)
    fused.load_state_dict(native.state_dict())
    counts = {name: saved_bytes(lambda u=unit: u(x, residual=x), exclude=[x, *unit.parameters()])
              for name, unit in (("native", native), ("fused", fused))}
    print(f"\nsaved besides input and parameters: native {counts['native'].activations} B, "
          f"fused {counts['fused'].activations} B, one activation {activation} B")
    channel_stats = 2 * 16 * 4  # the batch mean and variance
    assert counts["fused"].activations <= activation + channel_stats
    assert counts["native"].activations >= 2 * activation


def test_fused_model_keeps_one_activation_per_layer():
    """Across VGG38 BN+RC, fused saves at most one activation per unit (plus the input), and the
    entry unit's conv output (kept on the CPU for convs of fewer than 8 input channels: ops.py);
    native ~2x that."""
    torch.manual_seed(0)
    native, fused = twin_models("bn_rc")
    images = torch.randn(8, 3, 32, 32)
    outputs: list[int] = []
    kept: list[int] = []  # the conv outputs of units with fewer than 8 input channels

    def record(unit: FusedConvNormAct, _inputs, out: torch.Tensor) -> None:
        outputs.append(out.numel() * out.element_size())
        if unit.conv.in_channels < 8:
            kept.append(outputs[-1])

    hooks = [m.register_forward_hook(record) for m in fused.modules() if isinstance(m, FusedConvNormAct)]
    counts = {}
    for name, model in (("native", native), ("fused", fused)):
        counts[name] = saved_bytes(lambda m=model: m(images), exclude=[images, *model.parameters()])
    for hook in hooks:
        hook.remove()
    per_layer = sum(outputs)
    print(f"\nVGG38 BN+RC saved: native {counts['native'].activations} B, fused {counts['fused'].activations} B, "
          f"unit outputs {per_layer} B")
    small = 4096 * len(outputs)  # per-channel statistics and the classifier's pooled input
    assert len(kept) == 1  # the entry unit
    assert counts["fused"].activations <= per_layer + kept[0] + small
    assert counts["native"].activations >= 1.9 * per_layer


def test_torch_compile_fullgraph_matches_eager():
    """A residual block of fused units compiles with no graph break and trains like eager (BN buffers too)."""
    torch.manual_seed(0)
    eager = ProcessingBlock([FusedConvNormAct(8, 8) for _ in range(2)], residual=True)
    compiled_block = ProcessingBlock([FusedConvNormAct(8, 8) for _ in range(2)], residual=True)
    compiled_block.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_block, fullgraph=True)
    x = torch.randn(4, 8, 8, 8)
    for _ in range(2):
        outs = [m(x) for m in (eager, compiled)]
        grads = [torch.autograd.grad(out.square().sum(), list(m.parameters()))
                 for out, m in zip(outs, (eager, compiled_block))]
        torch.testing.assert_close(outs[1], outs[0])
        torch.testing.assert_close(grads[1], grads[0])
    torch.testing.assert_close(compiled_block.state_dict(), eager.state_dict())
    assert int(compiled_block.units[0].bn.num_batches_tracked) == 2


def test_fused_rejects_what_it_does_not_fuse():
    with pytest.raises(ValueError, match="BatchNorm before the activation"):
        FusedConvNormAct(3, 8, norm="after")
    with pytest.raises(ValueError, match="sigmoid"):
        FusedConvNormAct(3, 8, activation="sigmoid")
    with pytest.raises(ConfigError, match="--impl fused"):
        TrainConfig(impl="fused", activation="sigmoid").validate()


def test_training_with_fused_then_resuming_with_native(tiny_args):
    """--impl fused trains; rolled back to epoch 1, the run continues with --impl native."""
    args = set_option(tiny_args, "--epochs", "2") + ["--impl", "fused"]
    assert main(args) == 0
    run = Path(option(tiny_args, "--out-dir"))
    for later in ("checkpoints/epoch-0002.pt", "test.json"):
        (run / later).unlink()
    assert main(["--out-dir", str(run), "--resume", "--impl", "native", "--no-progress"]) == 0
    epochs = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2] and (run / "test.json").exists()
