"""The training step's bookkeeping: losses read back only every ``sync_every`` steps, still checked."""

from __future__ import annotations

import pytest
import torch

from hpa_scc.engine.loop import NonFiniteLossError, to_device, train_one_epoch, use_fast_path


class Scripted(torch.nn.Module):
    """Returns the scripted losses step by step (times a parameter, so backward works)."""

    def __init__(self, losses: list[dict[str, float]]):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        self.losses, self.calls = losses, 0

    def forward(self, images, targets=None):
        values = self.losses[self.calls]
        self.calls += 1
        return {k: self.w * v for k, v in values.items()}


def run(losses, *, sync_every=1, accumulate_steps=1, stop_at=None):
    model = Scripted(losses)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 1.0)
    seen = []

    def on_step(step, values):
        seen.append((step, values))
        return step == stop_at

    batches = [([torch.zeros(1, 2, 2)], [{}]) for _ in losses]
    means = train_one_epoch(model, optimizer, scheduler, batches, torch.device("cpu"), amp=False,
                            accumulate_steps=accumulate_steps, sync_every=sync_every, on_step=on_step)
    return means, seen, model.calls


def test_losses_are_read_every_sync_every_steps_and_averaged_over_the_window():
    losses = [{"a": float(i), "b": 1.0} for i in range(1, 7)]
    means, seen, _ = run(losses, sync_every=3)
    assert [s for s, _ in seen] == [1, 2, 3, 4, 5, 6]
    assert [v is None for _, v in seen] == [True, True, False, True, True, False]
    assert seen[2][1] == {"a": 2.0, "b": 1.0, "loss": 3.0}  # mean of steps 1..3
    assert seen[5][1] == {"a": 5.0, "b": 1.0, "loss": 6.0}  # mean of steps 4..6
    assert means == {"a": 3.5, "b": 1.0}


def test_every_step_is_read_when_sync_every_is_one_and_accumulation_counts_optimizer_steps():
    losses = [{"a": float(i)} for i in range(4)]
    means, seen, _ = run(losses, accumulate_steps=2)
    assert [s for s, _ in seen] == [1, 2]
    assert seen[0][1] == {"a": 0.5, "loss": 0.5} and seen[1][1] == {"a": 2.5, "loss": 2.5}
    assert means == {"a": 1.5}


def test_a_nan_between_reads_is_caught_at_the_next_read():
    losses = [{"a": 1.0}, {"a": float("nan")}, {"a": 1.0}, {"a": 1.0}, {"a": 1.0}]
    with pytest.raises(NonFiniteLossError, match=r"by step 4 .*'a': nan"):
        run(losses, sync_every=4)


def test_a_stop_between_reads_checks_the_losses_first():
    # A signal at step 2 would save last.pt: the NaN of step 1 must raise before that.
    losses = [{"a": float("nan")}, {"a": 1.0}, {"a": 1.0}, {"a": 1.0}]
    with pytest.raises(NonFiniteLossError):
        run(losses, sync_every=10, stop_at=2)
    means, seen, calls = run([{"a": 1.0}] * 4, sync_every=10, stop_at=2)
    assert calls == 2 and means == {"a": 1.0} and seen[-1] == (2, None)


def test_a_nan_in_the_last_partial_window_is_caught_at_the_end_of_the_epoch():
    with pytest.raises(NonFiniteLossError):
        run([{"a": 1.0}, {"a": 1.0}, {"a": float("inf")}], sync_every=2)


def test_uint8_images_are_scaled_on_the_device_and_float_images_kept():
    u8 = torch.tensor([[[0, 255], [51, 102]]], dtype=torch.uint8)
    f32 = torch.full((1, 2, 2), 0.25)
    (a, b), [t] = to_device([u8, f32], [{"masks": torch.ones(1, 2, 2, dtype=torch.uint8), "image_id": 3}], "cpu")
    assert a.dtype == torch.float32 and torch.allclose(a, torch.tensor([[[0.0, 1.0], [0.2, 0.4]]]))
    assert torch.equal(b, f32) and t["image_id"] == 3 and t["masks"].dtype == torch.uint8


def test_fast_path_leaves_a_cpu_model_and_the_backends_alone():
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3))
    before = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32)
    out = use_fast_path(model, torch.device("cpu"), channels_last=True, tf32=False, compile=True)
    assert out is model and model[0].weight.is_contiguous()
    assert (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32) == before
