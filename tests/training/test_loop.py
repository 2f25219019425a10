"""The training loop: learning on a small synthetic problem, resume-to-the-same-state, exported weights, and
the learning-rate schedule."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from alignfuse.models.albef.config import AlbefConfig
from alignfuse.training import Trainer, TrainOptions, cosine_lambda, diagnose
from tests.training.toy import make_arch, toy_data


def test_losses_fall_and_itm_learns_binding(vocab: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    data, val = toy_data(64, 1), toy_data(48, 2)
    opts = TrainOptions(epochs=60, batch_size=16, lr=3e-3, warmup_steps=10, seed=0, eval_rerank_k=4)
    arch = make_arch(vocab, opts, mlm=False)
    before = diagnose(arch, val, rerank_k=4)
    trainer = Trainer(arch, data, opts, tmp_path / "run")
    trainer.train()
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "itm" in r]
    first = np.mean([r["itm"] + r["itc"] for r in steps[:6]])
    last = np.mean([r["itm"] + r["itc"] for r in steps[-6:]])
    assert last < first - 0.3, (first, last)
    after = diagnose(arch, val, rerank_k=4)
    assert before.itm_acc_perturbed is not None and before.itm_pos_rate is not None
    # ITM rejects colour-swapped / wrong-colour captions of the *same* image better than chance, while it
    # still accepts the true captions (not a collapsed "always no match" head)
    assert after.itm_acc_perturbed is not None and after.itm_pos_rate is not None
    assert (after.itm_acc_perturbed + after.itm_pos_rate) / 2 > 0.65, after
    assert after.itm_acc_random is not None and after.itm_acc_random > 0.6, after


def test_resume_is_bitwise_identical(vocab: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    data = toy_data(48, 3)
    opts = TrainOptions(epochs=2, batch_size=8, lr=1e-3, warmup_steps=2, seed=4, save_every=5)

    full = Trainer(make_arch(vocab, opts), data, opts, tmp_path / "full")
    full.train(max_steps=9)
    # interrupted at step 5 (the checkpoint), resumed in a fresh trainer
    part = Trainer(make_arch(vocab, opts), data, opts, tmp_path / "part")
    part.train(max_steps=5)
    resumed = Trainer(make_arch(vocab, opts), data, opts, tmp_path / "part")
    torch.manual_seed(12345)  # the checkpoint restores RNG state; the prior state must not matter
    resumed.load_checkpoint(tmp_path / "part")
    assert resumed.state.step == 5
    resumed.train(max_steps=4)
    assert resumed.state.step == full.state.step == 9
    a, b = full.arch.model.state_dict(), resumed.arch.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    oa, ob = full.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(oa[i]["exp_avg"], ob[i]["exp_avg"]) for i in oa)
    assert full.scheduler.get_last_lr() == resumed.scheduler.get_last_lr()


def test_exported_weights_load_in_the_inference_model(vocab: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from alignfuse.models.albef.model import AlbefModel

    arch = make_arch(vocab, TrainOptions(batch_size=4))
    paths = arch.save_weights(tmp_path, "toy")
    sd = load_file(str(paths[0]))
    cfg = AlbefConfig.from_json(paths[1])
    model = AlbefModel(cfg)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and not [m for m in missing if not m.endswith("position_ids")]
    assert (tmp_path / "vocab.txt").read_text() == vocab.read_text()


def test_cosine_schedule_numbers() -> None:
    """Linear warm-up over 2 steps, then a cosine from 1 to min_lr / lr over the remaining 8 steps."""
    f = cosine_lambda(total_steps=10, warmup=2, base_lr=1e-3, min_lr=1e-5)
    assert [f(0), f(1), f(2)] == [0.5, 1.0, 1.0]
    assert f(6) == pytest.approx(0.01 + 0.99 * 0.5)  # halfway through the cosine
    assert f(10) == pytest.approx(0.01) and f(50) == pytest.approx(0.01)  # floor, also past the end
    assert f(4) == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 0.25)))


def test_time_schedule_follows_the_larger_of_step_and_time_share(vocab: Path, tmp_path: Path) -> None:
    opts = TrainOptions(
        batch_size=8, lr=1e-3, min_lr=1e-5, warmup_steps=2, max_minutes=1.0, time_schedule=True
    )
    trainer = Trainer(make_arch(vocab, opts), toy_data(16, 0), opts, tmp_path / "run")
    assert trainer.total_steps == 2
    trainer.state.step = 0
    trainer._time_lr(elapsed=0.0)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.5e-3)  # warm-up
    trainer.state.step, trainer.total_steps = 2, 8
    trainer._time_lr(elapsed=30.0)  # step share 2/8, time share 30/60 s: progress is the larger, 0.5
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * (0.01 + 0.99 * 0.5))
    trainer._time_lr(elapsed=90.0)  # past the budget: the floor
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-5)
