"""The VQ-VAE family: quantisation, codebook learning, the adversarial terms and the network."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cloudburst.models import registry
from cloudburst.models.discriminator import (
    PatchDiscriminator,
    adaptive_weight,
    discriminator_loss,
    generator_loss,
)
from cloudburst.models.quantise import VectorQuantiser, code_statistics
from cloudburst.models.roles import DiscreteCoder, Reconstructor, Trainable, Translator
from cloudburst.models.vqvae import VQVAE, VQVAEConfig, codebook_scores

SMALL = dict(registry.family("vqvae").small)


def config(**overrides: object) -> VQVAEConfig:
    return VQVAEConfig.model_validate({**SMALL, **overrides})


def windows(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    wet = torch.rand(shape, generator=g) < 0.5
    return torch.rand(shape, generator=g) * wet


# ----------------------------------------------------------------------------- quantiser


def test_quantisation_returns_the_nearest_code():
    torch.manual_seed(0)
    q = VectorQuantiser(16, 4, dead_code_steps=0)
    with torch.no_grad():
        q.codebook.copy_(torch.randn(16, 4))
    z = torch.randn(3, 4, 2, 5, 5)
    out = q(z)
    codes = q.codebook.detach().numpy().astype(np.float64)
    vectors = np.moveaxis(z.numpy().astype(np.float64), 1, -1)  # (3, 2, 5, 5, 4)
    brute = ((vectors[..., None, :] - codes) ** 2).sum(-1).argmin(-1)
    assert out.indices.dtype == torch.int64 and out.indices.shape == (3, 2, 5, 5)
    assert np.array_equal(out.indices.numpy(), brute)
    expected = np.moveaxis(codes[brute], -1, 1)
    assert np.allclose(out.quantised.detach().numpy(), expected, atol=1e-6)
    assert torch.equal(q.nearest(z), out.indices)
    assert torch.allclose(q.lookup(out.indices), out.quantised.detach(), atol=1e-6)
    assert 1.0 <= float(out.perplexity) <= 16.0 and 0.0 < float(out.usage) <= 1.0


def test_code_statistics_of_one_code_and_of_all_codes_equally():
    perplexity, usage = code_statistics(torch.zeros(10, dtype=torch.int64), 8)
    assert float(perplexity) == pytest.approx(1.0) and float(usage) == pytest.approx(1 / 8)
    perplexity, usage = code_statistics(torch.arange(8).repeat(3), 8)
    assert float(perplexity) == pytest.approx(8.0) and float(usage) == 1.0


def test_the_straight_through_estimator_passes_the_gradient_to_the_encoder():
    torch.manual_seed(0)
    encoder = torch.nn.Conv3d(1, 4, 3, padding=1)
    q = VectorQuantiser(8, 4, dead_code_steps=0)
    x = torch.rand(2, 1, 2, 6, 6)
    z = encoder(x)
    z.retain_grad()
    upstream = torch.randn(2, 4, 2, 6, 6)
    (q(z).quantised * upstream).sum().backward()
    # the gradient at the encoder output is the gradient at the quantised output, unchanged
    assert torch.equal(z.grad, upstream)
    expected = torch.autograd.grad((encoder(x) * upstream).sum(), encoder.weight)[0]
    assert encoder.weight.grad.abs().sum() > 0
    assert torch.allclose(encoder.weight.grad, expected, atol=1e-6)
    assert q.codebook.grad is None  # the codes learn from the codebook loss only


def test_codebook_and_commitment_losses_move_their_own_side():
    torch.manual_seed(0)
    q = VectorQuantiser(8, 4, dead_code_steps=0)
    z = torch.randn(5, 4, requires_grad=True)
    out = q(z)
    g_code = torch.autograd.grad(out.codebook_loss, [z, q.codebook], allow_unused=True)
    assert g_code[0] is None and g_code[1].abs().sum() > 0
    g_commit = torch.autograd.grad(out.commitment_loss, [z, q.codebook], allow_unused=True)
    assert g_commit[0].abs().sum() > 0 and g_commit[1] is None


def test_ema_updates_equal_a_hand_computation():
    q = VectorQuantiser(2, 1, ema=True, decay=0.5, epsilon=0.1, dead_code_steps=0)
    with torch.no_grad():
        q.codebook.copy_(torch.tensor([[0.0], [10.0]]))
        q.embed_sum.copy_(q.codebook)
    z = torch.tensor([[1.0], [2.0], [9.0]])
    q.eval()
    q(z)  # no update outside training
    assert q.codebook.flatten().tolist() == [0.0, 10.0]
    q.train()
    out = q(z)
    # quantised with the codebook before the update: 1, 2 -> code 0, 9 -> code 1
    assert out.indices.tolist() == [0, 0, 1]
    assert float(out.codebook_loss) == 0.0
    assert float(out.commitment_loss) == pytest.approx((1 + 4 + 1) / 3)
    # counts 0.5 * [1, 1] + 0.5 * [2, 1] = [1.5, 1]; sums 0.5 * [0, 10] + 0.5 * [3, 9]
    assert q.cluster_size.tolist() == pytest.approx([1.5, 1.0])
    assert q.embed_sum.flatten().tolist() == pytest.approx([1.5, 9.5])
    # Laplace: (n_k + 0.1) / (2.5 + 0.2) * 2.5 = [40/27, 27.5/27]; codes = sums / that
    assert q.codebook.flatten().tolist() == pytest.approx([1.0125, 9.5 * 27 / 27.5])
    assert q.codebook.flatten()[1].item() == pytest.approx(9.327272727, rel=1e-6)


def test_dead_codes_restart_at_encoder_outputs_of_the_batch():
    torch.manual_seed(0)
    q = VectorQuantiser(4, 2, dead_code_steps=2)
    with torch.no_grad():
        q.codebook.copy_(torch.tensor([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0], [100.0, 100.0]]))
    z = torch.randn(6, 2) * 0.1
    q.eval()
    for _ in range(3):
        q(z)
    assert q.steps_unused.tolist() == [0, 0, 0, 0]  # nothing counted outside training
    q.train()
    q(z)
    assert q.steps_unused.tolist() == [0, 1, 1, 1]
    assert q.codebook[1].tolist() == [100.0, 0.0]
    q(z)
    rows = {tuple(r) for r in z.tolist()}
    revived = [tuple(q.codebook[k].tolist()) for k in (1, 2, 3)]
    assert all(r in rows for r in revived) and len(set(revived)) == 3
    assert q.codebook[0].tolist() == [0.0, 0.0]
    assert q.steps_unused.tolist() == [0, 0, 0, 0]
    assert len(set(q(z).indices.tolist())) > 1  # the revived codes are chosen now


def test_dead_code_restart_keeps_the_ema_buffers_consistent():
    q = VectorQuantiser(3, 1, ema=True, decay=0.9, dead_code_steps=1)
    with torch.no_grad():
        q.codebook.copy_(torch.tensor([[0.0], [50.0], [60.0]]))
        q.embed_sum.copy_(q.codebook)
    q.train()
    z = torch.tensor([[0.5], [1.5]])
    q(z)
    for k in (1, 2):
        assert q.codebook[k].item() in (0.5, 1.5)
        assert q.embed_sum[k].item() == q.codebook[k].item() and q.cluster_size[k] == 1.0


def test_distances_stay_float32_under_bf16_autocast():
    torch.manual_seed(0)
    q = VectorQuantiser(64, 16, dead_code_steps=0)
    with torch.no_grad():
        q.codebook.copy_(torch.randn(64, 16) * 0.05 + 4.0)
    z = torch.randn(200, 16) * 0.05 + 4.0
    codes = q.codebook.detach()
    reference = ((z[:, None] - codes[None]) ** 2).sum(-1).argmin(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        naive = (z.pow(2).sum(1, keepdim=True) - 2 * (z @ codes.t())).argmin(1)
        assert not torch.equal(naive, reference)  # bf16 would pick other codes
        assert q.distances(z).dtype == torch.float32
        out = q(z)
    assert torch.equal(out.indices, reference)
    assert out.commitment_loss.dtype == torch.float32


def test_lookup_refuses_codes_out_of_range():
    q = VectorQuantiser(4, 2)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        q.lookup(torch.tensor([0, 4]))
    with pytest.raises(TypeError, match="integers"):
        q.lookup(torch.tensor([0.0]))


# ------------------------------------------------------------------------- discriminator


def test_the_discriminator_works_on_single_time_steps_and_windows():
    disc = PatchDiscriminator(1, 4, 2)
    assert disc(torch.rand(2, 1, 1, 9, 9)).shape == (2, 1, 1, 3, 3)
    assert disc(torch.rand(2, 1, 4, 8, 8)).shape == (2, 1, 4, 2, 2)


@pytest.mark.parametrize("kind", ["hinge", "non_saturating"])
def test_each_adversarial_term_moves_only_its_own_side(kind):
    torch.manual_seed(0)
    net = VQVAE(config(adversarial_start=0, adversarial_loss=kind), (2, 8, 8)).train()
    disc = net.discriminator
    assert disc is not None
    generator = [p for n, p in net.named_parameters() if not n.startswith("discriminator.")]
    critic = list(disc.parameters())
    x = windows((3, 1, 2, 8, 8))
    x_hat = net.decode(net.quantiser(net.encoder(x)).quantised, x.shape)

    d_loss = discriminator_loss(disc(x), disc(x_hat.detach()), kind)
    grads = torch.autograd.grad(d_loss, generator + critic, allow_unused=True, retain_graph=True)
    assert all(g is None for g in grads[: len(generator)])
    assert all(g is not None for g in grads[len(generator) :])
    assert sum(float(g.abs().sum()) for g in grads[len(generator) :]) > 0

    g_loss = generator_loss(disc.frozen(x_hat), kind)
    grads = torch.autograd.grad(g_loss, generator + critic, allow_unused=True)
    assert all(g is None for g in grads[len(generator) :])
    assert float(grads[0].abs().sum()) > 0  # the encoder's first layer is reached

    # an optimizer step on the discriminator's loss leaves the generator as it was
    before = [p.detach().clone() for p in generator]
    critic_before = [p.detach().clone() for p in critic]
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    optimizer.zero_grad()
    d_loss.backward()
    optimizer.step()
    assert all(torch.equal(a, p) for a, p in zip(before, generator, strict=True))
    assert any(not torch.equal(a, p) for a, p in zip(critic_before, critic, strict=True))


def test_the_full_loss_gives_the_discriminator_exactly_its_own_gradient():
    torch.manual_seed(0)
    net = VQVAE(config(adversarial_start=0, dead_code_steps=0), (2, 8, 8)).train()
    disc = net.discriminator
    assert disc is not None
    x = windows((3, 1, 2, 8, 8))
    batch = {"x": x, "mask": torch.ones_like(x, dtype=torch.bool)}
    total, metrics = net.loss(batch)
    assert metrics["adversarial_active"] == 1.0 and metrics["adaptive_weight"] > 0
    critic = list(disc.parameters())
    from_total = torch.autograd.grad(total, critic)
    x_hat = net.decode(net.quantiser(net.encoder(x)).quantised, x.shape)
    alone = torch.autograd.grad(discriminator_loss(disc(x), disc(x_hat.detach())), critic)
    for a, b in zip(from_total, alone, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_adaptive_weight_is_the_gradient_norm_ratio_and_zero_without_gradients():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    rec = (w**2).sum()  # gradient 2w = (2, 4), norm sqrt(20)
    adv = 3.0 * w.sum()  # gradient (3, 3), norm sqrt(18)
    weight = adaptive_weight(rec, adv, w)
    assert not weight.requires_grad
    assert float(weight) == pytest.approx(20**0.5 / (18**0.5 + 1e-4))
    assert float(adaptive_weight(rec, 1e-12 * w.sum(), w, max_weight=5.0)) == 5.0
    with torch.no_grad():
        assert float(adaptive_weight((w**2).sum(), w.sum(), w)) == 0.0


def test_the_adversarial_terms_wait_for_their_start():
    torch.manual_seed(0)
    net = VQVAE(config(adversarial_start=2, dead_code_steps=0), (1, 8, 8)).train()
    x = windows((2, 1, 1, 8, 8))
    batch = {"x": x, "mask": torch.ones_like(x, dtype=torch.bool)}
    seen = [net.loss(batch)[1]["adversarial_active"] for _ in range(3)]
    assert seen == [0.0, 0.0, 1.0]
    # before the start the discriminator still takes part (zero gradient), as DDP needs
    fresh = VQVAE(config(adversarial_start=5), (1, 8, 8)).train()
    fresh.loss(batch)[0].backward()
    assert fresh.discriminator is not None
    assert all(p.grad is not None and not p.grad.any() for p in fresh.discriminator.parameters())


# ------------------------------------------------------------------------------ network


def lowered(net: VQVAE, batch: dict[str, torch.Tensor], steps: int = 8, lr: float = 3e-3) -> None:
    def evaluation() -> float:
        net.eval()
        with torch.no_grad():
            value = float(net.loss(batch)[0])
        net.train()
        return value

    before = evaluation()
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    for _ in range(steps):
        value, logs = net.loss(batch)
        assert value.ndim == 0 and np.isfinite(logs["loss"])
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
    assert evaluation() < before


@pytest.mark.parametrize("ema", [False, True])
def test_a_few_adam_steps_lower_the_loss(ema):
    torch.manual_seed(0)
    net = VQVAE(config(ema=ema, dead_code_steps=2), (2, 8, 8)).train()
    x = windows((4, 1, 2, 8, 8))
    lowered(net, {"x": x, "mask": torch.ones_like(x, dtype=torch.bool)})


def test_a_few_adam_steps_lower_the_loss_of_a_translation_with_adversarial_terms():
    torch.manual_seed(0)
    net = VQVAE(config(adversarial_start=0, loss="rec+wqt", bins=10), (1, 8, 8)).train()
    x = windows((4, 1, 1, 8, 8))
    target = (1.0 - x).flip(-1)
    mask = torch.ones_like(x, dtype=torch.bool)
    target_mask = mask.clone()
    target_mask[..., :2] = False
    batch = {"x": x, "mask": mask, "target": target, "target_mask": target_mask}
    lowered(net, batch)
    assert {"discriminator", "generator_adversarial", "adaptive_weight"} <= set(net.loss(batch)[1])


def test_translation_learns_the_target_where_its_mask_is_valid():
    torch.manual_seed(0)
    net = VQVAE(config(), (1, 8, 8)).eval()
    x = windows((2, 1, 1, 8, 8))
    target = windows((2, 1, 1, 8, 8), seed=1)
    mask = torch.ones_like(x, dtype=torch.bool)
    target_mask = mask.clone()
    target_mask[..., :3] = False
    changed = target.clone()
    changed[..., :3] = 7.0  # only where the target is invalid
    with torch.no_grad():
        a = net.loss({"x": x, "mask": mask, "target": target, "target_mask": target_mask})[0]
        b = net.loss({"x": x, "mask": mask, "target": changed, "target_mask": target_mask})[0]
        c = net.loss({"x": x, "mask": mask})[0]
    assert float(a) == pytest.approx(float(b)) and float(a) != pytest.approx(float(c))
    with pytest.raises(ValueError, match="target"):
        net.loss({"x": x, "mask": mask, "target": target[:, :, :, :4]})


@pytest.mark.parametrize(("shape", "codes"), [((1, 16, 16), (1, 4, 4)), ((3, 8, 12), (3, 2, 3))])
def test_role_methods_keep_their_shapes_for_images_and_windows(shape, codes):
    torch.manual_seed(0)
    net = VQVAE(config(downsample=4), shape).eval()
    x = windows((2, 1, *shape))
    with torch.no_grad():
        assert net.reconstruct(x).shape == x.shape
        assert net.translate(x).shape == x.shape
        idx = net.encode_codes(x)
        assert idx.dtype == torch.int64 and idx.shape == (2, *codes)
        assert 0 <= int(idx.min()) and int(idx.max()) < net.codebook_size
        decoded = net.decode_codes(idx)
        assert decoded.shape == (2, 1, codes[0], codes[1] * 4, codes[2] * 4)
        assert torch.allclose(decoded, net.reconstruct(x))
    for role in (Trainable, Reconstructor, Translator, DiscreteCoder):
        assert isinstance(registry.require(net, "vqvae", role), role)


def test_reconstruction_changes_nothing_in_training_mode():
    torch.manual_seed(0)
    net = VQVAE(config(ema=True, dead_code_steps=1), (2, 8, 8)).train()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    x = windows((2, 1, 2, 8, 8))
    with torch.no_grad():
        net.reconstruct(x)
        net.encode_codes(x)
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())


def test_the_config_refuses_bad_values_clearly():
    from cloudburst.config import ConfigError, TrainJobConfig, validate

    assert VQVAEConfig().codebook_size == 2048 and VQVAEConfig(codebook_size=4096).code_dim == 256
    cases = {
        "downsample": (3, "power of 2"),
        "codebook_size": (1, "greater than or equal to 2"),
        "ema_decay": (1.0, "less than 1"),
        "beta": (-0.1, "greater than or equal to 0"),
        "widths": ([8, 0], "every width must be >= 1"),
        "adversarial_loss": ("wasserstein", "hinge"),
        "loss": ("l1", "rec"),
    }
    for field, (value, message) in cases.items():
        with pytest.raises(ConfigError, match=f"model.{field}.*{message}"):
            validate(TrainJobConfig, {"model": {"kind": "vqvae", field: value}})
    with pytest.raises(ConfigError, match="did you mean 'codebook_size'"):
        validate(TrainJobConfig, {"model": {"kind": "vqvae", "codebook_sizes": 64}})
    cfg = validate(TrainJobConfig, {"model": {"kind": "vqvae", "loss": "rec+wqt"}})
    assert isinstance(cfg.model, VQVAEConfig) and cfg.learning_rate() == pytest.approx(4.5e-6)


def test_the_registry_entry_reports_codebook_use_and_warns_of_collapse():
    entry = registry.family("vqvae")
    assert entry.scenarios == frozenset() and not entry.sampler_settings
    with pytest.raises(ValueError, match="built-in"):
        registry.unregister("vqvae")
    torch.manual_seed(0)
    net = VQVAE(config(), (2, 8, 8))
    x = windows((4, 1, 2, 8, 8))
    scores = codebook_scores(net, x)
    assert set(scores) == {"val_codebook_usage", "val_perplexity"} <= set(entry.metrics)
    assert 0.0 < scores["val_codebook_usage"] <= 1.0 and scores["val_perplexity"] >= 1.0
    # each epoch: codebook use, and the output's scores (reconstruction in physical units, or
    # the translation's against its targets), all of them declared for sweeps to rank on
    from cloudburst.data.transforms import Scale
    from cloudburst.models.registry import EpochProbe

    edges = np.linspace(0.0, 40.0, 11)
    mask = torch.ones_like(x, dtype=torch.bool)
    probe = EpochProbe(x, mask, Scale(0.0, 40.0, "unit"), edges)
    reconstructing = entry.epoch_metrics(net, probe)
    assert {"val_codebook_usage", "val_qmse_top5", "val_q0.99_error"} <= set(reconstructing)
    translating = entry.epoch_metrics(net, EpochProbe(x, mask, probe.transform, edges, target=x))
    assert {"val_ssim", "val_psnr", "val_mae"} <= set(translating)
    assert "val_qmse_top5" not in translating
    declared = set(entry.metrics)
    assert set(reconstructing) - {k for k in reconstructing if "_bin_" in k} <= declared | {
        "val_q0.99_input",
        "val_q0.99_recon",
        "val_q0.999_input",
        "val_q0.999_recon",
        "val_mean_bias",
        "val_wet_fraction",
        "val_observed_wet_fraction",
    }
    assert set(translating) <= declared
    cfg = config()
    warning = entry.epoch_warning(cfg, {"val_codebook_usage": 1 / 64, "val_perplexity": 1.0})
    assert warning is not None and "codebook collapse: 1 of 64 codes" in warning
    assert "model.ema" in warning
    assert entry.epoch_warning(cfg, {"val_codebook_usage": 0.5, "val_perplexity": 20.0}) is None
    assert entry.epoch_warning(cfg, {}) is None
    tags = entry.tags(cfg)
    assert tags["codebook_size"] == 64 and tags["loss"] == "rec"


@pytest.mark.parametrize(
    "overrides", [{}, {"ema": True}, {"adversarial_start": 0}, {"adversarial_weight": 0.0}]
)
def test_every_parameter_takes_part_in_every_training_step(overrides):
    """DistributedDataParallel (without unused-parameter search) needs a gradient for every
    parameter at every step, the discriminator's before its start included."""
    torch.manual_seed(0)
    net = VQVAE(config(**overrides), (2, 8, 8)).train()
    x = windows((2, 1, 2, 8, 8))
    net.loss({"x": x, "mask": torch.ones_like(x, dtype=torch.bool)})[0].backward()
    assert [n for n, p in net.named_parameters() if p.grad is None] == []


def test_the_training_loop_steps_it_under_bf16_autocast():
    from cloudburst.training.loop import LossModule, train_steps

    torch.manual_seed(0)
    net = VQVAE(config(adversarial_start=0), (1, 8, 8))
    x = windows((2, 1, 1, 8, 8))
    batch = {"x": x, "mask": torch.ones_like(x, dtype=torch.bool)}
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    steps = list(train_steps(LossModule(net), [batch, batch], optimizer))
    assert len(steps) == 2 and int(net.step) == 2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value, logs = net.loss(batch)
    assert value.dtype == torch.float32 and np.isfinite(logs["loss"])
