"""Tests of fx_fastcache.bench.metrics (PSNR, SSIM, digit classifier, Fréchet distance)."""

from __future__ import annotations

import pytest
import torch

from fx_fastcache.bench import metrics as M


@pytest.fixture(scope="module")
def real() -> tuple[torch.Tensor, torch.Tensor]:
    return M.load_real_digits()


def _noisy(x: torch.Tensor, std: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (x + std * torch.randn(x.shape, generator=g)).clamp(-1, 1)


def test_real_digits_preprocessing(real: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = real
    assert x.shape == (5000, 1, 32, 32) and y.shape == (5000,)
    assert x.min() >= -1 and x.max() <= 1
    assert torch.all(x[:, :, :2, :] == -1) and torch.all(x[:, :, :, -2:] == -1)  # -1 padding
    assert set(y.unique().tolist()) == set(range(10))


def test_psnr_identical_is_cap_and_decreases_with_noise(real: tuple[torch.Tensor, torch.Tensor]) -> None:
    x = real[0][::625]
    same = M.psnr(x, x.clone())
    assert same.shape == (8,)
    assert torch.all(same == M.PSNR_CAP_DB) and M.PSNR_CAP_DB == 100.0
    p1, p2 = M.psnr(x, _noisy(x, 0.05)), M.psnr(x, _noisy(x, 0.3))
    assert torch.all(p1 < M.PSNR_CAP_DB) and torch.all(p2 < p1)
    # known value: constant error e over the range 2 -> 10 log10(4 / e^2)
    assert M.psnr(x, x + 0.1)[0].item() == pytest.approx(10 * torch.log10(torch.tensor(400.0)).item(), abs=1e-4)


def test_ssim_identical_is_one_and_lower_for_noise(real: tuple[torch.Tensor, torch.Tensor]) -> None:
    x = real[0][::625]
    same = M.ssim(x, x.clone())
    assert same.shape == (8,)
    assert torch.allclose(same, torch.ones(8), atol=1e-6)
    s1, s2 = M.ssim(x, _noisy(x, 0.05)), M.ssim(x, _noisy(x, 0.3))
    assert torch.all(s1 < 1.0) and torch.all(s2 < s1)
    with pytest.raises(ValueError):
        M.ssim(x, x[:, :, :16])


def test_classifier_accuracy_on_real_digits(real: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = real
    net = M.load_digit_classifier()
    assert net is M.load_digit_classifier()  # cached
    assert net.features(x[:4]).shape == (4, 128)
    assert net.predict(x[:4]).shape == (4,)
    # mnist5k.npz is sorted by class (500 each): take every 10th digit, 50 per class
    assert M.class_accuracy(x[5::10], y[5::10]) >= 0.9


def test_frechet_distance(real: tuple[torch.Tensor, torch.Tensor]) -> None:
    feats = M.real_digit_features()
    assert feats.shape == (5000, 128)
    assert M.real_digit_features() is feats  # cached in memory
    a = feats[0::5]  # strided: the file is sorted by class
    assert abs(M.frechet_distance(a, a)) < 1e-3
    assert abs(M.frechet_distance(a.numpy(), a.numpy())) < 1e-3
    noisy = M.classifier_features(_noisy(real[0][0::5], 0.5))
    d_noisy = M.frechet_distance(noisy, a)
    d_real = M.frechet_distance(feats[1::5], a)  # other real digits, same class mix
    assert d_noisy > 1.0 and d_noisy > 5 * d_real
