import numpy as np
import pytest
import torch

from alpipe import training
from alpipe.errors import UserError
from alpipe.models import build_model, get_model_spec
from alpipe.training import TrainConfig, carve_validation, evaluate, fit, fixed_epochs, recalibrate_batchnorm

SPEC = get_model_spec("small_cnn")
CPU = torch.device("cpu")


def toy_images(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes a small CNN separates easily: a bright left half or a bright right half."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    images = torch.randint(0, 40, (n, 1, 28, 28), generator=gen, dtype=torch.uint8)
    images[labels == 0, :, :, :14] += 200
    images[labels == 1, :, :, 14:] += 200
    return images, labels


def model():
    torch.manual_seed(0)
    return build_model("small_cnn", 2, in_channels=1)


def test_stopping_rules_parse():
    assert fixed_epochs("epochs:7") == 7
    assert fixed_epochs("no_improvement") is None
    for bad in ("epochs:0", "epochs:x", "forever"):
        with pytest.raises(UserError, match="stopping rule"):
            fixed_epochs(bad)


def test_fixed_epochs_runs_exactly_n_epochs_and_learns():
    x, y = toy_images(40)
    epochs = []
    net = model()
    result = fit(net, x, y, spec=SPEC, config=TrainConfig(stop="epochs:3"), device=CPU, seed=0,
                 on_epoch=lambda epoch, loss, acc: epochs.append((epoch, acc)))
    assert result.epochs == 3 and [e for e, _ in epochs] == [1, 2, 3]
    assert all(acc is None for _, acc in epochs)  # no held-out set for a fixed number of epochs
    test_x, test_y = toy_images(100, seed=1)
    assert evaluate(net, test_x, test_y, spec=SPEC, device=CPU) > 0.9


def test_small_labeled_sets_train_fixed_epochs_instead_of_stopping_on_noise():
    x, y = toy_images(20)  # 20% of 20 labels is 4 held-out images: fewer than min_val_size
    config = TrainConfig(min_val_size=10, small_set_epochs=4)
    result = fit(model(), x, y, spec=SPEC, config=config, device=CPU, seed=0)
    assert result.epochs == 4 and result.holdout_accuracy is None


def test_no_improvement_stops_after_patience_and_keeps_the_best_epoch():
    x, y = toy_images(100)
    accs = []
    net = model()
    config = TrainConfig(patience=2, max_epochs=25, min_val_size=10)
    result = fit(net, x, y, spec=SPEC, config=config, device=CPU, seed=0,
                 on_epoch=lambda epoch, loss, acc: accs.append(acc))
    assert len(accs) == result.epochs < 25  # a separable toy set stops improving early
    assert result.holdout_accuracy == max(accs)
    assert accs[-2:] and all(a <= max(accs[:-2]) for a in accs[-2:])  # the last `patience` epochs did not improve


def test_holdout_test_watches_the_given_set():
    x, y = toy_images(60)
    held = toy_images(30, seed=2)
    accs = []
    fit(model(), x, y, spec=SPEC, config=TrainConfig(holdout="test", patience=1, max_epochs=5), device=CPU,
        seed=0, holdout=held, on_epoch=lambda epoch, loss, acc: accs.append(acc))
    assert accs and all(acc is not None for acc in accs)


def test_validation_is_stratified_and_keeps_a_training_example_per_class():
    labels = np.array([0] * 10 + [1] * 5 + [2] * 1)
    mask = carve_validation(labels, fraction=0.2, rng=np.random.default_rng(0))
    assert mask[labels == 0].sum() == 2 and mask[labels == 1].sum() == 1 and mask[labels == 2].sum() == 0


def test_batchnorm_statistics_are_recomputed_over_the_whole_set():
    """Known answer: one BatchNorm layer over one batch gets that batch's mean and (unbiased) variance."""
    net = torch.nn.Sequential(torch.nn.BatchNorm1d(3), torch.nn.Dropout(0.5))
    net.train()
    net(torch.randn(8, 3) * 5 + 7)  # stale statistics from "training"
    x = torch.tensor([[0.0, 1.0, 2.0], [2.0, 3.0, 6.0], [4.0, 5.0, 10.0]])
    recalibrate_batchnorm(net, x, spec=None, device=CPU, seed=0)
    bn = net[0]
    assert torch.allclose(bn.running_mean, torch.tensor([2.0, 3.0, 6.0]))
    assert torch.allclose(bn.running_var, torch.tensor([4.0, 4.0, 16.0]))
    assert bn.momentum == 0.1 and not net.training  # its momentum back, the model in eval mode


def test_recalibration_caps_the_images_it_reads_and_leaves_models_without_batchnorm_alone(monkeypatch):
    seen = []
    net = torch.nn.Sequential(torch.nn.BatchNorm1d(2))
    net.register_forward_hook(lambda module, inputs, output: seen.append(len(inputs[0])))
    monkeypatch.setattr(training, "BN_RECALIBRATION_IMAGES", 6)
    recalibrate_batchnorm(net, torch.randn(12, 2), spec=None, device=CPU, seed=0, batch_size=4)
    assert seen == [4, 2]
    seen.clear()
    recalibrate_batchnorm(net, torch.randn(5, 2), spec=None, device=CPU, seed=0, batch_size=4)
    assert seen == [4]  # a last batch of one image is left out
    linear = torch.nn.Linear(2, 2)
    before = {k: v.clone() for k, v in linear.state_dict().items()}
    recalibrate_batchnorm(linear, torch.randn(4, 2), spec=None, device=CPU, seed=0)
    assert all(torch.equal(before[k], v) for k, v in linear.state_dict().items())


def test_fit_leaves_batchnorm_statistics_of_the_unaugmented_training_images():
    x, y = toy_images(40)
    net = model()
    fit(net, x, y, spec=SPEC, config=TrainConfig(stop="epochs:2"), device=CPU, seed=0)
    fitted = net.features[1].running_mean.clone()
    recalibrate_batchnorm(net, x, spec=SPEC, device=CPU, seed=0)  # again: nothing left to change
    assert torch.allclose(net.features[1].running_mean, fitted)
