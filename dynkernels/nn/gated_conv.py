"""GatedConv2d: a drop-in nn.Conv2d that can compute only the active channels of each sample,
and convert() to swap it into an existing model."""
from typing import Callable, Optional

import torch
import torch.nn as nn

from ..ops import channel_sparse_conv2d, check_backend
from ..ops.channel_sparse_conv2d import check_density


class GatedConv2d(nn.Conv2d):
    """nn.Conv2d with a channel-gated forward.

    Same constructor (plus `backend`) and the same state_dict as nn.Conv2d.
      forward(x)                       -> exactly nn.Conv2d's output
      forward(x, gate, in_gate=None)   -> dynkernels.channel_sparse_conv2d(x, weight, bias, gate,
                                          in_gate, ...): y[n, c] = gate[n, c] * conv(x * [in_gate > 0])[n, c]
                                          where gate[n, c] > 0, else exactly 0; inactive channels
                                          cost no FLOPs.
    The gated forward needs groups = 1 and padding_mode 'zeros' (padding may be numeric,
    'valid', or 'same' where it is symmetric).
    `backend` ("auto", "cuda", "cpu", "triton", "torch") picks the kernel of the gated forward;
    `density` (None or a number in [0, 1]) is what the caller knows of its gates on the host,
    the expected fraction of the dense FLOPs they leave active, passed to
    dynkernels.channel_sparse_conv2d as its hint on CUDA tensors (tuned tile choice, and dense
    execution where that is measured faster with backend="auto"); on CPU tensors the gates
    themselves are read instead.
    Fast path on a GPU: channels_last activations and weights
    (`model.to(memory_format=torch.channels_last)`, inputs `x.contiguous(memory_format=
    torch.channels_last)`). The kernels run on NHWC; other layouts are converted on every call,
    and the output keeps the input's layout.
    """

    def __init__(self, *args, backend: str = "auto", density: Optional[float] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = backend
        self.density = check_density("GatedConv2d", density)

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str):
        self._backend = check_backend("GatedConv2d", value)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, backend: str = "auto", density: Optional[float] = None) -> "GatedConv2d":
        """A GatedConv2d that shares conv's weight and bias (the same Parameter objects)."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"GatedConv2d.from_conv: conv must be an nn.Conv2d, got {type(conv).__name__}")
        with torch.device("meta"):  # no throw-away allocation of the parameters
            gated = cls(
                conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                padding_mode=conv.padding_mode, backend=backend, density=density,
            )
        gated.weight = conv.weight
        gated.bias = conv.bias
        gated.train(conv.training)
        return gated

    def _gated_padding(self):
        if self.groups != 1:
            raise ValueError(f"GatedConv2d: the gated forward needs groups=1, this module has groups={self.groups}")
        if self.padding_mode != "zeros":
            raise ValueError(
                f"GatedConv2d: the gated forward needs padding_mode='zeros', this module has {self.padding_mode!r}"
            )
        if self.padding == "valid":
            return (0, 0)
        if self.padding == "same":  # symmetric only: the total padding d * (k - 1) must be even
            totals = [d * (k - 1) for d, k in zip(self.dilation, self.kernel_size)]
            if any(t % 2 for t in totals):
                raise ValueError(
                    "GatedConv2d: padding='same' with an even kernel extent pads asymmetrically, which the "
                    "gated forward does not support; use an odd kernel or numeric padding"
                )
            return tuple(t // 2 for t in totals)
        return self.padding

    def forward(
        self, x: torch.Tensor, gate: Optional[torch.Tensor] = None, in_gate: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        if gate is None:
            if in_gate is not None:
                raise ValueError("GatedConv2d: in_gate was given without gate (the output gate [N, Cout])")
            return super().forward(x)
        padding = self._gated_padding()
        return channel_sparse_conv2d(
            x, self.weight, self.bias, gate, in_gate, self.stride, padding, self.dilation,
            backend=self.backend, density=self.density,
        )

    def extra_repr(self) -> str:
        density = "" if self.density is None else f", density={self.density}"
        return super().extra_repr() + f", backend={self.backend!r}" + density


def convert(
    model: nn.Module,
    filter: Optional[Callable[[str, nn.Conv2d], bool]] = None,
    backend: str = "auto",
) -> nn.Module:
    """Replace the nn.Conv2d modules of `model` (in place) by GatedConv2d sharing their parameters.

    filter(name, conv) -> bool chooses which convs to swap (default: every nn.Conv2d with
    groups=1 and padding_mode 'zeros', the ones the gated forward supports). Weights, device,
    dtype and training mode are kept (the parameters are the same objects). A model that is
    itself an nn.Conv2d is returned converted. Returns the model. On a GPU, follow with
    `model.to(memory_format=torch.channels_last)` and feed channels_last inputs: that is the
    layout the kernels run on (others are converted on every call).
    """
    check_backend("convert", backend)

    def wanted(name: str, m: nn.Module) -> bool:
        if type(m) is not nn.Conv2d:  # exact type: subclasses (and GatedConv2d) have their own forward
            return False
        if filter is not None:
            return bool(filter(name, m))
        return m.groups == 1 and m.padding_mode == "zeros"

    if wanted("", model):
        return GatedConv2d.from_conv(model, backend=backend)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if wanted(full, child):
                setattr(module, child_name, GatedConv2d.from_conv(child, backend=backend))
    return model

