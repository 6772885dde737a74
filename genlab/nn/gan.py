"""GAN networks: a residual generator and discriminator without normalization (in the spirit of R3GAN,
Huang et al. 2024, sec. 3), the DCGAN layout (Radford et al. 2016, sec. 3), a class embedding in the generator
and a projection discriminator (Miyato & Koyama 2018, eq. 3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ARCHS = ("resnet", "dcgan")


class ResidualBlock(nn.Module):
    """x + conv1x1(act(conv3x3(act(conv1x1(x))))): an inverted bottleneck with leaky ReLU and no normalization, the
    last convolution zero-initialised so each block starts as the identity (Huang et al. 2024, sec. 3, Fix-up
    initialisation of Zhang et al. 2019)."""

    def __init__(self, channels: int, expansion: int = 2) -> None:
        super().__init__()
        hidden = channels * expansion
        self.conv1 = nn.Conv2d(channels, hidden, 1)
        self.conv2 = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.conv3 = nn.Conv2d(hidden, channels, 1, bias=False)
        nn.init.zeros_(self.conv3.weight)

    def forward(self, x: Tensor) -> Tensor:
        h = F.leaky_relu(self.conv1(x), 0.2)
        h = F.leaky_relu(self.conv2(h), 0.2)
        return x + self.conv3(h)


class UpTransition(nn.Module):
    """Bilinear 2x upsampling, then a 1x1 convolution to the next width (Huang et al. 2024, sec. 3)."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))


class DownTransition(nn.Module):
    """A 1x1 convolution to the next width, then 2x2 average pooling (Huang et al. 2024, sec. 3)."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(self.conv(x), 2)


def _generator_body(arch: str, widths: list[int], channels: int, blocks: int) -> nn.Sequential:
    """From (widths[-1], s, s) to (channels, s * 2^(L-1), ...), the widest level first."""
    layers: list[nn.Module] = []
    if arch == "dcgan":  # transposed convolutions, batch norm and ReLU; tanh output (Radford et al. 2016, sec. 3)
        layers += [nn.BatchNorm2d(widths[-1]), nn.ReLU()]
        for i in range(len(widths) - 1, 0, -1):
            layers += [nn.ConvTranspose2d(widths[i], widths[i - 1], 4, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(widths[i - 1]), nn.ReLU()]
        return nn.Sequential(*layers, nn.Conv2d(widths[0], channels, 3, padding=1), nn.Tanh())
    for i in range(len(widths) - 1, -1, -1):
        layers += [ResidualBlock(widths[i]) for _ in range(blocks)]
        if i > 0:
            layers.append(UpTransition(widths[i], widths[i - 1]))
    return nn.Sequential(*layers, nn.Conv2d(widths[0], channels, 1))


def _discriminator_body(arch: str, widths: list[int], channels: int, blocks: int) -> nn.Sequential:
    """From (channels, H, W) to (widths[-1], H / 2^(L-1), ...)."""
    if arch == "dcgan":  # strided convolutions, leaky ReLU, batch norm after the first layer (Radford et al. 2016)
        layers: list[nn.Module] = [nn.Conv2d(channels, widths[0], 3, padding=1), nn.LeakyReLU(0.2)]
        for i in range(len(widths) - 1):
            layers += [nn.Conv2d(widths[i], widths[i + 1], 4, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(widths[i + 1]), nn.LeakyReLU(0.2)]
        return nn.Sequential(*layers)
    layers = [nn.Conv2d(channels, widths[0], 1)]
    for i in range(len(widths)):
        layers += [ResidualBlock(widths[i]) for _ in range(blocks)]
        if i < len(widths) - 1:
            layers.append(DownTransition(widths[i], widths[i + 1]))
    return nn.Sequential(*layers, nn.LeakyReLU(0.2))


class Generator(nn.Module):
    """G(z, y): z (B, z_dim), with a class embedding concatenated when `num_classes` > 0, through a linear layer
    to a (widths[-1], s, s) map, then the body up to the image (B, channels, s * 2^(L-1), ...)."""

    def __init__(self, arch: str, z_dim: int, widths: list[int], image_size: int, channels: int, blocks: int = 1,
                 num_classes: int = 0) -> None:
        super().__init__()
        self.base = image_size // 2 ** (len(widths) - 1)
        self.width = widths[-1]
        self.embed = nn.Embedding(num_classes, z_dim) if num_classes else None
        self.fc = nn.Linear(z_dim * (2 if num_classes else 1), self.width * self.base**2)
        self.body = _generator_body(arch, widths, channels, blocks)

    def forward(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        if self.embed is not None:
            z = torch.cat([z, self.embed(y)], dim=1)
        return self.body(self.fc(z).view(z.shape[0], self.width, self.base, self.base))


class Discriminator(nn.Module):
    """D(x, y) = psi(phi(x)) + <V y, phi(x)>: a body and a linear layer give the features phi(x) (B, features); the
    logit is a linear psi of them plus, with classes, the projection onto the label's embedding row V_y
    (Miyato & Koyama 2018, eq. 3)."""

    def __init__(self, arch: str, widths: list[int], image_size: int, channels: int, blocks: int = 1,
                 num_classes: int = 0, features: int = 128) -> None:
        super().__init__()
        base = image_size // 2 ** (len(widths) - 1)
        self.body = _discriminator_body(arch, widths, channels, blocks)
        self.phi = nn.Sequential(nn.Flatten(), nn.Linear(widths[-1] * base**2, features), nn.LeakyReLU(0.2))
        self.psi = nn.Linear(features, 1)
        self.embed = nn.Embedding(num_classes, features) if num_classes else None

    def features(self, x: Tensor) -> Tensor:
        """phi(x), (B, features)."""
        return self.phi(self.body(x))

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        h = self.features(x)
        out = self.psi(h).squeeze(1)
        if self.embed is not None:
            out = out + (self.embed(y) * h).sum(1)
        return out
