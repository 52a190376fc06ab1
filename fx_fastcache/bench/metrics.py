"""Image-quality metrics for comparing a cached / approximated run with the exact one.

* :func:`psnr` and :func:`ssim`: per-image fidelity against a reference run with the same
  seeds (images in [-1, 1], so the data range is 2.0).
* :class:`DigitClassifier` (the reference script's ``DigitNet``, weights vendored in
  ``fx_fastcache/assets/digit_classifier.safetensors``): :func:`class_accuracy` of generated
  digits, and 128-d features for :func:`frechet_distance` against
  :func:`real_digit_features` (the 5,000 vendored real MNIST digits).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

logger = logging.getLogger(__name__)

__all__ = [
    "PSNR_CAP_DB",
    "DigitClassifier",
    "class_accuracy",
    "frechet_distance",
    "load_digit_classifier",
    "load_real_digits",
    "psnr",
    "real_digit_features",
    "ssim",
]

_ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
CLASSIFIER_PATH = _ASSETS_DIR / "digit_classifier.safetensors"
REAL_DIGITS_PATH = _ASSETS_DIR / "mnist5k.npz"

#: PSNR reported for identical images (infinite in theory); also an upper bound for all images.
PSNR_CAP_DB = 100.0
_BATCH = 500  # classifier batch size (bounds memory)


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.ndim != 4:
        raise ValueError(f"expected images (B, C, H, W), got {tuple(a.shape)}")


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per image, in dB, shape (B,).

    ``10 * log10(data_range**2 / mse)`` with the MSE over (C, H, W), computed in float64.
    Identical images (MSE 0, infinite PSNR) give :data:`PSNR_CAP_DB` = 100 dB, and every
    value is capped at 100 dB, so averages over a batch stay finite.
    """
    _check_pair(a, b)
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    out = 10.0 * torch.log10(data_range**2 / mse.clamp_min(1e-300))
    out = torch.where(mse == 0, torch.full_like(out, PSNR_CAP_DB), out).clamp(max=PSNR_CAP_DB)
    return out.float()


def _gaussian_window(size: int, sigma: float, channels: int) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g).expand(channels, 1, size, size).contiguous()


def ssim(
    a: torch.Tensor,
    b: torch.Tensor,
    data_range: float = 2.0,
    win_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """Structural similarity per image, shape (B,) (Wang et al. 2004).

    Gaussian window ``win_size`` x ``win_size`` with standard deviation ``sigma``, applied
    per channel without padding (only fully-covered positions), ``C1 = (k1 * L)**2``,
    ``C2 = (k2 * L)**2`` with ``L = data_range``; the SSIM map is averaged over channels and
    positions. Computed in float64; identical images give exactly 1.0.
    """
    _check_pair(a, b)
    c, h, w = a.shape[1:]
    if h < win_size or w < win_size:
        raise ValueError(f"images {h}x{w} are smaller than the {win_size}x{win_size} window")
    x, y = a.double(), b.double()
    win = _gaussian_window(win_size, sigma, c).to(x.device)

    def filt(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, win, groups=c)

    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    mu_x, mu_y = filt(x), filt(y)
    mu_xx, mu_yy, mu_xy = mu_x * mu_x, mu_y * mu_y, mu_x * mu_y
    var_x = filt(x * x) - mu_xx
    var_y = filt(y * y) - mu_yy
    cov = filt(x * y) - mu_xy
    smap = ((2 * mu_xy + c1) * (2 * cov + c2)) / ((mu_xx + mu_yy + c1) * (var_x + var_y + c2))
    return smap.flatten(1).mean(1).float()


class DigitClassifier(nn.Module):
    """Small CNN digit classifier (``DigitNet`` of the reference training script).

    conv 1->32, 32->64, 64->128 (3x3, padding 1, GELU), 2x2 max-pool after the first two,
    global mean pool -> 128-d features -> linear 128->10. Input (B, 1, 32, 32) in [-1, 1].
    """

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 32, 3, padding=1)
        self.c2 = nn.Conv2d(32, 64, 3, padding=1)
        self.c3 = nn.Conv2d(64, 128, 3, padding=1)
        self.fc = nn.Linear(128, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """128-d features (B, 128) of images (B, 1, 32, 32) in [-1, 1]."""
        x = F.max_pool2d(F.gelu(self.c1(x)), 2)
        x = F.max_pool2d(F.gelu(self.c2(x)), 2)
        x = F.gelu(self.c3(x))
        return x.mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (B, 10)."""
        return self.fc(self.features(x))

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted class (B,) long."""
        return self(x).argmax(1)


_CLASSIFIERS: dict[str, DigitClassifier] = {}
_REAL_FEATURES: dict[str, torch.Tensor] = {}


def load_digit_classifier(device: str | torch.device = "cpu") -> DigitClassifier:
    """The vendored digit classifier in eval mode, float32, on ``device`` (cached per device)."""
    key = str(torch.device(device))
    net = _CLASSIFIERS.get(key)
    if net is None:
        from safetensors.torch import load_file

        net = DigitClassifier()
        net.load_state_dict(load_file(str(CLASSIFIER_PATH)))
        net = net.to(device).eval()
        net.requires_grad_(False)
        _CLASSIFIERS[key] = net
        logger.debug("loaded digit classifier from %s on %s", CLASSIFIER_PATH, key)
    return net


def _batched_features(net: DigitClassifier, images: torch.Tensor) -> torch.Tensor:
    dev = next(net.parameters()).device
    with torch.no_grad():
        parts = [
            net.features(images[i : i + _BATCH].to(device=dev, dtype=torch.float32))
            for i in range(0, len(images), _BATCH)
        ]
    return torch.cat(parts) if parts else torch.empty(0, 128, device=dev)


def class_accuracy(
    images: torch.Tensor,
    labels: torch.Tensor | list[int],
    classifier: DigitClassifier | None = None,
) -> float:
    """Fraction of ``images`` (B, 1, 32, 32) in [-1, 1] the classifier labels as ``labels``."""
    labels_t = torch.as_tensor(labels, dtype=torch.long).reshape(-1).cpu()
    if len(labels_t) != len(images):
        raise ValueError(f"got {len(images)} images but {len(labels_t)} labels")
    if len(images) == 0:
        raise ValueError("class_accuracy of an empty set")
    net = classifier if classifier is not None else load_digit_classifier(images.device)
    pred = net.fc(_batched_features(net, images)).argmax(1).cpu()
    return float((pred == labels_t).float().mean())


def classifier_features(
    images: torch.Tensor, classifier: DigitClassifier | None = None
) -> torch.Tensor:
    """128-d classifier features (B, 128) of images (B, 1, 32, 32) in [-1, 1], batched."""
    net = classifier if classifier is not None else load_digit_classifier(images.device)
    return _batched_features(net, images)


def frechet_distance(
    feats_a: torch.Tensor | np.ndarray, feats_b: torch.Tensor | np.ndarray
) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, D) and (M, D).

    ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 sqrtm(S_a S_b))`` in float64 with
    ``scipy.linalg.sqrtm`` (real part taken), as the reference script's ``frechet``.
    Needs at least 2 samples per set; with fewer than D samples the covariances are
    singular and the value is noisier.
    """
    from scipy import linalg

    def as_np(f: torch.Tensor | np.ndarray) -> np.ndarray:
        if isinstance(f, torch.Tensor):
            f = f.detach().cpu().double().numpy()
        return np.asarray(f, dtype=np.float64)

    a, b = as_np(feats_a), as_np(feats_b)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected feature matrices (N, D), (M, D); got {a.shape}, {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError("frechet_distance needs at least 2 samples in each set")
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = np.real(linalg.sqrtm(s1 @ s2))
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def load_real_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The 5,000 vendored real MNIST digits: images (5000, 1, 32, 32) in [-1, 1], labels (5000,).

    Same preprocessing as the reference script's ``load_mnist``: uint8 / 127.5 - 1, padded
    with -1 from 28x28 to 32x32.
    """
    with np.load(REAL_DIGITS_PATH) as d:
        x = torch.from_numpy(d["x"]).float().div(127.5).sub(1.0)
        y = torch.from_numpy(d["y"]).long()
    x = F.pad(x, (2, 2, 2, 2), value=-1.0).unsqueeze(1)
    return x, y


def real_digit_features(device: str | torch.device = "cpu") -> torch.Tensor:
    """Classifier features (5000, 128) of the vendored real digits, cached in memory.

    Computed once per device; the cached tensor is returned (do not modify it in place).
    """
    key = str(torch.device(device))
    feats = _REAL_FEATURES.get(key)
    if feats is None:
        x, _ = load_real_digits()
        feats = classifier_features(x.to(device), load_digit_classifier(device))
        _REAL_FEATURES[key] = feats
    return feats
