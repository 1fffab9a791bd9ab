"""The shared train loop: it learns, checkpoints, and resumes exactly."""
from __future__ import annotations

import numpy as np
import pytest

from cytocore import runtime
from cytocore.trainloop import LoopConfig, OptimConfig, TrainTask, lr_at, lr_table, train


def _task(seed: int = 0) -> TrainTask:
    ms = runtime.setup(seed=seed)
    import mindspore.nn as nn

    net = nn.SequentialCell(nn.Dense(4, 8), nn.ReLU(), nn.Dense(8, 1))
    loss = nn.MSELoss()
    w = np.array([[1.0], [-2.0], [0.5], [3.0]], np.float32)
    xs_val = np.random.default_rng(99).normal(size=(64, 4)).astype(np.float32)

    def batches(epoch, rng):
        for _ in range(5):
            x = rng.normal(size=(16, 4)).astype(np.float32)
            yield x, x @ w

    def validate(network):
        pred = network(ms.Tensor(xs_val)).asnumpy()
        return {"val_loss": float(np.mean((pred - xs_val @ w) ** 2))}

    return TrainTask(net, loss, batches, validate, meta={"arch": "mlp"})


def _cfg(epochs: int) -> LoopConfig:
    return LoopConfig(epochs=epochs, steps_per_epoch=5, seed=3, monitor="val_loss", monitor_mode="min",
                      progress=False, optimizer=OptimConfig(lr=1e-2))


def _weights(net) -> list[np.ndarray]:
    return [p.asnumpy().copy() for p in net.get_parameters()]


def test_lr_table_is_cosine_from_lr_to_floor():
    lr = lr_table(LoopConfig(epochs=2, steps_per_epoch=10, optimizer=OptimConfig(lr=1.0, min_lr_ratio=0.0)))
    assert lr.shape == (20,)
    assert lr[0] == pytest.approx(1.0)
    assert np.all(np.diff(lr) <= 0)
    assert lr[-1] < 0.05


def test_warm_up_counts_steps_even_when_the_time_budget_runs_ahead():
    cfg = LoopConfig(epochs=8, steps_per_epoch=25, optimizer=OptimConfig(lr=1.0, warmup_epochs=0.5))
    # step 2 of a budgeted run whose first step (graph compile) took 3 % of the budget
    assert lr_at(np.array(0.03), cfg, np.array(1.0)) == pytest.approx(2 / 12.5, rel=1e-2)
    assert lr_at(np.array(0.03), cfg) > 0.5  # counted as progress, the warm-up would be nearly over
    assert lr_at(np.array(0.5), cfg, np.array(100.0)) == pytest.approx(lr_at(np.array(0.5), cfg))


def test_training_lowers_validation_loss_and_writes_outputs(tmp_path):
    task = _task()
    before = task.validate(task.network)["val_loss"]
    result = train(task, _cfg(4), tmp_path, config_snapshot={"model": {"arch": "mlp"}})
    assert result.history[-1]["val_loss"] < before
    for name in ("best.ckpt", "last.ckpt", "log.csv", "state.json", "config.yaml"):
        assert (tmp_path / name).is_file(), name
    _, meta = runtime.load_checkpoint(tmp_path / "best.ckpt")
    assert meta["arch"] == "mlp"
    assert len((tmp_path / "log.csv").read_text().strip().splitlines()) == 5


def test_resume_reproduces_uninterrupted_run(tmp_path):
    full = _task()
    train(full, _cfg(4), tmp_path / "full")
    expected = _weights(full.network)

    first = _task()
    batches = first.batches

    def killed_in_epoch_3(epoch, rng):
        if epoch == 2:
            raise KeyboardInterrupt  # the process dies; only the files of epochs 1-2 survive
        return batches(epoch, rng)

    first.batches = killed_in_epoch_3
    with pytest.raises(KeyboardInterrupt):
        train(first, _cfg(4), tmp_path / "cut")
    # A new process: fresh network and optimiser, state comes only from disk.
    second = _task(seed=123)
    result = train(second, _cfg(4), tmp_path / "cut", resume=True)
    assert [r["epoch"] for r in result.history] == [1, 2, 3, 4]
    for a, b in zip(expected, _weights(second.network)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_refuses_to_overwrite_a_run_without_resume(tmp_path):
    from cytocore.errors import CheckpointError

    train(_task(), _cfg(1), tmp_path)
    with pytest.raises(CheckpointError, match="--resume"):
        train(_task(), _cfg(1), tmp_path)


def test_time_budget_stops_early_with_the_schedule_run_down(tmp_path):
    task = _task()
    cfg = _cfg(1000)
    cfg.time_budget_minutes = 0.04  # 2.4 s: far fewer than 1000 epochs
    result = train(task, cfg, tmp_path)
    assert 1 <= len(result.history) < 1000
    lr_floor = cfg.optimizer.lr * cfg.optimizer.min_lr_ratio
    # The cosine followed the budget: the last step ran near the floor, not near the start value.
    assert result.history[-1]["lr"] < lr_floor + 0.2 * (cfg.optimizer.lr - lr_floor)


def test_background_prefetch_trains_the_same_weights(tmp_path):
    from dataclasses import replace

    plain = _task()
    train(plain, _cfg(2), tmp_path / "plain")
    ahead = _task()
    train(ahead, replace(_cfg(2), prefetch=2), tmp_path / "ahead")
    for a, b in zip(_weights(plain.network), _weights(ahead.network)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_validation_starts_at_validate_from_and_best_comes_from_validated_epochs(tmp_path):
    from dataclasses import replace

    task = _task()
    calls = []
    validate = task.validate
    task.validate = lambda net: calls.append(1) or validate(net)
    result = train(task, replace(_cfg(4), validate_from=0.6), tmp_path)
    assert len(calls) == 2  # epochs 3 (progress 0.75) and 4, not 1 (0.25) or 2 (0.5)
    assert ["val_loss" in r for r in result.history] == [False, False, True, True]
    _, meta = runtime.load_checkpoint(tmp_path / "best.ckpt")
    assert meta["epoch"] in (3, 4)
    # resuming a half-validated run goes on from its log
    assert len((tmp_path / "log.csv").read_text().strip().splitlines()) == 5


def test_the_last_epoch_is_validated_even_when_the_budget_ends_the_run_early(tmp_path):
    from dataclasses import replace

    task = _task()
    result = train(task, replace(_cfg(1000), time_budget_minutes=0.03, validate_from=1.0), tmp_path)
    assert 1 <= len(result.history) < 1000
    assert "val_loss" in result.history[-1]
    assert all("val_loss" not in r for r in result.history[:-1])
    assert (tmp_path / "best.ckpt").is_file()


def test_validate_from_must_be_a_share_of_training():
    with pytest.raises(ValueError, match="validate_from"):
        LoopConfig.from_dict({"validate_from": 1.5})


def test_onednn_isa_cap_on_any_cpu_with_avx512(tmp_path):
    """The AVX2 cap is for CPUs whose oneDNN AVX-512 kernels are pathologically slow: AMD and Intel alike."""
    from cytocore.runtime import onednn_isa_cap

    def cpuinfo(vendor: str, flags: str) -> str:
        path = tmp_path / f"{vendor}.txt"
        block = f"processor\t: 0\nvendor_id\t: {vendor}\nflags\t\t: fpu sse2 avx2 {flags}\n"
        path.write_text(block + "\n" + block.replace(": 0", ": 1"))
        return str(path)

    assert onednn_isa_cap(cpuinfo("AuthenticAMD", "avx512f avx512bw")) == "AVX2"
    assert onednn_isa_cap(cpuinfo("AuthenticAMD", "fma")) is None
    assert onednn_isa_cap(cpuinfo("GenuineIntel", "avx512f avx512bw")) == "AVX2"
    assert onednn_isa_cap(cpuinfo("GenuineIntel", "avx512_fp16 avx512f")) == "AVX2"
    assert onednn_isa_cap(cpuinfo("GenuineIntel", "avx512_vnni")) is None  # not the base flag
    assert onednn_isa_cap(cpuinfo("GenuineIntel", "fma")) is None
    assert onednn_isa_cap(tmp_path / "missing") is None


def _ema_cfg(epochs: int) -> LoopConfig:
    from dataclasses import replace

    return replace(_cfg(epochs), ema=0.9)


def test_weight_average_follows_the_steps_with_a_warm_started_decay():
    from cytocore.weight_average import WeightAverage

    ms = runtime.setup(seed=0)
    import mindspore.nn as nn

    net = nn.Dense(2, 1)
    average = WeightAverage(net, decay=0.9)
    start = [p.asnumpy().copy() for p in net.trainable_params()]
    expected = [s.copy() for s in start]
    for t, value in enumerate([1.0, 2.0, 4.0]):
        for p in net.trainable_params():
            p.set_data(ms.Tensor(np.full(p.shape, value, np.float32)))
        average.update()
        d = min(0.9, (1 + t) / (10 + t))  # 0.1, 0.18, 0.25: the first steps' weights fade out quickly
        expected = [d * e + (1 - d) * value for e in expected]
    with average.applied() as raw:
        for p, e in zip(net.trainable_params(), expected):
            np.testing.assert_allclose(p.asnumpy(), e, rtol=1e-6)
        assert all(np.all(r == 4.0) for r in raw)
    assert all(np.all(p.asnumpy() == 4.0) for p in net.trainable_params())  # raw weights back after the block


def test_weight_average_is_validated_saved_and_resumed_exactly(tmp_path):
    full = _task()
    seen: list[list[np.ndarray]] = []
    validate = full.validate

    def remember(network):
        seen.append(_weights(network))
        return validate(network)

    full.validate = remember
    result = train(full, _ema_cfg(4), tmp_path / "full")
    expected = _weights(full.network)
    # the network ends with the average, which is what was validated last and what last.ckpt holds
    for a, b in zip(expected, seen[-1]):
        np.testing.assert_array_equal(a, b)
    params, _ = runtime.load_checkpoint(result.last_checkpoint)
    for p in full.network.get_parameters():
        np.testing.assert_allclose(params[p.name].asnumpy(), p.asnumpy(), rtol=1e-6)
        assert f"ema_raw.{p.name}" in params
    plain = _task()
    train(plain, _cfg(4), tmp_path / "plain")
    assert any(not np.allclose(a, b) for a, b in zip(expected, _weights(plain.network)))

    first = _task()
    batches = first.batches

    def killed_in_epoch_3(epoch, rng):
        if epoch == 2:
            raise KeyboardInterrupt
        return batches(epoch, rng)

    first.batches = killed_in_epoch_3
    with pytest.raises(KeyboardInterrupt):
        train(first, _ema_cfg(4), tmp_path / "cut")
    second = _task(seed=123)
    train(second, _ema_cfg(4), tmp_path / "cut", resume=True)
    for a, b in zip(expected, _weights(second.network)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_ema_must_be_a_decay_below_one():
    with pytest.raises(ValueError, match="train.ema"):
        LoopConfig.from_dict({"ema": 1.5})


def test_an_incomplete_weight_average_in_last_ckpt_is_a_clear_error_naming_the_file(tmp_path):
    from cytocore.errors import CheckpointError
    from cytocore.weight_average import RAW_PREFIX, restore_raw

    task = _task()
    first = next(iter(task.network.trainable_params()))
    saved = {RAW_PREFIX + first.name: first.asnumpy()}  # the other layers' raw weights are gone
    with pytest.raises(CheckpointError, match=r"last\.ckpt.*incomplete"):
        restore_raw(task.network, saved, tmp_path / "last.ckpt")
    assert restore_raw(task.network, {}, tmp_path / "last.ckpt") is None  # a run without ema resumes as before
