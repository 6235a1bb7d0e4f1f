"""Gradient-flow statistics and their diagnosis."""

import math

import pytest
import torch

from vggbench.gradflow import GradientFlowRecorder, describe_parameters, diagnose
from vggbench.models import vgg08


def backward_step(model, seed):
    torch.manual_seed(seed)
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.randint(0, 100, (4,))).backward()
    return [p.grad.clone() for p in model.parameters()]


def test_statistics_are_the_epoch_average_of_each_step():
    model = vgg08("bn")
    recorder = GradientFlowRecorder(model)
    grads = []
    for seed in range(3):
        grads.append(backward_step(model, seed))
        recorder.record()
    record = recorder.end_epoch(1)
    assert record["steps"] == 3
    for i in range(len(grads[0])):
        steps = [g[i] for g in grads]
        assert record["mean_abs"][i] == pytest.approx(sum(g.abs().mean().item() for g in steps) / 3, rel=1e-5)
        assert record["max_abs"][i] == pytest.approx(sum(g.abs().max().item() for g in steps) / 3, rel=1e-5)
        assert record["l2"][i] == pytest.approx(sum(g.norm().item() for g in steps) / 3, rel=1e-5)


def test_layers_are_described_in_forward_order():
    layers = describe_parameters(vgg08("bn"))
    assert [layer["kind"] for layer in layers[:3]] == ["conv", "bn", "bn"]
    assert layers[0] == {"name": "features.0.conv.weight", "shape": [32, 3, 3, 3], "kind": "conv", "param": "weight"}
    assert layers[-1]["kind"] == "linear" and layers[-1]["param"] == "bias"


def test_windows_and_history_round_trip():
    model = vgg08()
    recorder = GradientFlowRecorder(model, window=2)
    for seed in range(5):
        backward_step(model, seed)
        recorder.record()
    recorder.end_epoch(1)
    assert [(w["step_start"], w["step_end"]) for w in recorder.windows] == [(1, 2), (3, 4)]
    restored = GradientFlowRecorder(model, window=2)
    restored.load_state_dict(recorder.state_dict())
    assert restored.state_dict() == recorder.state_dict()
    with pytest.raises(ValueError, match="different model"):
        GradientFlowRecorder(vgg08("bn")).load_state_dict(recorder.state_dict())


LAYERS = [{"kind": "conv", "param": "weight"}, {"kind": "conv", "param": "weight"},
          {"kind": "linear", "param": "weight"}]


@pytest.mark.parametrize(
    "mean_abs, status",
    [
        ([1e-18, 1e-10, 2e-4], "vanishing"),
        ([1e-2, 1e-3, 5e-3], "healthy"),
        ([10.0, 1e-3, 1e-3], "exploding"),
        ([math.nan, 1e-3, 1e-3], "exploding"),
        ([0.0, 0.0, 0.0], "vanishing"),
    ],
)
def test_diagnosis_rule(mean_abs, status):
    result = diagnose(LAYERS, mean_abs, mean_abs)
    assert result["status"] == status and "first-conv" in result["rule"]
