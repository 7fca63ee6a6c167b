"""The Multi-Pyramid Transformer (MPT) for defocus deblurring, as the paper draws it.

Top to bottom: the two attentions (ISCA and CSWA), the FEFN feed-forward, the
pyramid sub-block, the stage, the down- and upsampling, and the U-shaped
network, whose :meth:`MPT.forward` is the one place where the input is padded
and the output cropped. ``docs/architecture.md`` maps each part to the paper
and lists where the computation departs from the reference code.

Feature maps inside a stage are ``(B, H, W, C)`` token tensors; the token
operations on them are in :mod:`.ops`, CSWA's window layouts and shift masks in
:mod:`.windows`, and the CPU's strip-by-strip execution of wide maps (the same
arithmetic, cache-sized pieces) in :mod:`.strips`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import MPTConfig
from .blur_width import BlurWidthEstimator, widen
from .ops import (
    batch_rows,
    depthwise_conv3x3,
    gather_tokens,
    inference_only,
    pointwise,
    pointwise_depthwise,
    project_add,
    stack,
    to_nchw,
    to_tokens,
)
from .strips import assemble_rows, row_strips, window_chunks
from .windows import ShiftMask, WindowLayout, relative_position_index, shift_mask, window_layout


def init_projection(weight: Tensor) -> None:
    """PyTorch's default for a linear layer's or a conv's weight, as the reference code's layers get."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


# --------------------------------------------------------------------------- attention


class IntraScaleChannelAttention(nn.Module):
    """ISCA: transposed (channel) attention over the whole map of a level.

        Q, K, V = dw3x3(W_qkv y)
        ISCA(y) = W_out (V softmax(tau * norm(Q)^T norm(K)))    per head

    Q and K are L2-normalised over the H*W axis; each head forms a (C/heads)^2
    attention map. The map is global, so the output depends on the tile size.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.temperature = nn.Parameter(torch.ones(heads))
        self.to_qkv = nn.Parameter(torch.empty(3 * dim, dim))  # rows: Q (C), K (C), V (C)
        self.qkv_dwconv = nn.Parameter(torch.empty(3 * dim, 1, 3, 3))
        self.project_out = nn.Parameter(torch.empty(dim, dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.temperature)
        init_projection(self.to_qkv)
        init_projection(self.qkv_dwconv)
        init_projection(self.project_out)

    def forward(self, y: Tensor, residual: Tensor) -> Tensor:
        """residual + ISCA(y), both (B, H, W, C)."""
        b, h, w, c = y.shape
        heads, d = self.heads, c // self.heads
        strips = row_strips(y, 2 * c)
        # A whole map gets Q, K and V in one projection; in strips, V waits for pass 2.
        first_rows = 3 * c if len(strips) == 1 else 2 * c
        to_first, first_dwconv = self.to_qkv[:first_rows], self.qkv_dwconv[:first_rows]
        # Pass 1, strip by strip: Q^T K and the squared norms of Q's and K's channels.
        # Normalising Q and K over H*W only rescales rows/columns of Q^T K, so the
        # small (d x d) product is rescaled instead of the two full maps.
        squares = y.new_zeros(b, 2 * c)
        products = y.new_zeros(b, heads, d, d)
        for strip in strips:
            first = pointwise_depthwise(y, to_first, first_dwconv, strip).reshape(b, -1, first_rows)
            n = first.shape[1]
            squares = squares + first[..., : 2 * c].square().sum(dim=1)  # Q and K in one pass
            qh = first[..., :c].reshape(b, n, heads, d).permute(0, 2, 3, 1)  # (B, heads, d, n)
            kh = first[..., c : 2 * c].reshape(b, n, heads, d).permute(0, 2, 1, 3)  # (B, heads, n, d)
            products = products + qh @ kh
        # clamp before the root: sqrt's gradient at 0 is infinite, and 0 * inf made every gradient NaN
        # for a constant (blank) patch; the values are those of max(norm, 1e-12), as F.normalize's
        norms = squares.clamp_min(1e-24).sqrt()
        q_norm = norms[:, :c].reshape(b, heads, d, 1)
        k_norm = norms[:, c:].reshape(b, heads, 1, d)
        attn = (products / (q_norm * k_norm) * self.temperature.view(1, -1, 1, 1)).softmax(dim=-1)
        # out = project_out(attn @ V) == V @ (project_out @ blockdiag(attn))^T: one GEMM on the map.
        mixing = torch.zeros(b, c, c, dtype=attn.dtype, device=attn.device)
        for head in range(heads):
            rows = slice(head * d, (head + 1) * d)
            mixing[:, rows, rows] = attn[:, head]
        mixing = self.project_out @ mixing

        def mix_values(strip: slice) -> Tensor:  # pass 2
            if len(strips) == 1:
                v = first[..., 2 * c :]
            else:
                v = pointwise_depthwise(y, self.to_qkv[2 * c :], self.qkv_dwconv[2 * c :], strip)
            part = residual[:, strip]
            if b == 1:
                return project_add(part, v, mixing[0])
            return torch.baddbmm(part.reshape(b, -1, c), v.reshape(b, -1, c), mixing.transpose(1, 2)).view(part.shape)

        return assemble_rows(strips, mix_values)


class CrossScaleWindowAttention(nn.Module):
    """CSWA at scale r: full-resolution windows attend to windows of a pooled map.

        a = AvgPool_s(y) + W_pool AvgPool_s(y)              (s = 1/r; at s = 1, a = y)
        Q = dw3x3(W_q y),  K, V = dw3x3(W_kv a)
        CSWA(y) = W_out (softmax(tau * norm(Q) norm(K)^T + B + M) V)    per window and head

    with Swin's relative position bias B and, in shifted blocks, the -100 mask M
    between tokens of different shift regions. Each 8x8 query window reads one
    8x8 window of the pooled map, so its keys cover an (8s x 8s) region.
    ``pairing`` decides which pooled window a query window reads (see
    ``docs/architecture.md``). All s^2 query windows that share a pooled window
    are batched into one attention call of s^2*64 queries against 64 keys.

    The forward pass has three paths, one per way of forming Q, K and V:
    s = 1 (one projection for all three), ``aligned`` at s > 1 (Q on the full
    map) and ``official`` at s > 1 (Q on the reference code's group images).
    :meth:`_queries_and_keys` forms what the windows read from, once per map;
    :meth:`_gather_windows` takes one chunk of windows' Q, K and V from it.
    """

    def __init__(self, dim: int, heads: int, scale: float, window_size: int, shifted: bool, pairing: str) -> None:
        super().__init__()
        self.heads = heads
        self.stride = int(round(1 / scale))  # s
        self.window_size = window_size
        self.shifted = shifted
        self.pairing = pairing
        self.temperature = nn.Parameter(torch.ones(heads))
        self.to_q = nn.Parameter(torch.empty(dim, dim))
        self.q_dwconv = nn.Parameter(torch.empty(dim, 1, 3, 3))
        self.to_kv = nn.Parameter(torch.empty(2 * dim, dim))
        self.kv_dwconv = nn.Parameter(torch.empty(2 * dim, 1, 3, 3))
        self.pool_proj = nn.Parameter(torch.empty(dim, dim)) if self.stride > 1 else None
        self.project_out = nn.Parameter(torch.empty(dim, dim))
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, heads))
        self.register_buffer("relative_position_index", relative_position_index(window_size), persistent=False)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.temperature)
        init_projection(self.to_q)
        init_projection(self.q_dwconv)
        init_projection(self.to_kv)
        init_projection(self.kv_dwconv)
        if self.pool_proj is not None:
            init_projection(self.pool_proj)
        init_projection(self.project_out)
        nn.init.zeros_(self.relative_position_bias_table)

    def forward(self, y: Tensor, residual: Tensor) -> Tensor:
        """residual + CSWA(y), both (B, H, W, C)."""
        b, h, w, c = y.shape
        s, ws = self.stride, self.window_size
        hp, wp = h // s, w // s
        layout = window_layout(h, w, s, ws, self.shifted, self.pairing, y.device)
        queries, keys = self._queries_and_keys(y, layout)
        bias = self._position_bias().repeat(1, s * s, 1)  # every query sub-window uses the window's bias
        mask = self._shift_mask(hp, wp, y.device)

        n_queries = s * s * ws * ws  # per pooled window
        chunks = window_chunks(y, hp * wp // ws**2, n_queries * ws * ws)
        if len(chunks) == 1:
            out = gather_tokens(self._attend_projected(queries, keys, layout, chunks[0], bias, mask), layout.output)
        else:
            # Each chunk's logits stay in cache; its outputs go straight to their place in the map.
            out = y.new_empty(b * h * w, c)
            for windows in chunks:
                rows = batch_rows(layout.output_rows[windows.start * n_queries : windows.stop * n_queries], b, h * w)
                chunk_mask = mask.restricted_to(windows) if mask is not None else None
                attended = self._attend_projected(queries, keys, layout, windows, bias, chunk_mask)
                out.index_copy_(0, rows, attended.reshape(-1, c))
        return out.view(residual.shape).add_(residual)

    def _queries_and_keys(self, y: Tensor, layout: WindowLayout) -> tuple[Tensor, Tensor | None]:
        """What the windows' queries and keys are gathered from: a (B, H, W, *) map, and K, V or None.

        - s = 1: Q, K and V of the map, (B, H, W, 3C), and None. They come from the
          same map in the same token order, so one projection, one depthwise conv
          and one gather per chunk serve all three.
        - s > 1: the map the queries come from, and K, V of the pooled map
          ``a + W_pool a`` already in window order, (B, nWp*64, 2C). That map is
          Q itself, (B, H, W, C), in the ``aligned`` pairing (its 3x3 conv runs
          on the true map); in ``official`` it is ``y``, whose Q is formed chunk
          by chunk on the group images (:meth:`_official_queries`).
        """
        b, h, w, c = y.shape
        s = self.stride
        if s == 1:
            to_qkv, qkv_dwconv = torch.cat([self.to_q, self.to_kv]), torch.cat([self.q_dwconv, self.kv_dwconv])
            return _projected_in_strips(y, to_qkv, qkv_dwconv), None
        pooled = F.avg_pool2d(to_nchw(y), kernel_size=s, stride=s).permute(0, 2, 3, 1)
        pooled = pooled + pointwise(pooled, self.pool_proj)
        kv = depthwise_conv3x3(pointwise(pooled, self.to_kv), self.kv_dwconv)
        kv = gather_tokens(kv.reshape(b, (h // s) * (w // s), 2 * c), layout.keys)
        if self.pairing == "official":
            return y, kv
        return _projected_in_strips(y, self.to_q, self.q_dwconv), kv

    def _gather_windows(
        self, queries: Tensor, keys: Tensor | None, layout: WindowLayout, windows: slice
    ) -> tuple[Tensor, Tensor]:
        """Q (B, n*s^2*64, C) and K, V (B, n*64, 2C) of the n pooled windows ``windows``."""
        b, h, w, width = queries.shape
        ws, n_queries = self.window_size, self.stride**2 * self.window_size**2
        order = layout.queries[windows.start * n_queries : windows.stop * n_queries]
        if self.stride == 1:  # Q, K and V in one gather
            c = width // 3
            return gather_tokens(queries.reshape(b, h * w, width), order).split([c, 2 * c], dim=-1)
        kv = keys[:, windows.start * ws * ws : windows.stop * ws * ws]
        if self.pairing == "official":
            return self._official_queries(queries, layout, windows, order), kv
        return gather_tokens(queries.reshape(b, h * w, width), order), kv

    def _official_queries(self, y: Tensor, layout: WindowLayout, windows: slice, order: Tensor) -> Tensor:
        """Official pairing, s > 1: Q of the pooled windows ``windows``, (B, n*s^2*64, C) in query order.

        Q's projection and 3x3 conv run on the s^2 group images, and only on the
        consecutive ones that these windows read.
        """
        b, h, w, c = y.shape
        s, ws = self.stride, self.window_size
        hp, wp = h // s, w // s
        group_pixels, group_windows = hp * wp, hp * wp // ws**2
        # Query window m = g * group_windows + p reads pooled window m // s^2.
        first = windows.start * s * s // group_windows
        stop = -(-windows.stop * s * s // group_windows)
        pixels = layout.query_groups[first * group_pixels : stop * group_pixels]
        groups = gather_tokens(y.reshape(b, h * w, c), pixels).view(b * (stop - first), hp, wp, c)
        q = depthwise_conv3x3(pointwise(groups, self.to_q), self.q_dwconv).reshape(b, -1, c)
        return gather_tokens(q, order - first * group_pixels)

    def _attend_projected(
        self,
        queries: Tensor,
        keys: Tensor | None,
        layout: WindowLayout,
        windows: slice,
        bias: Tensor,
        mask: ShiftMask | None,
    ) -> Tensor:
        """W_out(attention) of the pooled windows ``windows``, (B, tokens, C) in query order.

        The projection is per token, so it runs here, on outputs still in cache,
        before they are put back in map order.
        """
        attended = self._attend(*self._gather_windows(queries, keys, layout, windows), bias, mask)
        return pointwise(attended.unsqueeze(2), self.project_out).view(attended.shape)

    def _attend(self, q: Tensor, kv: Tensor, bias: Tensor, mask: ShiftMask | None) -> Tensor:
        """Cosine attention in n pooled windows: (B, n*s^2*64, C) queries, (B, n*64, 2C) keys and values.

        ``bias`` is (heads, s^2*64, 64), the relative position bias of every query sub-window.
        """
        b, c = q.shape[0], q.shape[-1]
        heads, ws, s = self.heads, self.window_size, self.stride
        d = c // heads
        n_windows = kv.shape[1] // (ws * ws)
        # Unit q and k per head, the temperature folded into q's scale.
        q = q.view(b, n_windows, s * s * ws * ws, heads, d)
        k, v = kv.reshape(b, n_windows, ws * ws, 2, heads, d).unbind(dim=3)
        q = q * (self.temperature.view(heads, 1) / torch.linalg.vector_norm(q, dim=-1, keepdim=True).clamp_min(1e-12))
        k = k / torch.linalg.vector_norm(k, dim=-1, keepdim=True).clamp_min(1e-12)
        per_sample = []
        for sample in range(b):
            per_head = []
            for head in range(heads):
                # The bias enters the logits GEMM as its addend: one pass fewer than adding it after.
                logits = torch.baddbmm(bias[head], q[sample, :, :, head], k[sample, :, :, head].transpose(1, 2))
                if mask is not None:  # only the windows on the wrap-around border hold masked pairs
                    logits.index_add_(0, mask.windows, mask.values.to(logits.dtype))
                if inference_only(logits):
                    attention = torch.softmax(logits, dim=-1, out=logits)
                else:
                    attention = logits.softmax(dim=-1)
                per_head.append(torch.bmm(attention, v[sample, :, :, head]))
            per_sample.append(stack(per_head, dim=2))
        return stack(per_sample, dim=0).view(b, -1, c)  # (B, n*s^2*64, C)

    def _position_bias(self) -> Tensor:
        """(heads, ws*ws, ws*ws): Swin's relative position bias B of one window."""
        n = self.window_size**2
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(n, n, self.heads).permute(2, 0, 1)

    def _shift_mask(self, hp: int, wp: int, device: torch.device) -> ShiftMask | None:
        """The shifted layout's mask M (None when not shifted)."""
        if not self.shifted:
            return None
        return shift_mask(hp, wp, self.stride, self.window_size, self.pairing, device)


def _projected_in_strips(y: Tensor, weight: Tensor, dw_weight: Tensor) -> Tensor:
    """dw3x3(W y) of a (B, H, W, C) map, computed in row strips on the CPU: (B, H, W, len(W))."""
    return assemble_rows(row_strips(y, weight.shape[0]), lambda rows: pointwise_depthwise(y, weight, dw_weight, rows))


# --------------------------------------------------------------------------- block


class FrequencyEnhancedFFN(nn.Module):
    """FEFN: the channel-context branch is activated and gates the spatial branch.

        FEFN(u, v) = W_out (GELU(dw3x3(W_in u)) * (W_v v))

    with a hidden width of int(C * expansion).
    """

    def __init__(self, dim: int, expansion: float) -> None:
        super().__init__()
        hidden = int(dim * expansion)
        self.context_in = nn.Parameter(torch.empty(hidden, dim))
        self.context_dwconv = nn.Parameter(torch.empty(hidden, 1, 3, 3))
        self.spatial_in = nn.Parameter(torch.empty(hidden, dim))
        self.project_out = nn.Parameter(torch.empty(dim, hidden))

    def reset_parameters(self) -> None:
        init_projection(self.context_in)
        init_projection(self.context_dwconv)
        init_projection(self.spatial_in)
        init_projection(self.project_out)

    def forward(self, x0: Tensor, x1: Tensor, norm0: nn.Module, norm1: nn.Module) -> Tensor:
        """x0 + FEFN(norm0(x0), norm1(x1)), all (B, H, W, C).

        The norms are applied here, strip by strip with the rest, so that their
        outputs are never written out whole.
        """

        def compute(strip: slice) -> Tensor:
            hidden = pointwise_depthwise(x0, self.context_in, self.context_dwconv, strip, norm=norm0)
            gate = pointwise(norm1(x1[:, strip]), self.spatial_in)
            if inference_only(hidden):  # reuse the wide hidden map instead of allocating two more
                gated = torch.ops.aten.gelu_(hidden).mul_(gate)
            else:
                gated = F.gelu(hidden) * gate
            return project_add(x0[:, strip], gated, self.project_out)

        return assemble_rows(row_strips(x0, self.context_in.shape[0]), compute)


class PyramidSubBlock(nn.Module):
    """x0 = x + ISCA(LN1 x); x1 = x + CSWA_r(LN1 x); out = x0 + FEFN(LN2a x0, LN2b x1)."""

    def __init__(
        self, dim: int, heads: int, scale: float, window_size: int, shifted: bool, expansion: float, pairing: str
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.isca = IntraScaleChannelAttention(dim, heads)
        self.cswa = CrossScaleWindowAttention(dim, heads, scale, window_size, shifted, pairing)
        self.norm2a = nn.LayerNorm(dim, eps=1e-5)
        self.norm2b = nn.LayerNorm(dim, eps=1e-5)
        self.ffn = FrequencyEnhancedFFN(dim, expansion)

    def reset_parameters(self) -> None:
        for layer in (self.norm1, self.isca, self.cswa, self.norm2a, self.norm2b, self.ffn):
            layer.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm1(x)
        x0 = self.isca(y, residual=x)
        x1 = self.cswa(y, residual=x)
        return self.ffn(x0, x1, self.norm2a, self.norm2b)


class Stage(nn.Sequential):
    """The blocks of one level; block i uses shifted windows when i is odd."""

    def __init__(self, dim: int, heads: int, scales: tuple[float, ...], config: MPTConfig) -> None:
        super().__init__(
            *(
                PyramidSubBlock(dim, heads, r, config.window_size, i % 2 == 1, config.ffn_expansion, config.pairing)
                for i, r in enumerate(scales)
            )
        )

    def reset_parameters(self) -> None:
        for block in self:
            block.reset_parameters()


class Downsample(nn.Module):
    """conv3x3 w -> w/2, then PixelUnshuffle(2): width doubles, size halves."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim // 2, 3, padding=1, bias=False)

    def reset_parameters(self) -> None:
        self.conv.reset_parameters()

    def forward(self, tokens: Tensor) -> Tensor:
        return to_tokens(F.pixel_unshuffle(self.conv(to_nchw(tokens)), 2))


class Upsample(nn.Module):
    """conv3x3 w -> 2w, then PixelShuffle(2): width halves, size doubles."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim * 2, 3, padding=1, bias=False)

    def reset_parameters(self) -> None:
        self.conv.reset_parameters()

    def forward(self, tokens: Tensor) -> Tensor:
        return to_tokens(F.pixel_shuffle(self.conv(to_nchw(tokens)), 2))


# --------------------------------------------------------------------------- network


def blur_features(sigma_px: Tensor) -> Tensor:
    """(B,) blur widths in pixels, NaN where unknown -> (B, 3): known, known * log(1 + sigma), known * sigma / 8."""
    known = torch.isfinite(sigma_px).to(torch.float32)
    sigma = torch.nan_to_num(sigma_px.to(torch.float32), nan=0.0).clamp(min=0.0)
    return torch.stack([known, known * torch.log1p(sigma), known * sigma / 8], dim=-1)


class BlurModulation(nn.Module):
    """Per-channel scale and shift of each stage's input, from the blur's width (feature-wise modulation).

    The width is the sigma, in pixels, of the Gaussian with the PSF's 80 %-encircled-energy
    radius (the width Richardson-Lucy with a Gaussian is given). A small MLP maps
    :func:`blur_features` to ``(1 + scale, shift)`` for the seven stages (encoders, latent,
    decoders). Its last layer starts at zero, so a network given the modulation deblurs
    exactly as before until it is trained with widths; an unknown width (NaN) has its own
    learned modulation, so the network still deblurs without one. With ``MPTConfig.width_margin``
    it receives the width widened (:meth:`MPT.forward`).
    """

    def __init__(self, stage_widths: tuple[int, ...], hidden: int = 64) -> None:
        super().__init__()
        self.stage_widths = tuple(stage_widths)
        self.embed = nn.Linear(3, hidden)
        self.project = nn.Linear(hidden, 2 * sum(self.stage_widths))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.embed.reset_parameters()
        nn.init.zeros_(self.project.weight)
        nn.init.zeros_(self.project.bias)

    def forward(self, sigma_px: Tensor) -> list[tuple[Tensor, Tensor]]:
        """(B,) widths -> one ``(scale, shift)`` pair of (B, 1, 1, C) per stage, for token maps."""
        film = self.project(F.gelu(self.embed(blur_features(sigma_px))))
        pairs, start = [], 0
        for width in self.stage_widths:
            scale, shift = film[:, start : start + width], film[:, start + width : start + 2 * width]
            pairs.append((scale[:, None, None, :], shift[:, None, None, :]))
            start += 2 * width
        return pairs


def modulate(features: Tensor, pair: tuple[Tensor, Tensor] | None) -> Tensor:
    """``features * (1 + scale) + shift`` for a stage's (B, H, W, C) input; unchanged without a pair."""
    if pair is None:
        return features
    scale, shift = pair
    return features * (1 + scale.to(features.dtype)) + shift.to(features.dtype)


class MPT(nn.Module):
    """Multi-Pyramid Transformer: a 4-level U-shape of pyramid sub-blocks.

    Maps (B, in_channels, H, W) float images to the same shape. Any H and W are
    accepted: the input is reflect-padded to ``config.size_multiple`` and the
    output cropped back, in :meth:`forward` only. With ``config.blur_conditioned``
    it also takes the blur's width (:class:`BlurModulation`).
    """

    def __init__(self, config: MPTConfig) -> None:
        super().__init__()
        self.config = config
        widths = [config.dim * 2**level for level in range(4)]
        self.stem = nn.Conv2d(config.in_channels, config.dim, 3, padding=1, bias=False)
        self.encoders = nn.ModuleList(
            Stage(widths[level], config.heads[level], config.scales[level], config) for level in range(3)
        )
        self.downsamples = nn.ModuleList(Downsample(widths[level]) for level in range(3))
        self.latent = Stage(widths[3], config.heads[3], config.scales[3], config)
        # Deepest first: upsamples[0] goes from the latent to level 3.
        self.upsamples = nn.ModuleList(Upsample(widths[level]) for level in (3, 2, 1))
        self.decoders = nn.ModuleList(
            Stage(widths[level], config.heads[level], config.scales[level], config) for level in (2, 1, 0)
        )
        self.head = nn.Conv2d(config.dim, config.out_channels, 3, padding=1, bias=False)
        stage_widths = (*widths[:3], widths[3], *widths[2::-1])  # encoders, latent, decoders
        self.blur_modulation = BlurModulation(stage_widths) if config.blur_conditioned else None
        self.blur_estimator = BlurWidthEstimator() if config.blur_estimator else None
        self.milder_blur: MilderBlur | None = None
        """The network for planes less blurred than any this one learned from, or None (this one for all)."""
        self.reset_parameters()

    def network_for(self, blur_sigma_px: float | None) -> MPT:
        """The network that deblurs a plane of this blur width (:class:`MilderBlur`): this one, or the milder-blur one.

        None (no width known) is this network's.
        """
        milder = self.milder_blur
        return milder.network if milder is not None and milder.takes(blur_sigma_px) else self

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 (nn.Module's signature)
        # .to(), .half() and the like reach the milder-blur network too: it is not a submodule (not trained, not in
        # this network's state_dict), so nn.Module would leave it behind
        super()._apply(fn, recurse)
        if self.milder_blur is not None:
            self.milder_blur.network._apply(fn, recurse)
        return self

    def reset_parameters(self) -> None:
        """Initialise like the reference code: PyTorch's defaults for convs, linears and LayerNorms.

        The convolutions first, then the blocks in the network's order: that order of
        random draws gives the same weights for a given ``torch.manual_seed`` as
        every earlier version (``tests/test_model.py`` checks it).
        """
        for layer in (self.stem, *self.downsamples, *self.upsamples, self.head):
            layer.reset_parameters()
        for stage in (*self.encoders, self.latent, *self.decoders):
            stage.reset_parameters()
        if self.blur_modulation is not None:  # last: the unconditioned network's draws stay as they were
            self.blur_modulation.reset_parameters()
        # the estimator's own draws happen at its construction; it is trained apart (training.blur_width)

    def forward(self, x: Tensor, blur_sigma_px: float | Tensor | None = None) -> Tensor:
        """Deblur ``x`` (B, C, H, W); ``blur_sigma_px``: the blur's width, one for all or (B,).

        None: the network's own estimate of each image's width when it has a
        :class:`~.blur_width.BlurWidthEstimator`, else unknown; NaN: unknown (the network judges the blur itself).
        A given or estimated width is read widened by ``config.width_margin`` (:func:`~.blur_width.widen`).
        """
        if x.dim() != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"expected a (B, {self.config.in_channels}, H, W) tensor, got shape {tuple(x.shape)}")
        pairs = self._stage_modulation(blur_sigma_px, x)
        height, width = x.shape[-2:]
        x = pad_to_multiple(x, self.config.size_multiple)
        skips = []
        features = to_tokens(self.stem(x))
        for encoder, downsample, pair in zip(self.encoders, self.downsamples, pairs[:3]):
            features = encoder(modulate(features, pair))
            skips.append(features)
            features = downsample(features)
        features = self.latent(modulate(features, pairs[3]))
        for upsample, decoder, skip, pair in zip(self.upsamples, self.decoders, reversed(skips), pairs[4:]):
            features = decoder(modulate(upsample(features) + skip, pair))
        out = self.head(to_nchw(features)) + x
        return out[..., :height, :width].contiguous(memory_format=torch.contiguous_format)

    def _stage_modulation(self, blur_sigma_px: float | Tensor | None, x: Tensor) -> list:
        """Seven ``(scale, shift)`` pairs, or seven ``None`` for a network without :class:`BlurModulation`."""
        if self.blur_modulation is None:
            if blur_sigma_px is not None:
                raise ValueError("this network takes no blur width (its architecture is not blur_conditioned)")
            return [None] * 7
        if blur_sigma_px is None:
            # the estimate is detached: the estimator learns the width alone (training.blur_width), not from deblurring
            blur_sigma_px = float("nan") if self.blur_estimator is None else self.blur_estimator(x).detach()
        sigma = torch.as_tensor(blur_sigma_px, dtype=torch.float32, device=x.device).reshape(-1)
        if sigma.numel() == 1:
            sigma = sigma.expand(x.shape[0])
        if sigma.numel() != x.shape[0]:
            raise ValueError(f"need one blur width or one per image ({x.shape[0]}), got {sigma.numel()}")
        if self.config.width_margin != 1.0:
            sigma = widen(sigma, self.config.width_margin)  # NaN (unknown) stays NaN
        return self.blur_modulation(sigma)


@dataclass
class MilderBlur:
    """A second network for planes less blurred than any a fine-tune learned from.

    A fine-tune on a stack with no plane in focus learns the blur from its sharpest planes up, with the starting
    model's deblurring as targets; on milder blur it has nothing to learn from, and there it can only lose against
    the model it started from (experiment 20 in docs/benchmarks.md). So the fine-tuned model keeps the starting
    network for planes whose blur width (the estimator's, or the one given) is below ``below_width``.

    Attributes
    ----------
    network
        The network for those planes, in eval mode (the starting model, whose own milder-blur network is dropped).
    below_width
        Blur width (pixels, as :class:`~.blur_width.BlurWidthEstimator` judges it) under which it is used.
    """

    network: MPT
    below_width: float

    def takes(self, blur_sigma_px: float | None) -> bool:
        """Whether a plane of this blur width (None: not known) is this network's."""
        return blur_sigma_px is not None and blur_sigma_px < self.below_width


def pad_to_multiple(x: Tensor, multiple: int) -> Tensor:
    """Reflect-pad the bottom/right of (B, C, H, W) up to multiples of ``multiple`` (:meth:`MPT.forward`'s padding).

    Reflection needs a pad smaller than the side, so small images are reflected
    repeatedly (a mirror of the mirror) until the size is reached.
    """
    while True:
        h, w = x.shape[-2:]
        pad_h, pad_w = (-h) % multiple, (-w) % multiple
        if not pad_h and not pad_w:
            return x
        step_h, step_w = min(pad_h, h - 1), min(pad_w, w - 1)
        if (pad_h and step_h < 1) or (pad_w and step_w < 1):  # a 1-pixel side cannot reflect
            return F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        x = F.pad(x, (0, step_w, 0, step_h), mode="reflect")
