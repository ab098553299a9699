"""Collectives on the right device, every rank's random generators saved and given back."""

from __future__ import annotations

import logging
import random

import numpy as np
import pytest
import torch

from hpa_scc.config import load_config
from hpa_scc.engine import distributed
from hpa_scc.engine.distributed import DistInfo, collective_device, gather_objects, mean_across_ranks
from hpa_scc.engine.train import Run, restore_rng
from hpa_scc.utils.checkpoint import rng_state


def test_collectives_use_the_device_tensor_under_nccl(monkeypatch):
    cuda1 = torch.device("cuda", 1)  # a device object needs no GPU
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "get_backend", lambda: "nccl")
    assert collective_device(cuda1) == cuda1
    monkeypatch.setattr(distributed.dist, "get_backend", lambda: "gloo")
    assert collective_device(cuda1) == torch.device("cpu")  # gloo reduces CPU tensors
    seen = []

    def all_reduce(tensor):
        seen.append(tensor.device)
        tensor.mul_(2)  # as two equal ranks would sum

    monkeypatch.setattr(distributed.dist, "all_reduce", all_reduce)
    means = mean_across_ranks({"loss": 1.5, "loss_mask": 0.25}, DistInfo(0, 2, 0), cuda1)
    assert means == {"loss": 1.5, "loss_mask": 0.25} and seen == [torch.device("cpu")]


def test_gather_objects_in_one_process_is_the_object():
    assert gather_objects({"a": 1}, DistInfo()) == [{"a": 1}]


def _run(rank: int, world: int) -> Run:
    return Run(load_config(None), torch.device("cpu"), DistInfo(rank, world, rank), None, None, None)


def _draw() -> tuple:
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_each_rank_takes_back_its_own_generators():
    states = []
    for rank in range(2):
        torch.manual_seed(rank), np.random.seed(rank), random.seed(rank)
        states.append(rng_state())
    expected = _draw()  # what rank 1 (seeded 1) draws next
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    restore_rng({"rng": states, "global_step": 5}, _run(1, 2))
    assert _draw() == expected
    restore_rng({"rng": states, "global_step": 5}, _run(0, 2))
    assert _draw() != expected


def test_another_number_of_ranks_reseeds_and_says_so(caplog):
    states = [rng_state()]  # written by one rank
    with caplog.at_level(logging.WARNING, logger="hpa_scc"):
        restore_rng({"rng": states, "global_step": 5}, _run(0, 2))
    first = _draw()
    restore_rng({"rng": states, "global_step": 5}, _run(1, 2))
    assert _draw() != first  # ranks still differ
    restore_rng({"rng": states, "global_step": 5}, _run(0, 2))
    assert _draw() == first  # and the re-seeding is deterministic
    assert "written by 1 rank(s), this run has 2" in caplog.text


def test_an_older_checkpoint_holds_one_dict():
    torch.manual_seed(3)
    state = rng_state()
    expected = float(torch.rand(1))
    restore_rng({"rng": state, "global_step": 1}, _run(0, 1))
    assert float(torch.rand(1)) == expected


@pytest.mark.parametrize("minutes", [1, 60])
def test_the_group_timeout_comes_from_the_config(monkeypatch, minutes):
    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # set here so that they are put back after the test
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend, **kw: seen.update(backend=backend, **kw))
    info = distributed.init_distributed(torch.device("cpu"), timeout_min=minutes)
    assert info == DistInfo(1, 2, 0, 2) and seen["backend"] == "gloo" and seen["timeout"].total_seconds() == 60 * minutes


def test_both_engines_read_the_launcher_through_one_function_and_honour_the_timeout(monkeypatch):
    """Issue 28: detectron2's group used to read the environment itself and hard-code 60 minutes."""
    pytest.importorskip("detectron2", reason="detectron2 is not installed; install with: bash scripts/setup.sh "
                                             "--detectron2")
    from detectron2.utils import comm

    from hpa_scc.engine import d2train

    seen = {}
    for name, value in (("WORLD_SIZE", "4"), ("RANK", "3"), ("LOCAL_RANK", "1"), ("LOCAL_WORLD_SIZE", "2"),
                        ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend, **kw: seen.update(backend=backend, **kw))
    monkeypatch.setattr(comm, "create_local_process_group", lambda n: seen.update(per_machine=n))
    assert distributed.launcher_env() == DistInfo(3, 4, 1, 2)
    assert d2train._torchrun_group("cpu", 7) is True
    assert seen["timeout"].total_seconds() == 7 * 60 and seen["rank"] == 3 and seen["per_machine"] == 2
