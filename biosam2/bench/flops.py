"""Multiply-accumulate (MAC) counting with ``torch.utils.flop_counter``, completed where it is blind.

``FlopCounterMode`` intercepts every aten operator that runs and adds up the FLOPs of the operators
that have a formula in ``torch.utils.flop_counter.flop_registry``; any other operator adds **zero**,
silently. Convention (torch's and ours): FLOPs = 2 x MACs; only contractions are counted (matmul,
linear, convolution, attention); elementwise work, normalisation, softmax, pooling, interpolation
and data movement are not -- the same convention as fvcore/thop and the GMAC figures SAM papers
quote. Biases are not counted.

What torch 2.14's registry misses on the paths biosam2 runs, and the formulas registered here for
them (through ``register_flop_formula``, only where torch has none, so a future torch formula wins):

``aten._scaled_dot_product_flash_attention_for_cpu`` (what ``F.scaled_dot_product_attention`` runs
on CPU; transformers' Hiera and the SAM decoders use sdpa)
    Same formula torch uses for its CUDA SDPA kernels (``sdpa_flop_count``): ``Q K^T`` plus
    ``softmax(.) V``, i.e. ``B * H * L * S * (E + Ev)`` MACs. A mask or causal flag is ignored
    (dense upper bound), exactly as torch does for its own kernels.

``aten._scaled_dot_product_flash_attention_for_cpu_backward``
    torch's ``sdpa_backward_flop_count`` (five matmuls of the same shapes: recomputing the scores,
    and the gradients of scores, V, Q and K).

``torchvision::deform_conv2d`` (DCNv2, the HP adapter's spatial module)
    ``gemm + sampling`` where ``gemm = B * Ho * Wo * Cout * (Cin / groups) * kh * kw`` is the
    im2col matrix product (identical to a plain convolution of the same shape) and
    ``sampling = B * Ho * Wo * Cin * kh * kw * (4 + use_mask)``: every sampled input value is a
    bilinear interpolation of 4 neighbours (4 MACs), times the modulation mask (1 MAC) in DCNv2.
    Computing the interpolation weights from the offsets is elementwise work and is not counted,
    by the convention above.

``torchvision::_deform_conv2d_backward``
    2 x the forward count: one gemm for the input columns' gradient and one for the weight
    gradient, plus the sampling (scatter of the column gradient, re-gathering of the columns).
    This is the convention torch's ``convolution_backward`` formula follows (each gradient costs
    one forward); the offset/mask gradients' extra elementwise work is not counted, so this is a
    lower bound of what torchvision computes.

Checked in ``tests/test_bench_efficiency.py``: a conv, a linear, an SDPA call and a deform_conv2d
call are counted exactly as these formulas predict. :class:`MacCounter` also records every operator
that ran without a formula, and flags contraction-like names among them (``suspicious``), so a
model that reaches an uncounted kernel is reported instead of silently under-counted.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import (
    FlopCounterMode,
    flop_registry,
    register_flop_formula,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)

# Words that name tensor contractions in operator names (``aten._scaled_dot_product_flash_attention``,
# ``aten.mkldnn_convolution``, ``torchvision.deform_conv2d``, ...). One of these running without a
# formula means the count is missing real work (e.g. a new fused attention kernel), so it is flagged.
# Matched word by word so that ``upsample_bilinear2d`` (interpolation, not a contraction) is not.
_CONTRACTION_WORDS = re.compile(
    r"(mm|bmm|addmm|baddbmm|addbmm|matmul|linear|mv|addmv|dot|vdot|tensordot|einsum|attention|"
    r"bilinear|conv|convolution|conv[123]d|conv_transpose[123]d|deform)"
)


def looks_like_contraction(operator: str) -> bool:
    """Whether an operator name (``namespace.name``) has a word that names a tensor contraction."""
    name = operator.rsplit(".", 1)[-1]
    return any(_CONTRACTION_WORDS.fullmatch(word) for word in name.split("_") if word)


def deform_conv2d_macs(
    input_shape: tuple[int, ...], weight_shape: tuple[int, ...], out_shape: tuple[int, ...], use_mask: bool
) -> int:
    """MACs of one ``torchvision.ops.deform_conv2d`` call (see the module docstring for the formula)."""
    batch, in_channels = input_shape[0], input_shape[1]
    out_channels, in_per_group, kernel_h, kernel_w = weight_shape
    out_h, out_w = out_shape[-2], out_shape[-1]
    taps = kernel_h * kernel_w
    positions = batch * out_h * out_w
    gemm = positions * out_channels * in_per_group * taps
    sampling = positions * in_channels * taps * (4 + int(bool(use_mask)))
    return gemm + sampling


def _register_missing_formulas() -> list[str]:
    """Register the formulas of the module docstring for operators torch has none for; idempotent."""
    aten = torch.ops.aten
    formulas: dict[Any, Any] = {}

    def sdpa_cpu(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    def sdpa_cpu_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)

    formulas[aten._scaled_dot_product_flash_attention_for_cpu] = sdpa_cpu
    formulas[aten._scaled_dot_product_flash_attention_for_cpu_backward] = sdpa_cpu_backward

    try:
        import torchvision  # noqa: F401  (loads the torchvision:: operators)

        deform_forward = torch.ops.torchvision.deform_conv2d
        deform_backward = torch.ops.torchvision._deform_conv2d_backward
    except (ImportError, AttributeError):  # torchvision absent: nothing runs these operators
        deform_forward = deform_backward = None

    if deform_forward is not None:

        def deform_conv(
            input_shape, weight_shape, offset_shape, mask_shape, bias_shape, *args, out_shape=None, **kwargs
        ):
            use_mask = args[-1] if args else kwargs.get("use_mask", False)
            return 2 * deform_conv2d_macs(input_shape, weight_shape, out_shape, use_mask)

        def deform_conv_backward(grad_shape, input_shape, weight_shape, *args, out_shape=None, **kwargs):
            use_mask = args[-1] if args else kwargs.get("use_mask", False)
            return 2 * 2 * deform_conv2d_macs(input_shape, weight_shape, grad_shape, use_mask)

        formulas[deform_forward] = deform_conv
        formulas[deform_backward] = deform_conv_backward

    registered = []
    for target, formula in formulas.items():
        if target not in flop_registry:
            register_flop_formula(target)(formula)
            registered.append(str(target))
    return registered


REGISTERED_FORMULAS: list[str] = _register_missing_formulas()


class _OperatorRecorder(TorchDispatchMode):
    """Counts every aten/custom operator that actually executes (below the FLOP counter)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[Any] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[func._overloadpacket] += 1
        return func(*args, **(kwargs or {}))


@dataclass
class MacCount:
    """What one counted run did: MACs in total, per operator and per module, and what was not counted."""

    total: int
    by_operator: dict[str, int]
    by_module: dict[str, dict[str, int]] = field(repr=False)
    uncounted_operators: dict[str, int]  # operator -> calls, for operators without a formula
    suspicious: list[str]  # contraction-like operators among the uncounted ones

    def module_macs(self, module_pattern: str, operator: str | None = None) -> int:
        """MACs attributed to modules whose dotted name fully matches ``module_pattern`` (regex).

        Nested matches are not double counted: only the outermost matching modules are summed.
        """
        pattern = re.compile(module_pattern)
        names = sorted(n for n in self.by_module if pattern.fullmatch(n))
        outermost = [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]
        return sum(
            macs
            for name in outermost
            for op, macs in self.by_module[name].items()
            if operator is None or op == operator
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "by_operator": self.by_operator,
            "uncounted_operators": self.uncounted_operators,
            "suspicious_uncounted": self.suspicious,
        }


class MacCounter:
    """Context manager: ``with MacCounter() as counter: model(x)``, then ``counter.result``.

    Forward and backward are both counted if both run inside the context.
    """

    def __init__(self) -> None:
        self._recorder = _OperatorRecorder()
        self._counter = FlopCounterMode(display=False)
        self.result: MacCount | None = None

    def __enter__(self) -> MacCounter:
        # The recorder sits *below* the counter, so it sees the operators the counter let run (after
        # the counter decomposed the composite ones), i.e. exactly what was or was not counted.
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
        counts = self._counter.get_flop_counts()
        by_module = {
            module: {str(op): flops // 2 for op, flops in ops.items()}
            for module, ops in counts.items()
            if module != "Global"
        }
        by_operator = {str(op): flops // 2 for op, flops in counts.get("Global", {}).items()}
        registry = self._counter.flop_registry
        uncounted = {
            str(op): n
            for op, n in sorted(self._recorder.calls.items(), key=lambda kv: str(kv[0]))
            if op not in registry
        }
        self.result = MacCount(
            total=self._counter.get_total_flops() // 2,
            by_operator=by_operator,
            by_module=by_module,
            uncounted_operators=uncounted,
            suspicious=[op for op in uncounted if looks_like_contraction(op)],
        )


def count_macs(fn, *args: Any, **kwargs: Any) -> tuple[Any, MacCount]:
    """Run ``fn(*args, **kwargs)`` under a :class:`MacCounter`; returns its output and the count."""
    with MacCounter() as counter:
        output = fn(*args, **kwargs)
    assert counter.result is not None
    return output, counter.result
