"""Multiply-accumulate (MAC) counting with ``torch.utils.flop_counter``, completed where it is blind.

``FlopCounterMode`` adds up the FLOPs of the operators that have a formula in its registry; any other
operator adds zero, silently. Convention (torch's, fvcore's, the SAM papers'): MACs = FLOPs / 2, and
only contractions count (matmul, linear, convolution, attention); biases and elementwise work do not.

Formulas registered here, only where torch 2.14 has none (a future torch formula wins):

- ``aten._scaled_dot_product_flash_attention_for_cpu`` (what sdpa runs on CPU; Hiera and the SAM
  decoders use sdpa) and its backward: torch's own ``sdpa_flop_count`` / ``sdpa_backward_flop_count``,
  as for its CUDA kernels.
- ``torchvision::deform_conv2d`` (DCNv2, the HP adapter): the im2col gemm of a plain convolution of the
  same shape, ``B Ho Wo Cout (Cin / groups) kh kw``, plus the sampling, ``B Ho Wo Cin kh kw (4 + mask)``:
  each sampled value is a bilinear interpolation of 4 neighbours, times the modulation mask in DCNv2.
  Its backward counts 2 x that (input-column and weight gradients, as torch's ``convolution_backward``
  formula does; the offset and mask gradients' elementwise work is not counted: a lower bound).

:class:`MacCounter` also records every operator that ran without a formula and flags contraction-like
names among them (``suspicious``), so a model that reaches an uncounted kernel is reported instead of
silently under-counted.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import (
    FlopCounterMode, flop_registry, register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count,
)

# Words that name contractions in operator names; matched word by word, so that ``upsample_bilinear2d``
# (interpolation) is not flagged but ``aten.mkldnn_convolution`` is.
_CONTRACTION_WORDS = re.compile(
    r"(mm|bmm|addmm|baddbmm|addbmm|matmul|linear|mv|addmv|dot|vdot|tensordot|einsum|attention|"
    r"bilinear|conv|convolution|conv[123]d|conv_transpose[123]d|deform)"
)


def looks_like_contraction(operator: str) -> bool:
    """Whether an operator name (``namespace.name``) has a word that names a tensor contraction."""
    return any(_CONTRACTION_WORDS.fullmatch(word) for word in operator.rsplit(".", 1)[-1].split("_") if word)


def deform_conv2d_macs(input_shape, weight_shape, out_shape, use_mask: bool) -> int:
    """MACs of one ``torchvision.ops.deform_conv2d`` call (see the module docstring)."""
    out_channels, in_per_group, kernel_h, kernel_w = weight_shape
    positions, taps = input_shape[0] * out_shape[-2] * out_shape[-1], kernel_h * kernel_w
    return positions * taps * (out_channels * in_per_group + input_shape[1] * (4 + int(bool(use_mask))))


def _register_missing_formulas() -> list[str]:
    import torchvision  # noqa: F401  (loads the torchvision:: operators)

    def sdpa_cpu(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    def sdpa_cpu_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)

    def deform_conv(input_shape, weight_shape, offset_shape, mask_shape, bias_shape, *args, out_shape=None, **kwargs):
        return 2 * deform_conv2d_macs(input_shape, weight_shape, out_shape, args[-1] if args else kwargs.get("use_mask"))

    def deform_conv_backward(grad_shape, input_shape, weight_shape, *args, out_shape=None, **kwargs):
        return 4 * deform_conv2d_macs(input_shape, weight_shape, grad_shape, args[-1] if args else kwargs.get("use_mask"))

    formulas = {
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: sdpa_cpu,
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: sdpa_cpu_backward,
        torch.ops.torchvision.deform_conv2d: deform_conv,
        torch.ops.torchvision._deform_conv2d_backward: deform_conv_backward,
    }
    registered = [target for target in formulas if target not in flop_registry]
    for target in registered:
        register_flop_formula(target)(formulas[target])
    return [str(target) for target in registered]


REGISTERED_FORMULAS: list[str] = _register_missing_formulas()


class _OperatorRecorder(TorchDispatchMode):
    """Counts every operator that actually executes (below the FLOP counter)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[Any] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[func._overloadpacket] += 1
        return func(*args, **(kwargs or {}))


@dataclass
class MacCount:
    """What one counted run did: MACs in total and per operator, and what was not counted."""

    total: int
    by_operator: dict[str, int]
    uncounted_operators: dict[str, int]  # operator -> calls, for operators without a formula
    suspicious: list[str]  # contraction-like operators among the uncounted ones


class MacCounter:
    """``with MacCounter() as counter: model(x)``, then ``counter.result`` (forward and backward, if both ran)."""

    def __init__(self) -> None:
        self._recorder, self._counter = _OperatorRecorder(), FlopCounterMode(display=False)
        self.result: MacCount | None = None

    def __enter__(self) -> MacCounter:
        # The recorder sits below the counter: it sees the operators the counter let run (after it
        # decomposed the composite ones), i.e. exactly what was or was not counted.
        self._recorder.__enter__()
        try:
            self._counter.__enter__()
        except BaseException:
            self._recorder.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._counter.__exit__(*exc)
        finally:
            self._recorder.__exit__(*exc)
        by_operator = {str(op): flops // 2 for op, flops in self._counter.get_flop_counts().get("Global", {}).items()}
        uncounted = {str(op): n for op, n in self._recorder.calls.items() if op not in self._counter.flop_registry}
        self.result = MacCount(
            total=self._counter.get_total_flops() // 2,
            by_operator=by_operator,
            uncounted_operators=dict(sorted(uncounted.items())),
            suspicious=sorted(op for op in uncounted if looks_like_contraction(op)),
        )


def count_macs(fn, *args: Any, **kwargs: Any) -> tuple[Any, MacCount]:
    """Run ``fn(*args, **kwargs)`` under a :class:`MacCounter`; returns its output and the count."""
    with MacCounter() as counter:
        output = fn(*args, **kwargs)
    return output, counter.result
