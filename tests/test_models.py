"""U-Net shapes and size; parameterisations are consistent with z = α x + σ ε."""
import pytest
import torch

from diffrun.errors import ConfigError
from diffrun.models.parameterization import Denoiser, convert_log_weight, log_loss_ratio
from diffrun.models.unet import UNet


def test_ddpm_cifar10_parameter_count():
    n = sum(p.numel() for p in UNet().parameters())
    assert abs(n - 35.7e6) / 35.7e6 < 0.005, n  # Ho et al. 2020: 35.7M


def test_unet_forward_backward_shapes():
    net = UNet(in_channels=1, image_size=16, channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,))
    x = torch.randn(3, 1, 16, 16, requires_grad=True)
    out = net(x, torch.randn(3))
    assert out.shape == x.shape
    out.square().mean().backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


def test_unet_rejects_bad_image_size():
    with pytest.raises(ConfigError, match="image_size=20 cannot be halved 3 times"):
        UNet(image_size=20, channel_mult=(1, 2, 2, 2))


class Oracle(torch.nn.Module):
    """Returns a fixed tensor: lets us check the algebra of each target."""

    def __init__(self):
        super().__init__()
        self.value = None

    def forward(self, z, c_noise):
        return self.value


def noisy_batch(prediction, logsnr, seed):
    """x0, ε, z = α x0 + σ ε and the Denoiser's regression target F* at the given λ."""
    torch.manual_seed(seed)
    x0, eps = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    lam = torch.tensor(logsnr)
    den = Denoiser(Oracle(), prediction)
    a, s = (c.view(-1, 1, 1, 1) for c in (torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()))
    z = a * x0 + s * eps
    return den, x0, eps, z, lam, den.target(x0, eps, z, lam)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "edm"])
def test_target_roundtrip(prediction):
    den, x0, eps, z, lam, target = noisy_batch(prediction, [-6.0, -1.0, 2.0, 7.0], seed=0)
    x0_hat, eps_hat = den.predict_x0_eps(z, lam, target)  # a perfect network outputs the target
    torch.testing.assert_close(x0_hat, x0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(eps_hat, eps, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("prediction", ["eps", "v", "edm"])
def test_loss_ratio_matches_algebra(prediction):
    """‖F − F*‖² = r(λ)·‖x̂0 − x0‖² for a perturbed output, per sample."""
    den, x0, eps, z, lam, target = noisy_batch(prediction, [-5.0, -0.5, 1.5, 6.0], seed=1)
    out = target + 0.1 * torch.randn_like(target)
    x0_hat, _ = den.predict_x0_eps(z, lam, out)
    loss_f = (out - target).square().mean(dim=(1, 2, 3))
    loss_x = (x0_hat - x0).square().mean(dim=(1, 2, 3))
    torch.testing.assert_close(loss_f / loss_x, log_loss_ratio(prediction, lam).exp(), rtol=1e-3, atol=1e-5)


def convert_weight(weight, lam, src, dst):
    return convert_log_weight(weight.log(), lam, src, dst).exp()


def test_convert_weight_known_cases():
    lam = torch.tensor([-3.0, 0.0, 3.0])
    snr = lam.exp()
    w_x = torch.minimum(snr, torch.tensor(5.0))
    torch.testing.assert_close(convert_weight(w_x, lam, "x0", "eps"), w_x / snr)
    torch.testing.assert_close(convert_weight(w_x, lam, "x0", "v"), w_x / (snr + 1))
    torch.testing.assert_close(convert_weight(w_x / snr, lam, "eps", "x0"), w_x)
    # EDM: λ(σ) = (σ² + σd²)/(σ σd)² on x0 is weight 1 on the F-target
    sigma2 = torch.exp(-lam)
    edm = (sigma2 + 0.25) / (sigma2 * 0.25)
    torch.testing.assert_close(convert_weight(edm, lam, "x0", "edm"), torch.ones(3))


def test_convert_weight_zero_terminal_snr():
    lam = torch.tensor([float("-inf")])
    w = convert_weight(torch.tensor([0.0]), lam, "x0", "eps")  # min(SNR=0, γ) = 0 → 0·∞
    assert w.item() == 1.0
