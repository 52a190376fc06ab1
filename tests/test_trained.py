"""Tests of fx_fastcache.trained (model resolution, loading, the reference sampler)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from fx_fastcache import trained
from fx_fastcache.trained import TrainedModel, load_trained, resolve_model_dir, sample, save_grid


@pytest.fixture(scope="module")
def dit() -> TrainedModel:
    return load_trained("dit-mnist")


def test_resolve_vendored_dit() -> None:
    folder = resolve_model_dir("dit-mnist")
    assert (folder / "config.json").is_file()
    assert folder.parent.name == "assets"
    assert resolve_model_dir(str(folder)) == folder  # a path works too


def test_resolve_missing_name_message() -> None:
    with pytest.raises(FileNotFoundError) as e:
        resolve_model_dir("no-such-model")
    msg = str(e.value)
    assert "no-such-model" in msg and "config.json" in msg and trained.MODELS_ENV in msg


def test_resolve_vendored_pixart_without_shared_folders(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """pixart-mnist ships with the package: no environment variable, cwd or HOME is needed."""
    monkeypatch.delenv(trained.MODELS_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    folder = resolve_model_dir("pixart-mnist")
    assert folder.parent.name == "assets" and (folder / "conditioning.safetensors").is_file()


def test_resolve_other_name_from_env_var(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "my-dit").mkdir()
    (tmp_path / "my-dit" / "config.json").write_text("{}")
    monkeypatch.setenv(trained.MODELS_ENV, str(tmp_path))
    assert resolve_model_dir("my-dit") == tmp_path / "my-dit"
    monkeypatch.setenv(trained.MODELS_ENV, str(tmp_path / "elsewhere"))
    with pytest.raises(FileNotFoundError) as e:
        resolve_model_dir("my-dit")
    assert "'my-dit'" in str(e.value) and str(tmp_path / "elsewhere" / "my-dit") in str(e.value)


def test_load_dit(dit: TrainedModel) -> None:
    assert dit.kind == "dit" and dit.conditioning is None
    assert not dit.model.training
    assert not any(p.requires_grad for p in dit.model.parameters())
    assert dit.dtype == torch.float32 and dit.in_channels == 1 and dit.sample_size == 32
    kw = dit.call_kwargs(torch.zeros(3, 1, 32, 32), 0.5, torch.tensor([1, 2, 10]))
    assert set(kw) == {"hidden_states", "timestep", "class_labels", "return_dict"}
    assert kw["timestep"].shape == (3,) and kw["timestep"].dtype == torch.float32
    assert torch.all(kw["timestep"] == 500.0) and kw["return_dict"] is False


def test_dit_sample_deterministic_and_per_seed(dit: TrainedModel) -> None:
    a = sample(dit, [3, 7], [11, 12], steps=2)
    b = sample(dit, torch.tensor([3, 7]), [11, 12], steps=2)
    assert a.shape == (2, 1, 32, 32) and a.dtype == torch.float32
    assert a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b)
    single = sample(dit, [3], [11], steps=2)
    assert torch.allclose(single[0], a[0], atol=1e-5)
    assert not torch.allclose(a[0], a[1])


def test_sample_drop_in_model_and_callbacks(dit: TrainedModel) -> None:
    calls: list[int] = []
    steps_seen: list[int] = []

    def wrapper(**kwargs: object) -> object:
        calls.append(kwargs["hidden_states"].shape[0])  # type: ignore[union-attr]
        return dit.model(**kwargs)

    ref = sample(dit, [1], [5], steps=2)
    out = sample(dit, [1], [5], steps=2, model=wrapper, on_step=steps_seen.append)
    assert calls == [2, 2]  # batched CFG doubles the batch
    assert steps_seen == [0, 1]
    assert torch.equal(out, ref)
    with pytest.raises(ValueError):
        sample(dit, [1, 2], [5], steps=2)


def test_save_grid(tmp_path: Path) -> None:
    imgs = torch.stack([torch.full((1, 32, 32), v) for v in (-1.0, 0.0, 1.0)])
    path = tmp_path / "grid.png"
    save_grid(imgs, path, nrow=2)
    img = Image.open(path)
    assert img.size == (64, 64) and img.mode == "L"
    assert img.getpixel((0, 0)) == 0 and img.getpixel((40, 0)) == 127
    assert img.getpixel((0, 40)) == 255 and img.getpixel((40, 40)) == 0  # padding


def test_load_vendored_pixart() -> None:
    tm = load_trained("pixart-mnist")
    assert tm.kind == "pixart" and tm.conditioning is not None
    kw = tm.call_kwargs(torch.zeros(2, 1, 32, 32), torch.tensor([0.5, 0.5]), torch.tensor([0, 10]))
    assert kw["encoder_hidden_states"].shape == (2, 4, 256)
    assert kw["added_cond_kwargs"] == {"resolution": None, "aspect_ratio": None}
    a = sample(tm, [4, 9], [0, 1], steps=2)
    single = sample(tm, [4], [0], steps=2)
    assert a.shape == (2, 1, 32, 32)
    assert torch.allclose(single[0], a[0], atol=1e-5)


def test_dit_generates_recognisable_digits(dit: TrainedModel) -> None:
    from fx_fastcache.bench.metrics import class_accuracy

    images = sample(dit, list(range(10)), list(range(100, 110)), steps=6)
    assert class_accuracy(images, list(range(10))) >= 0.8


def test_load_vendored_sd3_and_its_digits() -> None:
    """The third family (trained here): caption tokens and a pooled vector per class, recognisable digits."""
    from fx_fastcache.bench.metrics import class_accuracy

    tm = load_trained("sd3-mnist")
    assert tm.kind == "sd3" and tm.conditioning is not None and tm.pooled is not None
    kw = tm.call_kwargs(torch.zeros(2, 1, 32, 32), torch.tensor([0.5, 0.5]), torch.tensor([0, 10]))
    assert kw["encoder_hidden_states"].shape == (2, 4, 256) and kw["pooled_projections"].shape == (2, 256)
    images = sample(tm, list(range(10)), list(range(100, 110)), steps=8)
    assert class_accuracy(images, list(range(10))) >= 0.8


def test_load_vendored_flux_packs_like_the_reference_and_its_digits() -> None:
    """The fourth family (trained here, ninth session): Flux packs the image into p x p pixel tokens.

    The packing is checked against a patch-by-patch loop, the ids against the reference script's
    layout (row, column in channels 1 and 2), and the sampler against a hand-packed model call.
    """
    from fx_fastcache.bench.metrics import class_accuracy

    tm = load_trained("flux-mnist")
    assert tm.kind == "flux" and tm.pooled is not None and tm.conditioning is not None
    assert tm.in_channels == 1 and tm.sample_size == 32 and tm.patch == 4
    x = torch.randn(2, 1, 32, 32)
    kw = tm.call_kwargs(x, torch.tensor([0.25, 0.5]), torch.tensor([3, 10]))
    tokens = kw["hidden_states"]
    assert tokens.shape == (2, 64, 16)
    for r in (0, 3, 7):
        for c in (0, 5, 7):
            assert torch.equal(tokens[:, r * 8 + c], x[:, 0, 4 * r:4 * r + 4, 4 * c:4 * c + 4].reshape(2, 16))
    assert torch.equal(tm.unpack_output(tokens), x)
    assert torch.equal(kw["timestep"], torch.tensor([0.25, 0.5]))  # Flux multiplies by 1000 itself
    assert kw["img_ids"].shape == (64, 3) and kw["img_ids"][13].tolist() == [0.0, 1.0, 5.0]
    assert kw["txt_ids"].shape == (4, 3) and not kw["txt_ids"].any()
    assert torch.equal(kw["pooled_projections"][1], tm.pooled[10])
    # one Euler step by hand against the sampler
    y = torch.tensor([7])
    x0 = torch.randn((1, 1, 32, 32), generator=torch.Generator().manual_seed(5))
    kw = tm.call_kwargs(torch.cat([x0, x0]), torch.ones(2), torch.tensor([7, 10]))
    v_c, v_u = tm.unpack_output(tm.model(**kw)[0]).chunk(2)
    by_hand = (x0 - (v_u + 2.0 * (v_c - v_u))).clamp(-1, 1)
    assert torch.allclose(sample(tm, y, [5], steps=1), by_hand, atol=1e-5)
    images = sample(tm, list(range(10)), list(range(100, 110)), steps=8)
    assert class_accuracy(images, list(range(10))) >= 0.8


def test_sample_on_given_sigmas_is_the_default_on_uniform_ones() -> None:
    """``sigmas`` (benchmarks/drift_schedules.py's shifted schedules): uniform ones give the default sampler."""
    tm = load_trained("flux-mnist")
    got = sample(tm, [3, 7], [5, 6], steps=3, sigmas=torch.linspace(1.0, 0.0, 4))
    torch.testing.assert_close(got, sample(tm, [3, 7], [5, 6], steps=3))
    with pytest.raises(ValueError, match="give steps \\+ 1 = 4 noise levels"):
        sample(tm, [3], [5], steps=3, sigmas=torch.linspace(1.0, 0.0, 3))


def test_sample_builds_no_autograd_graph(dit: TrainedModel) -> None:
    """A drop-in model with trainable parameters (a training script's live model) samples without recording a
    graph: 20 steps of a large batch would otherwise hold every activation."""
    gain = torch.nn.Parameter(torch.ones(()))

    def trainable(**kwargs: object) -> tuple[torch.Tensor]:
        return (dit.model(**kwargs)[0] * gain,)

    out = sample(dit, [1, 2], [5, 6], steps=2, model=trainable)
    assert not out.requires_grad and out.grad_fn is None
    assert torch.equal(out, sample(dit, [1, 2], [5, 6], steps=2))


def test_wan_kind_samples_one_frame_videos(tmp_path: Path) -> None:
    """A Wan-style model (``WanTransformer3DModel``, the video family) loads as kind ``"wan"``: PixArt's caption
    tokens, the image as a one-frame video (B, C, 1, H, W), the frame axis dropped from its output."""
    from diffusers import WanTransformer3DModel
    from safetensors.torch import save_file

    torch.manual_seed(0)
    m = WanTransformer3DModel(patch_size=(1, 4, 4), num_attention_heads=2, attention_head_dim=12, in_channels=1,
                              out_channels=1, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=64)
    m.save_pretrained(tmp_path / "wan", safe_serialization=True)
    save_file({"txt.weight": torch.randn(11, 4 * 16), "pooled.weight": torch.randn(11, 16)},
              str(tmp_path / "wan" / "conditioning.safetensors"))
    tm = load_trained(str(tmp_path / "wan"))
    assert tm.kind == "wan" and tm.pooled is None and tm.conditioning is not None
    assert tm.in_channels == 1 and tm.sample_size == 32
    x = torch.randn(3, 1, 32, 32)
    kw = tm.call_kwargs(x, 0.5, torch.tensor([1, 2, 10]))
    assert kw["hidden_states"].shape == (3, 1, 1, 32, 32) and torch.equal(kw["hidden_states"][:, :, 0], x)
    assert kw["encoder_hidden_states"].shape == (3, 4, 16) and torch.all(kw["timestep"] == 500.0)
    assert torch.equal(kw["encoder_hidden_states"][2], tm.conditioning[10].view(4, 16))
    out = tm.unpack_output(tm.model(**kw)[0])
    assert out.shape == (3, 1, 32, 32)
    imgs = sample(tm, [1, 2], [5, 6], steps=2)
    assert imgs.shape == (2, 1, 32, 32) and torch.isfinite(imgs).all()


def test_load_vendored_wan_and_its_digits() -> None:
    """The fifth family (trained here, thirtieth session): Wan, the video family, on one-frame videos."""
    from fx_fastcache.bench.metrics import class_accuracy

    tm = load_trained("wan-mnist")
    assert tm.kind == "wan" and tm.conditioning is not None and tm.pooled is None
    assert type(tm.model).__name__ == "WanTransformer3DModel" and tm.sample_size == 32
    images = sample(tm, list(range(10)), list(range(100, 110)), steps=8)
    assert class_accuracy(images, list(range(10))) >= 0.8
