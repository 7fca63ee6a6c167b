"""The MPT network: reference outputs, parameter counts, pairings, shapes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from helpers import tiny_config
from napari_mpt_deblur import MPT, build_model, load_model
from napari_mpt_deblur.config import ConfigError, MPTConfig
from napari_mpt_deblur.models.mpt import CrossScaleWindowAttention


@pytest.mark.slow
@pytest.mark.parametrize("strip_bytes", [None, 20_000], ids=["as-shipped", "in-strips"])
def test_reference_vectors_reproduced_through_load_model(reference_dir, reference_scales, strip_bytes, monkeypatch):
    if strip_bytes is not None:  # every level in row strips and window chunks
        from napari_mpt_deblur.models import strips

        monkeypatch.setattr(strips, "STRIP_BYTES", strip_bytes)
    model = load_model(reference_dir / "official_tiny_gray.pth", scales=reference_scales)
    assert model.config.pairing == "official"
    assert not model.training
    x = torch.from_numpy(np.load(reference_dir / "official_tiny_gray_input.npy"))
    expected = np.load(reference_dir / "official_tiny_gray_output.npy")
    with torch.no_grad():
        out = model(x).numpy()
    assert out.shape == expected.shape
    assert np.abs(out - expected).max() < 1e-4


@pytest.mark.slow
def test_reference_output_differs_with_the_aligned_pairing(reference_dir, reference_scales):
    """The pairing is a real switch: same weights, other layout, other output."""
    official = load_model(reference_dir / "official_tiny_gray.pth", scales=reference_scales)
    aligned = MPT(official.config.replace(pairing="aligned"))
    aligned.load_state_dict(official.state_dict())
    aligned.eval()
    x = torch.from_numpy(np.load(reference_dir / "official_tiny_gray_input.npy"))
    with torch.no_grad():
        assert (aligned(x) - official(x)).abs().max() > 1e-2


@pytest.mark.parametrize("channels, expected", [(3, 19_799_356), (1, 19_797_916)])
def test_paper_preset_parameter_count(channels, expected):
    model = build_model("paper", channels=channels)
    assert sum(p.numel() for p in model.parameters()) == expected
    assert model.config.size_multiple == 128


def test_lite_preset_has_the_same_structure():
    lite, paper = build_model("lite").config, build_model("paper").config
    assert len(lite.num_blocks) == len(paper.num_blocks) == 4
    assert min(lite.scales[0]) == 1 / 8  # the pyramid reaches as far as the paper's
    assert sum(p.numel() for p in build_model("lite").parameters()) < 2_000_000


@pytest.mark.parametrize("pairing", ["aligned", "official"])
@pytest.mark.parametrize("shape", [(1, 1, 250, 333), (2, 1, 64, 64), (1, 1, 5, 7), (1, 1, 1, 40)])
def test_any_size_round_trips(pairing, shape):
    model = MPT(tiny_config(pairing=pairing)).eval()
    x = torch.rand(shape)
    with torch.no_grad():
        out = model(x)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


def test_padding_does_not_leak_into_the_crop():
    """The visible output of an exact-size input equals that of its padded version's crop."""
    model = MPT(tiny_config()).eval()
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), model(x), atol=0)  # deterministic
        assert model(x[..., :60, :50]).shape == (1, 1, 60, 50)


def test_three_channel_model():
    model = MPT(tiny_config(in_channels=3, out_channels=3)).eval()
    x = torch.rand(1, 3, 48, 80)
    with torch.no_grad():
        assert model(x).shape == x.shape
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.rand(1, 1, 48, 80))


def _name_matched_initialisation(model: MPT) -> None:
    """MPT.reset_parameters as it was before each module initialised its own parameters, kept to compare."""
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.reset_parameters()
    for name, param in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if (param.dim() == 2 and leaf != "relative_position_bias_table") or leaf.endswith("dwconv"):
            torch.nn.init.kaiming_uniform_(param, a=math.sqrt(5))


@pytest.mark.parametrize("pairing", ["aligned", "official"])
def test_initialisation_for_a_seed_is_that_of_the_old_name_matching(pairing, monkeypatch):
    """Each module initialises its own parameters by attribute: for a seed, the weights did not change."""
    config = tiny_config(pairing=pairing, scales=((1 / 4, 1.0), (1 / 2, 1 / 2), (1.0, 1.0), (1.0, 1.0)))
    torch.manual_seed(7)
    model = MPT(config)
    with monkeypatch.context() as patched:  # the constructor alone, then the old procedure
        patched.setattr(MPT, "reset_parameters", lambda self: None)
        torch.manual_seed(7)
        reference = MPT(config)
    constructed = torch.get_rng_state()
    _name_matched_initialisation(reference)
    expected = reference.state_dict()
    assert any(key.endswith("pool_proj") for key in expected)  # blocks at s > 1 too
    assert model.state_dict().keys() == expected.keys()
    assert all(torch.equal(value, expected[key]) for key, value in model.state_dict().items())
    # The constructor draws what it always drew: the default initialisation of its convolutions.
    torch.manual_seed(7)
    for conv in (module for module in reference.modules() if isinstance(module, torch.nn.Conv2d)):
        torch.nn.Conv2d(conv.in_channels, conv.out_channels, 3, bias=False)
    assert torch.equal(torch.get_rng_state(), constructed)
    # reset_parameters re-initialises every parameter, temperatures, bias tables and LayerNorms included.
    with torch.no_grad():
        for param in model.parameters():
            param.normal_()
    torch.set_rng_state(constructed)
    model.reset_parameters()
    assert all(torch.equal(value, expected[key]) for key, value in model.state_dict().items())


def test_fresh_model_is_close_to_identity_and_trains():
    """Global residual: output = input + head(features); gradients reach every parameter."""
    model = MPT(tiny_config())
    x = torch.rand(2, 1, 64, 64)
    out = model(x)
    out.square().mean().backward()
    without_grad = [name for name, p in model.named_parameters() if p.grad is None]
    assert not without_grad


def _corner_probe(pairing: str) -> torch.Tensor:
    """|d output[top-right query window] / d input| of one CSWA at scale 1/2 (no shift)."""
    torch.manual_seed(0)
    attention = CrossScaleWindowAttention(dim=8, heads=2, scale=0.5, window_size=8, shifted=False, pairing=pairing)
    for param in attention.parameters():
        torch.nn.init.normal_(param, std=0.3)
    y = torch.randn(1, 64, 64, 8, requires_grad=True)
    out = attention(y, torch.zeros_like(y))
    out[:, 0:8, 56:64].sum().backward()
    return y.grad.abs().sum(dim=(0, 3))


def test_aligned_pairing_is_local():
    grad = _corner_probe("aligned")
    # The query window (rows 0-7, cols 56-63) pairs with the pooled window covering
    # rows 0-15, cols 48-63; 3x3 depthwise convs add one pooled pixel (2 pixels) of halo.
    inside = torch.zeros_like(grad, dtype=torch.bool)
    inside[0:18, 46:64] = True
    assert grad[inside].sum() > 0
    assert grad[~inside].max() == 0


def test_official_pairing_reads_keys_from_elsewhere():
    grad = _corner_probe("official")
    outside = torch.ones_like(grad, dtype=torch.bool)
    outside[0:18, 46:64] = False
    assert grad[outside].max() > 0
    # Window 7 (raster) pairs with pooled window 7 // 4 = 1, which covers columns 16-31.
    assert grad[0:16, 16:32].sum() > 0


def test_masks_and_layouts_are_built_once_per_size_and_shared():
    from napari_mpt_deblur.models.windows import shift_mask, window_layout

    shift_mask.cache_clear()
    window_layout.cache_clear()
    blocks = [
        CrossScaleWindowAttention(dim=8, heads=2, scale=0.25, window_size=8, shifted=True, pairing="aligned")
        for _ in range(2)
    ]
    with torch.no_grad():
        for block in blocks:
            block(*[torch.randn(1, 64, 64, 8)] * 2)
            block(*[torch.randn(2, 64, 64, 8)] * 2)
        blocks[0](*[torch.randn(1, 128, 64, 8)] * 2)
    # One entry per size, shared by both blocks; every other call was a cache hit.
    assert shift_mask.cache_info().currsize == 2
    assert window_layout.cache_info().currsize == 2
    assert window_layout.cache_info().hits == 3


@pytest.mark.parametrize("pairing", ["aligned", "official"])
@pytest.mark.parametrize("shifted", [False, True])
def test_layout_indices_are_permutations(pairing, shifted):
    from napari_mpt_deblur.models.windows import window_layout

    layout = window_layout(64, 128, 4, 8, shifted, pairing, torch.device("cpu"))
    everything = torch.arange(64 * 128)
    assert torch.equal(layout.queries.sort().values, everything)
    assert torch.equal(layout.output.sort().values, everything)
    assert torch.equal(layout.keys.sort().values, torch.arange(16 * 32))
    if pairing == "aligned":  # the output goes back exactly where each query came from
        assert torch.equal(layout.queries[layout.output], everything)


@pytest.mark.parametrize("pairing", ["aligned", "official"])
@pytest.mark.parametrize("shifted", [False, True])
def test_scale_one_orders_queries_like_keys(pairing, shifted):
    """At scale 1, CSWA projects and gathers Q, K and V together: their orders must agree."""
    from napari_mpt_deblur.models.windows import window_layout

    layout = window_layout(32, 48, 1, 8, shifted, pairing, torch.device("cpu"))
    assert layout.query_groups is None
    assert torch.equal(layout.queries, layout.keys)


@pytest.mark.parametrize("pairing", ["aligned", "official"])
def test_batched_forward_equals_per_sample(pairing):
    model = MPT(tiny_config(heads=(2, 2, 2, 4), pairing=pairing)).eval()
    x = torch.rand(3, 1, 64, 64)
    with torch.no_grad():
        together = model(x)
        apart = torch.cat([model(x[i : i + 1]) for i in range(3)])
    assert (together - apart).abs().max() < 1e-5


@pytest.mark.parametrize("pairing", ["aligned", "official"])
def test_shifted_mask_lets_each_query_see_its_own_region(pairing):
    attention = CrossScaleWindowAttention(dim=8, heads=1, scale=0.25, window_size=8, shifted=True, pairing=pairing)
    mask = attention._shift_mask(16, 16, torch.device("cpu"))
    # 2x2 pooled windows: only the last row and column (windows 1, 2, 3) mix shift regions.
    assert mask.windows.tolist() == [1, 2, 3]
    assert mask.values.shape == (3, 16 * 64, 64)
    # Every masked window masks something, and no query row is masked entirely.
    assert (mask.values < 0).flatten(1).any(dim=1).all()
    assert ((mask.values == 0).sum(-1) > 0).all()


def test_config_json_round_trip_and_validation():
    config = tiny_config(pairing="official")
    assert MPTConfig.from_json(config.to_json()) == config
    with pytest.raises(ConfigError, match="not divisible by heads"):
        tiny_config(heads=(3, 2, 2, 4))
    with pytest.raises(ConfigError, match="one scale per block"):
        tiny_config(scales=((1.0,), (1.0, 1.0), (1.0, 1.0), (1.0, 1.0)))
    with pytest.raises(ConfigError, match="1/2, 1/4"):
        tiny_config(scales=((1 / 3, 1.0), (1.0, 1.0), (1.0, 1.0), (1.0, 1.0)))
    with pytest.raises(ConfigError, match="pairing"):
        tiny_config(pairing="diagonal")
    with pytest.raises(ConfigError, match="unknown field"):
        MPTConfig.from_dict({**config.to_dict(), "depth": 3})
    with pytest.raises(ConfigError, match="global residual"):
        tiny_config(out_channels=3)


@pytest.mark.parametrize("pairing", ["aligned", "official"])
def test_inference_path_equals_training_path(pairing):
    """Without autograd some buffers are reused in place; the result must not change."""
    model = MPT(tiny_config(pairing=pairing))
    x = torch.rand(2, 1, 64, 96)
    with torch.no_grad():
        fast = model(x)
    slow = model(x)
    assert slow.requires_grad
    assert (fast - slow.detach()).abs().max() < 1e-6


@pytest.mark.parametrize("pairing", ["aligned", "official"])
def test_strips_and_window_chunks_equal_whole_maps(pairing, monkeypatch):
    """Without autograd, wide maps go in row strips and attention in window chunks; same result."""
    from napari_mpt_deblur.models import mpt, strips

    # Small strips, so that this small input splits at levels 1-3, into strips of unequal height.
    monkeypatch.setattr(strips, "STRIP_BYTES", 200_000)
    pieces = {"rows": [], "windows": []}

    def recorded(kind, original):
        def recording(*args):
            ranges = original(*args)
            pieces[kind].append(len(ranges))
            return ranges

        return recording

    monkeypatch.setattr(mpt, "row_strips", recorded("rows", mpt.row_strips))
    monkeypatch.setattr(mpt, "window_chunks", recorded("windows", mpt.window_chunks))
    # Level 1 has a plain block at s=4 and a shifted one at s=1; level 2 shifted ones at s=2.
    config = tiny_config(pairing=pairing, scales=((1 / 4, 1.0), (1 / 2, 1 / 2), (1.0, 1.0), (1.0, 1.0)))
    model = MPT(config)
    x = torch.rand(2, 1, 100, 120)
    with torch.no_grad():
        split = model(x)
    assert max(pieces["rows"]) > 1 and max(pieces["windows"]) > 1
    pieces["rows"].clear()
    pieces["windows"].clear()
    whole = model(x)
    assert set(pieces["rows"]) == set(pieces["windows"]) == {1}
    assert (split - whole.detach()).abs().max() < 1e-5


def test_cache_sized_ranges_cover_every_row_once():
    from napari_mpt_deblur.models.strips import STRIP_BYTES, cache_sized_ranges

    like = torch.zeros(1)
    with torch.no_grad():
        ranges = cache_sized_ranges(250, 7 * STRIP_BYTES, like)
        assert len(ranges) == 7
        assert [r.start for r in ranges[1:]] == [r.stop for r in ranges[:-1]]
        assert (ranges[0].start, ranges[-1].stop) == (0, 250)
        assert len({r.stop - r.start for r in ranges[:-1]}) == 1  # equal, but for the last
        assert len(cache_sized_ranges(20, 100 * STRIP_BYTES, like, min_length=8)) == 2  # at least 8 rows each
        assert cache_sized_ranges(250, STRIP_BYTES, like) == [slice(0, 250)]  # too small to split
    assert cache_sized_ranges(250, 7 * STRIP_BYTES, like) == [slice(0, 250)]  # autograd keeps whole maps


def test_sizes_first_seen_in_inference_mode_still_train():
    """Per-size caches built under inference_mode must not poison a later autograd pass."""
    from napari_mpt_deblur.models.windows import shift_mask, window_layout

    shift_mask.cache_clear()
    window_layout.cache_clear()
    model = MPT(tiny_config())
    x = torch.rand(1, 1, 64, 64)
    with torch.inference_mode():
        model(x)
    model(x).mean().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("pairing", ["aligned", "official"])
def test_mixed_precision_autocast_runs(pairing):
    """Autocast (bf16 here on the CPU; fp16/bf16 on GPUs) must not trip over dtypes."""
    model = MPT(tiny_config(pairing=pairing)).eval()
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        reference = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    assert low.shape == x.shape
    assert (low.float() - reference).abs().max() < 0.1
