"""The Polyak average of the weights (`train.ema_decay`), the learning-rate schedule
(`train.lr_schedule`), bf16 autocast (`train.amp`) and a prior's own number of steps
(`priors.N.steps`): what a training publishes, what a resumed training publishes, and what
the settings do to the artifacts' keys."""
import math
import re

import pytest
import torch

import vqvae2
from ddp_jobs import BATCHES_PER_EPOCH, GLOBAL_BATCH, global_batch, tiny_autoencoder
from storage.checkpoints import checkpoint_url, load_checkpoint
from tasks.config import TrainingRuntime, pipeline_config, validate_config
from tasks.machinery.artifacts import Artifact
from tasks.machinery.faults import InjectedFault
from tasks.machinery.trainer import Trainer, TrainingJob
from tasks.stages import stage_keys


class Quiet:
    def log(self, message: str) -> None: ...
    def progress(self, done: int, total: int, note: str) -> None: ...
    def table(self, key: str, rows: list, description: str) -> None: ...


def _batches(epoch: int, start: int):
    for index in range(start, BATCHES_PER_EPOCH):
        yield global_batch(epoch, index)


def _train(root, steps: int = 9, ema_decay: float = 0.9, amp: str = "auto", reporter=None,
           **options) -> tuple[Trainer, dict]:
    """A tiny autoencoder trained in this process: (the trainer, the published model.pt's weights)."""
    vqvae2.seed_everything(0)
    run = TrainingRuntime(device="cpu", subprocess=False, **{"checkpoint_every": 3, **options})
    train = vqvae2.TrainConfig(steps=steps, batch_size=GLOBAL_BATCH, lr=3e-3, warmup_steps=2, ema_decay=ema_decay,
                               lr_schedule="cosine", amp=amp)
    job = TrainingJob(name="tiny", model=tiny_autoencoder(), loss_fn=vqvae2.autoencoder_loss, train=train,
                      batches=_batches, batches_per_epoch=BATCHES_PER_EPOCH, artifact=Artifact(str(root), "tiny", "k"),
                      options=run)
    trainer = Trainer(job, reporter or Quiet())
    summary = trainer.run()
    return trainer, load_checkpoint(summary.model)["state_dict"]


def test_the_cosine_schedule_warms_up_then_falls_to_zero_at_the_last_step():
    config = vqvae2.TrainConfig(steps=110, warmup_steps=10, lr_schedule="cosine")
    factors = [vqvae2.lr_factor(config, step) for step in range(config.steps)]
    assert factors[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert factors[10] == 1.0 and factors[60] == pytest.approx(0.5)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert factors[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 99 / 100)))
    constant = vqvae2.TrainConfig(steps=110, warmup_steps=10)
    assert [vqvae2.lr_factor(constant, s) for s in range(110)] == [min(1.0, (s + 1) / 10) for s in range(110)]


def test_the_average_follows_the_weights_with_a_decay_that_ramps_up():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    average = vqvae2.polyak_average(model, 0.5)
    expected = None
    for n in range(6):
        with torch.no_grad():
            model.weight.add_(torch.randn_like(model.weight))
        average.update_parameters(model)
        if expected is None:
            expected = model.weight.detach().clone()  # the first update copies
        else:
            kept = min(0.5, (1 + n) / (10 + n))
            expected = kept * expected + (1 - kept) * model.weight.detach()
    torch.testing.assert_close(average.module.weight, expected)
    assert vqvae2.polyak_average(model, 0.0) is None
    assert vqvae2.averaged_model(None, model) is model


def test_the_published_autoencoder_is_the_average_with_the_trainings_codebooks(tmp_path):
    trainer, published = _train(tmp_path)
    last = load_checkpoint(checkpoint_url(str(tmp_path / "tiny/k/checkpoints"), 9))
    averaged = {name.removeprefix("module."): t for name, t in last["average"].items() if name.startswith("module.")}
    moved = 0
    for name, weight in published.items():
        if name in dict(trainer.model.named_buffers()):  # codebooks and their counters: the training's own
            assert torch.equal(weight, last["model"][name]), name
        else:
            assert torch.equal(weight, averaged[name]), name
            moved += not torch.equal(weight, last["model"][name])
    assert moved > 0  # the average is not the last weights
    assert int(last["average"]["n_averaged"]) == 9


@pytest.mark.parametrize("amp", ["off", "bf16"])  # bf16 autocast: what fashion-mnist trains in on a CPU
def test_a_resumed_training_publishes_the_average_an_uninterrupted_one_does(tmp_path, amp):
    _, uninterrupted = _train(tmp_path / "clean", amp=amp)
    with pytest.raises(InjectedFault):
        _train(tmp_path / "killed", amp=amp, fail_once_at_step={"tiny": 8})
    _, resumed = _train(tmp_path / "killed", amp=amp)  # the retry: from the checkpoint of step 6
    assert uninterrupted.keys() == resumed.keys()
    for name in uninterrupted:
        assert torch.equal(uninterrupted[name], resumed[name]), name


def test_bf16_autocast_trains_other_weights_than_fp32_and_a_cpu_without_bf16_arithmetic_is_warned_of(
        tmp_path, monkeypatch):
    _, fp32 = _train(tmp_path / "fp32", steps=3, amp="off")
    _, bf16 = _train(tmp_path / "bf16", steps=3, amp="bf16")
    assert any(not torch.equal(fp32[name], bf16[name]) for name in fp32)  # autocast is on: not a no-op
    for name in fp32:
        torch.testing.assert_close(bf16[name], fp32[name], atol=0.05, rtol=0.05)

    class Said(Quiet):
        def __init__(self) -> None:
            self.lines: list[str] = []

        def log(self, message: str) -> None:
            self.lines.append(message)

    monkeypatch.setattr(vqvae2, "bf16_is_native", lambda device: False)  # this machine's CPU may well have AMX
    emulated, fp32_again = Said(), Said()
    _train(tmp_path / "emulated", steps=3, amp="bf16", reporter=emulated)
    _train(tmp_path / "fp32-again", steps=3, amp="off", reporter=fp32_again)
    assert [line for line in emulated.lines if "warning" in line] == [
        "tiny: warning: train_tiny.amp is bf16, but this CPU has no bf16 arithmetic (on a CPU: AVX512-BF16 or AMX), "
        "so it is emulated and slower than fp32; --set train_tiny.amp=off trains in fp32"]
    assert not [line for line in fp32_again.lines if "warning" in line]


@pytest.mark.parametrize("field, bad, said", [
    ("ema_decay", 1.0, "train_prior.ema_decay must be in [0, 1) (0: no average), got 1.0"),
    ("ema_decay", -0.1, "train_prior.ema_decay must be in [0, 1) (0: no average), got -0.1"),
    ("lr_schedule", "linear", "train_prior.lr_schedule must be one of 'constant', 'cosine', got 'linear'"),
])
def test_bad_settings_are_refused_naming_the_field(field, bad, said):
    with pytest.raises(ValueError, match=re.escape(f"invalid configuration: {said}")):
        validate_config({"preset": "smoke", "overrides": {f"train_prior.{field}": bad}})


def test_the_new_settings_change_only_the_keys_of_their_trainings_and_what_follows():
    # At their defaults they change no key: test_stage_keys pins every preset's keys.
    base = pipeline_config("smoke", storage={"root": "/tmp/vqvae2-keys"})
    for field, value in [("ema_decay", 0.999), ("lr_schedule", "cosine")]:
        changed = pipeline_config("smoke", storage={"root": "/tmp/vqvae2-keys"}, overrides={f"train_prior.{field}": value})
        before, after = stage_keys(base, "digest"), stage_keys(changed, "digest")
        assert {stage for stage in before if before[stage] != after[stage]} == {"train-priors[0]", "train-priors[1]", "sample", "evaluate"}


@pytest.mark.parametrize("field, value", [("steps", 80), ("batch_size", 16), ("lr", 4e-3)])
def test_a_prior_with_its_own_training_trains_so_and_the_other_levels_keep_theirs(field, value):
    config = pipeline_config("smoke", storage={"root": "/tmp/vqvae2-keys"}, overrides={f"priors.0.{field}": value})
    assert getattr(config.model.prior_training(0), field) == value
    assert config.model.prior_training(1) == config.model.train_prior
    assert config.model.prior_training(0).ema_decay == config.model.train_prior.ema_decay  # the rest: train_prior's
    base = pipeline_config("smoke", storage={"root": "/tmp/vqvae2-keys"})
    before, after = stage_keys(base, "digest"), stage_keys(config, "digest")
    assert {stage for stage in before if before[stage] != after[stage]} == {"train-priors[0]", "sample", "evaluate"}


@pytest.mark.parametrize("overrides, said", [
    ({"priors.1.steps": 0}, "priors.1.steps must be >= 1"),
    ({"priors.1.batch_size": 0}, "priors.1.batch_size must be >= 1, or unset (null): train_prior.batch_size"),
    ({"priors.0.lr": 0}, "priors.0.lr must be > 0"),
    ({"priors.1.batch_size": 8, "train_prior.micro_batch_size": 16},
     "priors.1.batch_size (8) must be at least train_prior.micro_batch_size (16)"),
])
def test_a_bad_training_of_one_level_is_refused_naming_the_level(overrides, said):
    with pytest.raises(ValueError, match=re.escape(f"invalid configuration: {said}")):
        validate_config({"preset": "smoke", "overrides": overrides})
