"""PatchGAN discriminator: a fully convolutional critic that scores overlapping image patches
(Isola et al. 2017, sec. 3.2.2; the first-stage discriminator of Esser et al. 2021 and Rombach et al. 2022)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class PatchDiscriminator(nn.Module):
    """4x4 convolutions: `n_layers` stride-2 downsamplings (doubling the width up to 8x), one stride-1 layer, and a
    1-channel map of real/fake logits, one per receptive-field patch (Isola et al. 2017, app. 6.1.2)."""

    def __init__(self, in_channels: int = 3, base_channels: int = 32, n_layers: int = 2, norm_groups: int = 8) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, base_channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        ch = base_channels
        for i in range(1, n_layers + 1):
            out = base_channels * min(2**i, 8)
            stride = 2 if i < n_layers else 1
            layers += [nn.Conv2d(ch, out, 4, stride=stride, padding=1), nn.GroupNorm(norm_groups, out),
                       nn.LeakyReLU(0.2)]
            ch = out
        layers.append(nn.Conv2d(ch, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Discriminator hinge loss E[relu(1 - D(x))] + E[relu(1 + D(G(z)))], halved (Lim & Ye 2017, eq. 7; as in
    Esser et al. 2021's code)."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())
