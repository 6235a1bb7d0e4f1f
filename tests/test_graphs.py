"""--cuda-graphs on the CPU: its refusals, and the static-buffer step logic a graph records,
run without capture, training exactly as the eager step (tests/test_cuda.py captures it on a GPU)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import set_option, without_timing
from vggbench import launch
from vggbench.config import ConfigError, TrainConfig
from vggbench.graphs import WARMUP_STEPS, GraphedStep, check_capturable
from vggbench.optim import load_optimizer_state, make_optimizer
from vggbench.train import Trainer, build_parser, main, make_model


def config(args: list[str]) -> TrainConfig:
    return TrainConfig(**vars(build_parser().parse_args(args)))


def test_cuda_graphs_on_the_cpu_is_a_clear_error(tiny_args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*tiny_args, "--cuda-graphs"])
    assert exit_info.value.code == 2
    assert "--cuda-graphs captures CUDA work and needs a CUDA device, not cpu" in capsys.readouterr().err


@pytest.mark.parametrize(("change", "world_size", "message"), [
    ({"precision": "fp16"}, 1, "cannot capture fp16's gradient scaling"),
    ({}, 2, "not DDP's across 2 ranks"),
], ids=["fp16", "two-ranks"])
def test_impossible_captures_are_refused(change, world_size, message):
    cfg = TrainConfig(cuda_graphs=True, **change)
    with pytest.raises(ConfigError, match=message):
        check_capturable(cfg, torch.device("cuda"), world_size)
    check_capturable(TrainConfig(**change), torch.device("cuda"), world_size)  # without --cuda-graphs: fine


@pytest.mark.parametrize(("where", "message"), [
    (["--nproc", "2"], "--cuda-graphs captures CUDA work and needs a CUDA device, not cpu"),
    (["--slurm", "--executor", "local", "--gpus-per-node", "2"], "not DDP's across 2 ranks"),
    (["--slurm", "--executor", "local", "--sweep", "SWEEP"], "needs a CUDA device, not cpu"),
], ids=["launch-cpu", "slurm-two-gpus", "sweep-point"])
def test_launches_refuse_impossible_captures_before_starting_anything(tiny_args, tmp_path, capsys, where, message):
    """launch and its --slurm (or --sweep) submission check --cuda-graphs against their ranks and device
    before any rank starts or job is queued, in one error line (exit 2)."""
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("grid:\n  cuda_graphs: [false, true]\n")
    args = list(tiny_args)
    if "--nproc" not in where:  # the tasks' device comes from the submission
        del args[args.index("--device"):args.index("--device") + 2]
    argv = [*(str(sweep) if arg == "SWEEP" else arg for arg in where), *args]
    argv += [] if "--sweep" in where else ["--cuda-graphs"]
    try:
        code = launch.main(argv)
    except SystemExit as exit_info:
        code = exit_info.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "error:" in err
    assert not (tmp_path / "run").exists() and "started rank pids" not in err


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_static_buffer_steps_train_exactly_as_eager(tiny_args, tmp_path, precision):
    """The Trainer under --cuda-graphs without capture (the CPU): batches copied into static buffers,
    the same step functions, the smaller last batch (500 = 10 x 48 + 20) eager; every metric,
    gradient-flow record and weight is bit for bit the eager run's."""
    args = [*set_option(tiny_args, "--batch-size", "48"), "--precision", precision, "--gradflow-every", "4"]
    trainers = [Trainer(config(set_option(args, "--out-dir", str(tmp_path / name)) + graphs), torch.device("cpu"))
                for name, graphs in (("eager", []), ("graphs", ["--cuda-graphs"]))]
    results = []
    for trainer in trainers:
        rows, flows = zip(*(trainer.run_epoch(epoch) for epoch in (1, 2)))
        test = trainer.evaluate(trainer.splits.test, "test")  # 200 images: 4 x 48 + 8
        results.append((without_timing(list(rows)), list(flows), trainer.recorder.windows, test))
    assert results[1] == results[0]
    torch.testing.assert_close(trainers[1].model.state_dict(), trainers[0].model.state_dict(), rtol=0, atol=0)
    torch.testing.assert_close(trainers[1].optimizer.state_dict(), trainers[0].optimizer.state_dict(), rtol=0, atol=0)
    graphed, evaluation = trainers[1].train_step, trainers[1].eval_step
    assert isinstance(graphed, GraphedStep) and graphed.images.shape == (48, 3, 32, 32)
    # warmed up, captured at epoch 1's 4th batch and again for epoch 2's learning rate (rows: the graphs run's)
    assert graphed.warmup_left == 0 and graphed.captures == 2 and graphed.captured_key == [rows[1]["lr"]]
    assert evaluation.warmup_left == 0 and evaluation.captures == 1  # 2 x 2 batches of 48, then the test's 4
    assert [w["step_end"] for w in trainers[1].recorder.windows] == [4, 8, 15, 19]  # 11 steps an epoch


def test_graphed_step_warms_up_then_captures_once_per_key():
    """GraphedStep's decisions (without capture: "replay" calls the step on the static buffers): WARMUP_STEPS
    warm-up calls, a capture at the next full batch, replays while the key stays, a capture again when it
    changes; a smaller batch runs on itself. Every call computes on its own batch."""
    seen: list[tuple[int, float]] = []

    def step(images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        seen.append((images.data_ptr(), float(images.sum())))
        return images.sum() + targets.sum()

    lr = [0.1]
    graphed = GraphedStep(step, batch_size=2, capture=False, key=lambda: list(lr))
    captures = []
    for value in range(1, 9):
        if value == 7:
            lr[0] = 0.05  # the scheduler's next epoch
        images = torch.full((2, 3), float(value))
        assert float(graphed(images, torch.ones(2))) == 6 * value + 2
        captures.append(graphed.captures)
    assert captures == [0] * WARMUP_STEPS + [1, 1, 1, 2, 2] and graphed.captured_key == [0.05]
    assert {ptr for ptr, _ in seen} == {graphed.images.data_ptr()}  # always the static buffers
    assert [total for _, total in seen] == [6.0 * value for value in range(1, 9)]
    last = torch.full((1, 3), 9.0)
    assert float(graphed(last, torch.ones(1))) == 28 and seen[-1][0] == last.data_ptr() and graphed.captures == 2


def test_optimizer_state_loads_with_its_own_capturable_setting():
    """A checkpoint of an eager run resumes under --cuda-graphs and back: the optimiser keeps its own
    `capturable` (a run resumed with a CUDA graph needs the step counts on the device)."""
    cfg = TrainConfig(model="vgg08", filters=4)
    model = make_model(cfg)
    eager = make_optimizer(cfg, model)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    eager.step()
    capturable = make_optimizer(cfg, model, capturable=True)
    load_optimizer_state(capturable, eager.state_dict())
    assert capturable.param_groups[0]["capturable"] and not eager.param_groups[0]["capturable"]
    step = capturable.state[next(model.parameters())]["step"]
    assert step.dtype == torch.float32 and int(step) == 1
    load_optimizer_state(eager, capturable.state_dict())
    assert not eager.param_groups[0]["capturable"]
