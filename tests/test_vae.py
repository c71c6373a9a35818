"""The 3D ResNet VAE: the paper's shapes, any window, the model interface, and learning."""

from __future__ import annotations

import pytest
import torch

from cloudburst.config import ConfigError, VAEConfig, validate
from cloudburst.models import registry
from cloudburst.models.vae import VAE, encoded_shape, parameter_count
from cloudburst.training.loop import EarlyStopping, LossModule, MeanMetrics, evaluate, train_steps

SMALL = VAEConfig(widths=(8, 16), latent=6)


def rainy(n: int, window: tuple[int, int, int], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, *window, generator=g) ** 6  # mostly near zero, a few large values
    return torch.where(x < 0.05, torch.zeros_like(x), x)


def test_paper_network_has_table_1_shapes():
    model = VAE(VAEConfig(), (8, 32, 32))
    assert model.code_shape == (2, 8, 8)
    assert model.to_mu.in_features == 32_768 and model.to_mu.out_features == 30
    x = torch.zeros(1, 1, 8, 32, 32)
    with torch.no_grad():
        h = model.encoder(x)
        assert tuple(h.shape) == (1, 256, 2, 8, 8)
        assert tuple(model.reconstruct(x).shape) == (1, 1, 8, 32, 32)
    # the study's network is large: tens of millions of parameters, dominated by the dense layers
    assert 10e6 < parameter_count(model) < 40e6


@pytest.mark.parametrize("window", [(8, 16, 16), (8, 12, 12), (8, 14, 31), (5, 7, 9), (1, 4, 4)])
def test_any_window_round_trips_its_shape(window):
    model = VAE(SMALL, window)
    x = rainy(3, window)
    x_hat, mu, logvar = model(x)
    assert x_hat.shape == x.shape
    assert mu.shape == logvar.shape == (3, SMALL.latent)
    assert model.code_shape == encoded_shape(window, len(SMALL.widths) - 1)
    assert float(x_hat.detach().min()) >= 0.0 and float(x_hat.detach().max()) <= 1.0


def test_sample_is_seeded_and_shaped():
    model = VAE(SMALL, (4, 8, 8))
    a = model.sample(5, torch.Generator().manual_seed(1))
    b = model.sample(5, torch.Generator().manual_seed(1))
    c = model.sample(5, torch.Generator().manual_seed(2))
    assert a.shape == (5, 1, 4, 8, 8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # it generates unconditionally only: asked to sample on a condition, the role is refused
    from cloudburst.models import registry
    from cloudburst.models.roles import ConditionalSampler, RoleError

    with pytest.raises(RoleError, match="ConditionalSampler"):
        registry.require(model, "vae", ConditionalSampler)


@pytest.mark.parametrize("loss", ["rec", "wqt", "rec+wqt", "focal_hist"])
@pytest.mark.parametrize("regulariser", ["mmd", "kl"])
def test_loss_is_finite_and_reports_its_terms(loss, regulariser):
    cfg = SMALL.model_copy(update={"loss": loss, "regulariser": regulariser})
    model = VAE(cfg, (4, 8, 8))
    x = rainy(4, (4, 8, 8))
    total, metrics = model.loss({"x": x, "mask": torch.ones_like(x, dtype=torch.bool)})
    total.backward()
    assert torch.isfinite(total)
    assert {"loss", "reconstruction", regulariser, "mse"} <= set(metrics)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_all_dry_batch_is_safe():
    model = VAE(SMALL.model_copy(update={"loss": "rec+wqt"}), (4, 8, 8))
    total, _ = model.loss({"x": torch.zeros(2, 1, 4, 8, 8)})
    total.backward()
    assert torch.isfinite(total)


def test_a_few_steps_reduce_the_loss():
    torch.manual_seed(0)
    window = (4, 8, 8)
    model = VAE(SMALL.model_copy(update={"loss": "rec+wqt", "reg_weight": 0.1}), window)
    x = rainy(16, window, seed=3)
    batches = [{"x": x}] * 60
    before = evaluate(model, [{"x": x}])["reconstruction"]
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    steps = list(train_steps(LossModule(model), batches, opt))
    after = evaluate(model, [{"x": x}])["reconstruction"]
    assert len(steps) == 60 and steps[0]["batch_size"] == 16
    assert after < 0.7 * before


def test_train_steps_stop_on_non_finite_loss():
    class Bad(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def loss(self, batch):
            return self.w * float("nan"), {}

    with pytest.raises(FloatingPointError, match="nan"):
        list(
            train_steps(
                LossModule(Bad()),
                [{"x": torch.zeros(1)}],
                torch.optim.SGD(Bad().parameters(), lr=0.1),
            )
        )


def test_early_stopping_and_means():
    stop = EarlyStopping(patience=2)
    assert [stop.step(v) for v in (3.0, 2.0, 2.5, 2.1, 1.0)] == [False, False, False, True, False]
    mean = MeanMetrics()
    mean.update({"a": 1.0}, 1)
    mean.update({"a": 4.0}, 3)
    assert mean.compute("val_") == {"val_a": pytest.approx(3.25)}


def test_registry_and_config_errors():
    assert "vae" in registry.names()
    assert isinstance(registry.build("vae", SMALL, (4, 8, 8)), VAE)
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        registry.build("nope", SMALL, (4, 8, 8))
    with pytest.raises(ConfigError, match="loss"):
        validate(VAEConfig, {"loss": "l1"})
    with pytest.raises(ConfigError, match="bins"):
        validate(VAEConfig, {"bins": 1})
