"""Gradient accumulation over micro-batches and activation checkpointing (vqvae2.train),
and the trainer's recovery from a divergence or a damaged checkpoint (tasks.machinery.trainer).

Accumulation must give the whole batch's step; checkpointing must give the same loss
and gradients, dropout included, while keeping fewer bytes for backward. A training that
diverges once goes on at a lower learning rate and says so; twice, it fails."""
import copy

import pytest
import torch

import vqvae2
from ddp_jobs import BATCHES_PER_EPOCH, GLOBAL_BATCH, global_batch, tiny_autoencoder
from storage.checkpoints import checkpoint_url, list_checkpoints, load_checkpoint
from tasks.config import TrainingRuntime
from tasks.machinery.artifacts import Artifact
from tasks.machinery.faults import InjectedFault
from tasks.machinery.trainer import DIVERGED_LR_FACTOR, Trainer, TrainingJob
from vqvae2.train import SavedTensorBytes, split_batch

# fp32 on a CPU: summing a batch's gradient in 3 pieces instead of 1 rounds differently,
# by a few float32 ulps of the largest terms; these bounds are ~100x what we see.
GRAD_TOL = dict(rtol=1e-4, atol=1e-6)


def _batch(kind: str, config: vqvae2.ModelConfig, n: int = 10):
    """(model, batch, loss_fn) of a tiny model; kind: top-prior, bottom-prior, autoencoder, classifier."""
    gen = torch.Generator().manual_seed(1)
    shapes, k = config.latent_shapes(), config.autoencoder.codebook_size
    labels = torch.randint(config.num_classes, (n,), generator=gen)
    images = torch.rand(n, config.image_channels, config.image_size, config.image_size, generator=gen)
    torch.manual_seed(0)
    if kind == "autoencoder":
        return vqvae2.build_autoencoder(config), images, vqvae2.autoencoder_loss
    if kind == "classifier":
        return vqvae2.build_classifier(config), (images, labels), vqvae2.classifier_loss
    level = {"top-prior": 0, "bottom-prior": 1}[kind]
    codes = torch.randint(k, (n, *shapes[level]), generator=gen)
    cond = [torch.randint(k, (n, *s), generator=gen) for s in shapes[:level]] or None
    return vqvae2.build_prior(config, level), (codes, cond, labels), vqvae2.prior_loss


def _train(model, batch, loss_fn, steps: int = 2, seed: int = 0, **options):
    """A copy of `model` after `steps` train_steps on `batch`; its grads are the last step's."""
    model = copy.deepcopy(model)
    # SGD, not Adam: parameters then follow the gradients' size. Adam's first steps are about
    # lr * sign(gradient), blind to a mis-scaled gradient, and they blow up rounding noise in
    # gradients that are zero in exact arithmetic (the attention's key bias).
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    torch.manual_seed(seed)
    options = {"grad_clip": 1.0, **options}
    metrics = [vqvae2.train_step(model, optimizer, batch, loss_fn, **options) for _ in range(steps)]
    return model, metrics[-1]


def _assert_same_training(a, b, tol=GRAD_TOL):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        if p.grad is None or q.grad is None:  # unused by the loss (the last layer's vertical output)
            assert p.grad is None and q.grad is None, f"gradient of {name}"
        else:
            assert torch.allclose(p.grad, q.grad, **tol), f"gradient of {name}"
        assert torch.allclose(p, q, **tol), name
    for (name, x), y in zip(a.named_buffers(), b.buffers()):
        assert torch.allclose(x.float(), y.float(), **tol), name


def _last_weight(model) -> torch.nn.Parameter:
    return [p for p in model.parameters() if p.grad is not None][-1]


# --- gradient accumulation -----------------------------------------------------------------


def test_split_batch_cuts_every_tensor_of_a_nested_batch():
    codes, cond, labels = torch.arange(10), [torch.arange(10) * 2], torch.arange(10) + 100
    parts = split_batch((codes, cond, None), 4)
    assert [len(p[0]) for p in parts] == [4, 4, 2]
    assert torch.equal(parts[2][1][0], torch.tensor([16, 18])) and parts[2][2] is None
    assert split_batch((codes, None, labels), None) == [(codes, None, labels)]
    assert len(split_batch(codes, 10)) == 1


@pytest.mark.parametrize("kind", ["top-prior", "bottom-prior", "autoencoder"])
def test_micro_batches_give_the_whole_batchs_step(kind):
    # Dropout off: with it, micro-batches draw other masks. k-means off: it sees only the
    # first micro-batch (test_quantize). The smoke autoencoder re-seeds dead codes after 10
    # steps, so none in these 2: restarts draw other random rows (test_quantize).
    config = vqvae2.preset("smoke", {"autoencoder.kmeans_init": False})
    model, batch, loss_fn = _batch(kind, config)
    whole, whole_metrics = _train(model, batch, loss_fn)
    accumulated, metrics = _train(model, batch, loss_fn, micro_batch_size=4)  # 4 + 4 + 2: unequal shares
    _assert_same_training(accumulated, whole)
    # The loss is a mean over the batch either way; other metrics too, except the counts of
    # distinct codes hit (usage), which count per micro-batch.
    for name, value in whole_metrics.items():
        if not name.startswith("usage"):
            assert torch.allclose(metrics[name], value, rtol=1e-5), name
    # ... and the gradients did depend on the data (else equality would prove nothing).
    other, _ = _train(model, split_batch(batch, 4)[0], loss_fn)
    assert not torch.allclose(_last_weight(other).grad, _last_weight(whole).grad, **GRAD_TOL)


def test_the_autoencoders_codebooks_move_once_per_step_with_micro_batches():
    config = vqvae2.preset("smoke", {"autoencoder.kmeans_init": False})
    model, images, loss_fn = _batch("autoencoder", config)
    whole, _ = _train(model, images, loss_fn, steps=1)
    accumulated, _ = _train(model, images, loss_fn, steps=1, micro_batch_size=2)
    for q_whole, q_accumulated in zip(whole.quantizers, accumulated.quantizers):
        assert torch.allclose(q_accumulated.embed, q_whole.embed, rtol=1e-5, atol=1e-6)
        assert torch.allclose(q_accumulated.cluster_size, q_whole.cluster_size, rtol=1e-5)
        assert torch.equal(q_accumulated.steps_unused, q_whole.steps_unused)  # one step, not five


def test_the_classifiers_batchnorm_normalises_each_micro_batch_by_itself():
    # BatchNorm (only the classifier has it) is the one layer where micro-batches are not the
    # whole batch, as under DDP without SyncBatchNorm: the step's gradient is the size-weighted
    # mean of the micro-batches' own gradients, and the running statistics move once per micro-batch.
    config = vqvae2.preset("smoke")
    model, (images, labels), loss_fn = _batch("classifier", config)
    accumulated, _ = _train(model, (images, labels), loss_fn, steps=1, micro_batch_size=4, grad_clip=0.0)
    expected = copy.deepcopy(model).train()
    for part_images, part_labels in zip(images.split(4), labels.split(4)):
        loss, _ = loss_fn(expected, (part_images, part_labels))
        (loss * len(part_labels) / len(labels)).backward()
    for (name, p), q in zip(accumulated.named_parameters(), expected.parameters()):
        assert torch.allclose(p.grad, q.grad, **GRAD_TOL), name
    for (name, x), y in zip(accumulated.named_buffers(), expected.buffers()):
        assert torch.allclose(x.float(), y.float(), **GRAD_TOL), name
    whole, _ = _train(model, (images, labels), loss_fn, steps=1)
    assert not torch.allclose(whole.fc.weight.grad, accumulated.fc.weight.grad, **GRAD_TOL)


def test_micro_batches_use_no_sync_for_all_but_the_last_backward():
    config = vqvae2.preset("smoke")
    model, batch, loss_fn = _batch("top-prior", config)
    calls = []

    class FakeDDP(torch.nn.Module):  # what train_step may rely on: a module with no_sync()
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args):
            return self.module(*args)

        def loss(self, *args):
            calls.append("local" if self.syncing_off else "synced")
            return self.module.loss(*args)

        syncing_off = False

        def no_sync(self):
            wrapper = self

            class Off:
                def __enter__(self):
                    wrapper.syncing_off = True

                def __exit__(self, *exc):
                    wrapper.syncing_off = False

            return Off()

    wrapped = FakeDDP(model)
    optimizer, _ = vqvae2.make_optimizer(wrapped, vqvae2.TrainConfig())
    vqvae2.train_step(wrapped, optimizer, batch, loss_fn, micro_batch_size=3)
    assert calls == ["local"] * 3 + ["synced"]  # 10 samples: micro-batches of 3, 3, 3 and 1


# --- activation checkpointing --------------------------------------------------------------


@pytest.mark.parametrize("kind", ["top-prior", "bottom-prior", "autoencoder"])
def test_checkpointing_gives_the_same_loss_and_gradients_dropout_included(kind):
    config = vqvae2.preset("smoke", {"priors.0.dropout": 0.3, "priors.1.dropout": 0.3})
    model, batch, loss_fn = _batch(kind, config)
    plain, plain_metrics = _train(model, batch, loss_fn, steps=1, seed=5)
    checkpointed = copy.deepcopy(model)
    assert vqvae2.enable_activation_checkpointing(checkpointed) > 0
    checkpointed, metrics = _train(checkpointed, batch, loss_fn, steps=1, seed=5)
    assert torch.equal(metrics["loss"], plain_metrics["loss"])
    _assert_same_training(checkpointed, plain, tol=dict(rtol=1e-6, atol=1e-7))
    if kind != "autoencoder":  # dropout is on: another seed draws other masks and other gradients
        reseeded, _ = _train(model, batch, loss_fn, steps=1, seed=6)
        assert not torch.allclose(_last_weight(reseeded).grad, _last_weight(plain).grad)


def _saved_bytes(model, batch, loss_fn) -> int:
    model.train()
    with SavedTensorBytes(model) as saved:
        loss, _ = loss_fn(model, batch)
    loss.backward()
    return saved.bytes


@pytest.mark.parametrize("kind, at_least", [("bottom-prior", 3.0), ("top-prior", 3.0), ("autoencoder", 3.0)])
def test_checkpointing_keeps_fewer_activations_for_backward(kind, at_least):
    # Wider and deeper than smoke, so that the layers, not the head, hold most activations.
    config = vqvae2.preset("smoke", {
        "priors.0.layers": 6, "priors.1.layers": 6, "priors.1.cond_res_blocks": 4,
        "autoencoder.res_blocks": 4, "autoencoder.res_channels": 32,
    })
    model, batch, loss_fn = _batch(kind, config, n=4)
    plain = _saved_bytes(model, batch, loss_fn)
    assert plain == _saved_bytes(model, batch, loss_fn)  # deterministic: a count of bytes, not a sample
    vqvae2.enable_activation_checkpointing(model)
    checkpointed = _saved_bytes(model, batch, loss_fn)
    assert plain / checkpointed >= at_least, f"{plain} -> {checkpointed} bytes"
    vqvae2.enable_activation_checkpointing(model, enabled=False)
    assert _saved_bytes(model, batch, loss_fn) == plain


def test_checkpointing_keeps_the_module_tree_and_leaves_eval_and_the_fast_sampler_alone():
    config = vqvae2.preset("smoke", {"priors.1.dropout": 0.3})
    prior, (codes, cond, labels), _ = _batch("bottom-prior", config, n=2)
    keys = list(prior.state_dict())
    # 2 gated layers and 1 residual block of the conditioning stack.
    assert vqvae2.enable_activation_checkpointing(prior) == 3
    assert list(prior.state_dict()) == keys and type(prior.layers[0]) is vqvae2.pixelcnn.GatedLayer
    # The autoencoder's 2 encoders, 1 decoder of the context above and the decoder (their
    # residual blocks inside them, not again); the classifier has none (BatchNorm).
    assert vqvae2.enable_activation_checkpointing(vqvae2.build_autoencoder(config)) == 4
    assert vqvae2.enable_activation_checkpointing(vqvae2.build_classifier(config)) == 0
    prior.eval()
    with SavedTensorBytes(prior) as saved:  # eval with gradients: runs as usual, keeps as much
        logits = prior(codes, cond, labels)
    vqvae2.enable_activation_checkpointing(prior, enabled=False)
    with SavedTensorBytes(prior) as unchanged:
        again = prior(codes, cond, labels)
    assert torch.equal(again, logits) and saved.bytes == unchanged.bytes > 0
    vqvae2.enable_activation_checkpointing(prior)
    with torch.no_grad():
        cached = vqvae2.incremental_logits(prior, codes, cond, labels)
    assert torch.allclose(cached, logits, atol=1e-5)


def test_fit_applies_micro_batches_and_checkpointing_from_the_train_config():
    config = vqvae2.preset("smoke")
    model, batch, loss_fn = _batch("bottom-prior", config)
    results = []
    for options in ({}, {"micro_batch_size": 3, "activation_checkpointing": True}):
        trained = copy.deepcopy(model)
        train = vqvae2.TrainConfig(steps=2, batch_size=10, lr=1e-3, **options)
        optimizer = torch.optim.SGD(trained.parameters(), lr=0.1, momentum=0.9)
        torch.manual_seed(0)
        assert vqvae2.fit(trained, optimizer, [batch] * 5, loss_fn, train) == 2
        results.append(trained)
    plain, configured = results
    _assert_same_training(configured, plain)
    assert "forward" in vars(configured.layers[0]) and "forward" not in vars(plain.layers[0])


# --- divergence and damaged checkpoints (tasks.machinery.trainer) ------------------------------

LR = 3e-3


class Recorder:
    """A Reporter that keeps the log lines."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def log(self, message: str) -> None:
        self.lines.append(message)

    def progress(self, done: int, total: int, note: str) -> None: ...
    def table(self, key: str, rows: list, description: str) -> None: ...


class NanAt:
    """The autoencoder's loss, made NaN at the given calls (counting from 1): a loss spike."""

    def __init__(self, *calls: int) -> None:
        self.calls, self.count = set(calls), 0

    def __call__(self, model, batch):
        self.count += 1
        loss, metrics = vqvae2.autoencoder_loss(model, batch)
        if self.count in self.calls:
            loss = loss * float("nan")
        return loss, {**metrics, "loss": loss}


def _whole_batches(epoch: int, start: int):
    for index in range(start, BATCHES_PER_EPOCH):
        yield global_batch(epoch, index)


def _run(root, steps: int = 8, loss_fn=vqvae2.autoencoder_loss, lr: float = LR, **options):
    """A tiny autoencoder trained in this process: (summary, trainer, log lines)."""
    vqvae2.seed_everything(0)
    run = TrainingRuntime(device="cpu", subprocess=False, **{"log_every": 1, "checkpoint_every": 3, **options})
    job = TrainingJob(name="tiny", model=tiny_autoencoder(), loss_fn=loss_fn, artifact=Artifact(str(root), "tiny", "k"),
                      train=vqvae2.TrainConfig(steps=steps, batch_size=GLOBAL_BATCH, lr=lr, warmup_steps=2),
                      batches=_whole_batches, batches_per_epoch=BATCHES_PER_EPOCH, options=run)
    reporter = Recorder()
    trainer = Trainer(job, reporter)
    return trainer.run(), trainer, reporter.lines


def _weights(summary) -> dict[str, torch.Tensor]:
    return load_checkpoint(summary.model)["state_dict"]


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_a_diverged_training_goes_on_from_its_last_checkpoint_at_half_the_learning_rate(tmp_path):
    summary, trainer, lines = _run(tmp_path, loss_fn=NanAt(5))
    assert summary.steps == 8
    assert summary.recoveries == [{"diverged_at": 5, "resumed_from": 3, "lr_factor": DIVERGED_LR_FACTOR}]
    said = [line for line in lines if "training diverged" in line]
    assert len(said) == 1
    assert "the loss is nan at step 5" in said[0] and "resuming from step 3 (checkpoint step-000000003.pt)" in said[0]
    assert f"{DIVERGED_LR_FACTOR:g} times the learning rate" in said[0]
    assert all(torch.isfinite(w).all() for w in _weights(summary).values())
    # The lower rate is the optimizer's and the scheduler's, and their checkpoints keep it.
    low = LR * DIVERGED_LR_FACTOR
    assert trainer.scheduler.base_lrs == [low] and trainer.optimizer.param_groups[0]["initial_lr"] == low
    assert trainer.optimizer.param_groups[0]["lr"] == low  # warm-up is over
    last = load_checkpoint(checkpoint_url(str(tmp_path / "tiny/k/checkpoints"), 8))
    assert last["scheduler"]["base_lrs"] == [low] and last["optimizer"]["param_groups"][0]["lr"] == low
    assert last["recoveries"] == summary.recoveries


def test_a_training_that_diverges_before_its_first_checkpoint_starts_again_at_half_the_rate(tmp_path):
    summary, _, lines = _run(tmp_path / "diverged", loss_fn=NanAt(2))
    assert summary.recoveries == [{"diverged_at": 2, "resumed_from": 0, "lr_factor": DIVERGED_LR_FACTOR}]
    assert any("resuming from step 0 (the start)" in line for line in lines)
    # The same weights, data and random numbers as a run at half the rate from the start.
    halved, _, _ = _run(tmp_path / "halved", lr=LR * DIVERGED_LR_FACTOR)
    _assert_same_weights(_weights(summary), _weights(halved))


def test_a_checkpoint_never_holds_non_finite_weights(tmp_path):
    # The loss is looked at every 4th step only: the NaN of step 2 is caught by the save at step 3.
    summary, _, lines = _run(tmp_path, loss_fn=NanAt(2), log_every=4)
    assert summary.recoveries == [{"diverged_at": 3, "resumed_from": 0, "lr_factor": DIVERGED_LR_FACTOR}]
    assert any("is not finite at step 3: training diverged; resuming from step 0" in line for line in lines)
    for _, url in list_checkpoints(str(tmp_path / "tiny/k/checkpoints")):
        assert all(torch.isfinite(w).all() for w in load_checkpoint(url)["model"].values() if w.is_floating_point())


def test_a_second_divergence_fails_the_training(tmp_path):
    # Calls 6 and 7 are steps 4 and 5 again (from the checkpoint of step 3): call 8 is step 6.
    with pytest.raises(FloatingPointError, match=r"tiny: the loss is nan at step 6.*diverged once at step 5 and gone on "
                                                 r"from step 3"):
        _run(tmp_path / "same-attempt", loss_fn=NanAt(5, 8))
    # The one recovery is in the checkpoints: an attempt resumed after it does not get another.
    first, _, _ = _run(tmp_path / "resumed", steps=6, loss_fn=NanAt(5))
    assert first.recoveries and first.steps == 6
    with pytest.raises(FloatingPointError, match=r"the loss is nan at step 8.*diverged once at step 5"):
        _run(tmp_path / "resumed", steps=10, loss_fn=NanAt(2))


def test_a_damaged_newest_checkpoint_is_passed_over_for_the_one_before(tmp_path):
    uninterrupted, _, _ = _run(tmp_path / "clean", steps=9)
    root = tmp_path / "damaged"
    with pytest.raises(InjectedFault):
        _run(root, steps=9, fail_once_at_step={"tiny": 8})
    checkpoints = root / "tiny/k/checkpoints"
    newest = checkpoints / "step-000000006.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated on the storage
    summary, _, lines = _run(root, steps=9)  # the retry
    assert summary.resumed_from_step == 3 and summary.steps == 9 and not summary.recoveries
    assert any("step-000000006.pt is damaged" in line for line in lines)
    assert any("removed the damaged checkpoint" in line and "step-000000006.pt" in line for line in lines)
    assert [step for step, _ in list_checkpoints(str(checkpoints))] == [6, 9]
    _assert_same_weights(_weights(summary), _weights(uninterrupted))
