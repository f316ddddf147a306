"""Quantized replacements of nn.Conv2d and nn.Linear.

They hold integer codes, scales and points per output channel (a
``QuantizedWeight``) as buffers, a float bias, and optionally an OCS input-channel
index and per-tensor activation fake quantization of the input.

Two equivalent forwards (``mode``):

* ``'dequant'`` (default): the dequantized float weight (cached lazily, per dtype
  and device) in one ordinary conv / linear.
* ``'expanded'`` (common operands): ordinary convs / linears whose weights are the
  integer codes (as floats), then a per-row scale and a fixed segment sum of each
  channel's rows. Dense layers: ONE conv / linear with sum_j n_j output channels.
  Grouped and depthwise convs: one grouped conv per point level (``quant.levels``):
  the layer's own conv for the first points, then for each level k >= 1 a grouped
  conv over only the groups that have (k+1)-th points (their input channels
  gathered), padded with zero rows within those groups only; a depthwise conv so
  runs exactly sum_j n_j rows.

Activation quantization (``act_bits``): before the layer, x is fake-quantized per
tensor. Symmetric: step = max(|min|, |max|) / (2**(b-1) - 1), codes in
-(2**(b-1)-1)..2**(b-1)-1. Asymmetric: step = (max - min) / (2**b - 1), zero point
round(-min / step), codes in 0..2**b-1 (``quant.act_ranges.fake_quant``). Calibrate
with ``set_act_range(lo, hi)``: the model pass chooses each layer's range on the
calibration images (``quant.act_ranges``), and its bits may differ per layer.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .quant.act_ranges import fake_quant
from .quant.grid import act_qparams, check_bits
from .quant.levels import point_levels
from .quant.multipoint import QuantizedWeight

MODES = ('dequant', 'expanded')
_QBUFS = ('codes', 'scales', 'npoints', 'in_index')


class _QuantBase(nn.Module):
    """Shared buffers, caches, activation quantization and state_dict handling."""

    def _init_quant(self, qw: QuantizedWeight, bias: Tensor | None,
                    in_index: Tensor | None, act_bits: int | None,
                    act_symmetric: bool):
        qw.validate()
        self.bits = qw.bits
        self.grid = qw.grid
        self.register_buffer('codes', qw.codes.detach().clone().to(torch.int8))
        self.register_buffer('scales', qw.scales.detach().clone().float())
        self.register_buffer('npoints', qw.npoints.detach().clone().to(torch.int64))
        if in_index is not None:
            in_index = torch.as_tensor(in_index, dtype=torch.int64).detach().clone()
        self.register_buffer('in_index', in_index)
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone().float(), requires_grad=False)
        else:
            self.bias = None
        self.act_bits = None if act_bits is None else check_bits(act_bits, 'act_bits')
        self.act_symmetric = bool(act_symmetric)
        self.register_buffer('act_scale', torch.zeros(()))
        self.register_buffer('act_zero', torch.zeros(()))
        self._mode = 'dequant'
        self._cache = None

    # ------------------------------------------------------------- settings
    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str):
        if value not in MODES:
            raise ValueError(f'mode must be one of {list(MODES)}, got {value!r}')
        self._mode = value

    def quantized_weight(self) -> QuantizedWeight:
        return QuantizedWeight(self.codes.cpu(), self.scales.cpu(),
                               self.npoints.cpu(), self.bits, self.grid)

    def set_act_range(self, min_val: float, max_val: float,
                      act_bits: int | None = None, symmetric: bool | None = None):
        """Calibrate input fake quantization from the observed range [min, max]."""
        if act_bits is not None:
            self.act_bits = check_bits(act_bits, 'act_bits')
        if symmetric is not None:
            self.act_symmetric = bool(symmetric)
        if self.act_bits is None:
            raise ValueError('act_bits must be set (2..8) before set_act_range')
        lo, hi = float(min_val), float(max_val)
        if not (lo <= hi) or lo != lo or hi != hi or abs(lo) == float('inf') \
                or abs(hi) == float('inf'):
            raise ValueError(f'act range must be finite with min <= max, got '
                             f'({min_val}, {max_val})')
        step, zero = act_qparams(lo, hi, self.act_bits, self.act_symmetric)
        self.act_scale.fill_(step)
        self.act_zero.fill_(zero)

    def _act_quant(self, x: Tensor) -> Tensor:
        if self.act_bits is None:
            return x
        if not getattr(self, '_act_checked', False):
            if float(self.act_scale) <= 0:
                raise RuntimeError('act_bits is set but the activation range is not '
                                   'calibrated: call set_act_range(min, max)')
            self._act_checked = True
        return fake_quant(x, self.act_scale.to(x.dtype), self.act_zero.to(x.dtype),
                          self.act_bits, self.act_symmetric)

    @property
    def act_range(self) -> tuple[float, float] | None:
        """The [lo, hi] that the input fake quantization holds (None: float input)."""
        if self.act_bits is None or float(self.act_scale) <= 0:
            return None
        s, z = float(self.act_scale), float(self.act_zero)
        if self.act_symmetric:
            q = 2 ** (self.act_bits - 1) - 1
            return -q * s, q * s
        return -z * s, (2 ** self.act_bits - 1 - z) * s

    def _gather_inputs(self, x: Tensor, dim: int) -> Tensor:
        if self.in_index is None:
            return x
        return x.index_select(dim, self.in_index.to(x.device))

    # -------------------------------------------------------------- caching
    def _cached(self, key, build):
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, build())
        return self._cache[1]

    def invalidate_cache(self):
        self._cache = None
        self._act_checked = False

    def _apply(self, fn, *args, **kwargs):
        self.invalidate_cache()
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs):
        # point counts differ between quantizations: take the incoming shapes
        for name in _QBUFS:
            key = prefix + name
            if key in state_dict:
                v = state_dict[key]
                cur = self._buffers.get(name)
                if cur is None or cur.shape != v.shape:
                    dev = self.codes.device
                    self._buffers[name] = torch.empty(v.shape, dtype=v.dtype, device=dev)
        self.invalidate_cache()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)

    def __getstate__(self):
        state = self.__dict__.copy()
        state['_cache'] = None
        return state

    def _row_channel(self) -> Tensor:
        """(sum_j n_j,) output channel of each point row (rows are channel-major)."""
        n = self.npoints
        return torch.repeat_interleave(torch.arange(n.numel(), device=n.device), n)

    def _dequant_rows(self) -> Tensor:
        """(C_out, d) float32 dequantized weight."""
        rows = self.codes.float() * self.scales[:, None]
        out = torch.zeros(self.npoints.numel(), self.codes.shape[1],
                          device=rows.device, dtype=torch.float32)
        return out.index_add_(0, self._row_channel(), rows)

    def extra_overhead(self) -> float:
        """(sum_j n_j - C_out) / C_out: extra memory and compute of the layer."""
        n = self.npoints
        return float(n.sum() - n.numel()) / n.numel()


class QConv2d(_QuantBase):
    """Quantized nn.Conv2d (dense, grouped, depthwise; any stride/padding/dilation)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride,
                 padding, dilation, groups: int, qw: QuantizedWeight,
                 bias: Tensor | None = None, in_index: Tensor | None = None,
                 padding_mode: str = 'zeros', act_bits: int | None = None,
                 act_symmetric: bool = False):
        super().__init__()
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.kernel_size = tuple(kernel_size)
        self.stride = tuple(stride)
        self.padding = padding if isinstance(padding, str) else tuple(padding)
        self.dilation = tuple(dilation)
        self.groups = int(groups)
        self.padding_mode = padding_mode
        self.transposed = False
        kh, kw = self.kernel_size
        extra = 0 if in_index is None else len(in_index) - self.in_channels
        if in_index is not None and self.groups != 1:
            raise ValueError('in_index (OCS) is only supported for groups=1, got '
                             f'groups={self.groups}')
        self.weight_in_channels = self.in_channels + extra
        d = self.weight_in_channels // self.groups * kh * kw
        if qw.out_channels != self.out_channels or qw.d != d:
            raise ValueError(f'qw has {qw.out_channels} channels of d={qw.d}, the conv '
                             f'needs {self.out_channels} of d={d}')
        if self.padding_mode != 'zeros':
            if isinstance(self.padding, str):
                raise ValueError(f'padding={self.padding!r} is only supported with '
                                 f"padding_mode='zeros', got {self.padding_mode!r}")
            ph, pw = self.padding
            self._rev_pad = (pw, pw, ph, ph)
        self._init_quant(qw, bias, in_index, act_bits, act_symmetric)

    @classmethod
    def from_float(cls, m: nn.Conv2d, qw: QuantizedWeight,
                   in_index: Tensor | None = None, act_bits: int | None = None,
                   act_symmetric: bool = False) -> 'QConv2d':
        if not isinstance(m, nn.Conv2d):
            raise ValueError(f'm must be an nn.Conv2d, got {type(m).__name__}')
        return cls(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding,
                   m.dilation, m.groups, qw, m.bias, in_index, m.padding_mode,
                   act_bits, act_symmetric).to(m.weight.device)

    @property
    def weight(self) -> Tensor:
        """Dequantized float weight (C_out, C_in/groups (+OCS), kh, kw)."""
        return self._weight(torch.float32, self.codes.device)

    def _weight(self, dtype, device):
        def build():
            w = self._dequant_rows().reshape(self.out_channels, -1, *self.kernel_size)
            return w.to(device=device, dtype=dtype)
        return self._cached(('w', dtype, device), build)

    def _expanded(self, dtype, device):
        """(integer weight, row scales, row channels) of ONE conv with every group
        padded to the largest group's rows (padding rows: channel C_out). The
        forward uses it for dense convs only (``_levels`` for grouped ones);
        ``deploy.convert``'s common-operands module uses it for all."""
        def build():
            G = self.groups
            C = self.out_channels
            cpg = C // G
            n = self.npoints
            rows_per_group = n.reshape(G, cpg).sum(1)
            R = int(rows_per_group.max())
            ch = self._row_channel()
            grp = ch // cpg
            start = torch.cumsum(rows_per_group, 0) - rows_per_group
            pos = torch.arange(ch.numel(), device=n.device) - start[grp]
            slot = grp * R + pos                       # row -> padded row
            d = self.codes.shape[1]
            wint = torch.zeros(G * R, d, device=n.device)
            wint[slot] = self.codes.float()
            scale = torch.zeros(G * R, device=n.device)
            scale[slot] = self.scales
            chan = torch.full((G * R,), C, dtype=torch.int64, device=n.device)
            chan[slot] = ch                             # padding rows -> dummy C
            wint = wint.reshape(G * R, -1, *self.kernel_size)
            return (wint.to(device=device, dtype=dtype),
                    scale.to(device=device, dtype=dtype), chan.to(device))
        return self._cached(('e', dtype, device), build)

    def _levels(self, dtype, device) -> list[tuple[Tensor | None, int, Tensor, Tensor,
                                                     Tensor]]:
        """Per point level of a grouped conv (``quant.levels.point_levels``): (input
        channels to gather, None for all; groups; integer weight; row scales; row
        channels, C_out for padding rows)."""
        def build():
            C, G = self.out_channels, self.groups
            cin = self.weight_in_channels // G
            dev, qd = self.codes.device, self.codes.shape[1]
            # one zero row appended: padding rows (-1) take it, with scale 0
            codes = torch.cat([self.codes.float(), torch.zeros(1, qd, device=dev)])
            scales = torch.cat([self.scales, self.scales.new_zeros(1)])
            zero = codes.shape[0] - 1
            chans = torch.cat([self._row_channel(), torch.tensor([C], device=dev)])
            out = []
            for act, rows in point_levels(self.npoints, G):
                rows = torch.where(rows >= 0, rows, zero)
                idx = None if act.numel() == G else \
                    (act[:, None] * cin + torch.arange(cin, device=dev)).reshape(-1)
                w = codes[rows].reshape(rows.numel(), cin, *self.kernel_size)
                out.append((None if idx is None else idx.to(device), act.numel(),
                            w.to(device=device, dtype=dtype),
                            scales[rows].to(device=device, dtype=dtype),
                            chans[rows].to(device)))
            return out
        return self._cached(('l', dtype, device), build)

    def _pad(self, x: Tensor) -> tuple[Tensor, tuple | str | int]:
        """x padded for a non-'zeros' padding_mode, and the padding the convs use."""
        if self.padding_mode != 'zeros':
            return F.pad(x, self._rev_pad, mode=self.padding_mode), 0
        return x, self.padding

    def _conv(self, x: Tensor, w: Tensor, groups: int) -> Tensor:
        x, padding = self._pad(x)
        return F.conv2d(x, w, None, self.stride, padding, self.dilation, groups)

    def _forward_levels(self, x: Tensor) -> Tensor:
        x, padding = self._pad(x)      # once: the levels gather from the padded input
        y = None
        for idx, groups, wint, scale, chan in self._levels(x.dtype, x.device):
            xi = x if idx is None else x.index_select(1, idx)
            yr = F.conv2d(xi, wint, None, self.stride, padding, self.dilation, groups)
            yr = yr * scale[None, :, None, None]
            if y is None:
                y = yr.new_zeros(yr.shape[0], self.out_channels + 1, *yr.shape[2:])
            y.index_add_(1, chan, yr)
        return y[:, :self.out_channels]

    def forward(self, x: Tensor) -> Tensor:
        x = self._act_quant(self._gather_inputs(x, 1))
        if self._mode == 'dequant':
            y = self._conv(x, self._weight(x.dtype, x.device), self.groups)
        elif self.groups > 1:
            y = self._forward_levels(x)
        else:
            wint, scale, chan = self._expanded(x.dtype, x.device)
            yr = self._conv(x, wint, 1) * scale[None, :, None, None]
            y = yr.new_zeros(yr.shape[0], self.out_channels + 1, *yr.shape[2:])
            y = y.index_add_(1, chan, yr)[:, :self.out_channels]
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)[None, :, None, None]
        return y

    def extra_repr(self):
        return (f'{self.in_channels}, {self.out_channels}, kernel_size='
                f'{self.kernel_size}, stride={self.stride}, padding={self.padding}, '
                f'dilation={self.dilation}, groups={self.groups}, bits={self.bits}, '
                f'points={int(self.npoints.sum())}, mode={self._mode}, '
                f'ocs={self.in_index is not None}, act_bits={self.act_bits}')


class QLinear(_QuantBase):
    """Quantized nn.Linear."""

    def __init__(self, in_features: int, out_features: int, qw: QuantizedWeight,
                 bias: Tensor | None = None, in_index: Tensor | None = None,
                 act_bits: int | None = None, act_symmetric: bool = False):
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        d = self.in_features if in_index is None else len(in_index)
        if qw.out_channels != self.out_features or qw.d != d:
            raise ValueError(f'qw has {qw.out_channels} channels of d={qw.d}, the '
                             f'linear needs {self.out_features} of d={d}')
        self._init_quant(qw, bias, in_index, act_bits, act_symmetric)

    @classmethod
    def from_float(cls, m: nn.Linear, qw: QuantizedWeight,
                   in_index: Tensor | None = None, act_bits: int | None = None,
                   act_symmetric: bool = False) -> 'QLinear':
        if not isinstance(m, nn.Linear):
            raise ValueError(f'm must be an nn.Linear, got {type(m).__name__}')
        return cls(m.in_features, m.out_features, qw, m.bias, in_index, act_bits,
                   act_symmetric).to(m.weight.device)

    @property
    def weight(self) -> Tensor:
        return self._weight(torch.float32, self.codes.device)

    def _weight(self, dtype, device):
        return self._cached(('w', dtype, device),
                            lambda: self._dequant_rows().to(device=device, dtype=dtype))

    def _expanded(self, dtype, device):
        def build():
            return (self.codes.to(device=device, dtype=dtype),
                    self.scales.to(device=device, dtype=dtype),
                    self._row_channel().to(device))
        return self._cached(('e', dtype, device), build)

    def forward(self, x: Tensor) -> Tensor:
        x = self._act_quant(self._gather_inputs(x, x.dim() - 1))
        if self._mode == 'dequant':
            y = F.linear(x, self._weight(x.dtype, x.device))
        else:
            wint, scale, chan = self._expanded(x.dtype, x.device)
            yr = F.linear(x, wint) * scale
            y = yr.new_zeros(*yr.shape[:-1], self.out_features)
            y = y.index_add_(yr.dim() - 1, chan, yr)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def extra_repr(self):
        return (f'in_features={self.in_features}, out_features={self.out_features}, '
                f'bits={self.bits}, points={int(self.npoints.sum())}, '
                f'mode={self._mode}, ocs={self.in_index is not None}, '
                f'act_bits={self.act_bits}')
