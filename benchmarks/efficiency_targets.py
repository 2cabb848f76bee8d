"""The efficiency targets, judged from the JSON of ``biosam2 bench efficiency --json FILE``.

    python benchmarks/efficiency_targets.py benchmarks/efficiency-cpu.json

- T1a: LW fused adds at most 10% latency over PEG without adapters (each input size);
- T1b: LW fused is faster than LW unfused (its training form);
- T2: at 512x512, LW fused at native size is at least 3x faster than vanilla SAM2 resizing to 1024;
- T3: at least 87% fewer MACs than the heavyweight reference (SAM ViT-B at 1024), for LW fused and HP.

Latency ratios are the median of the per-round ratios of the interleaved rounds where the JSON has
them (they cancel the drift of a shared machine), else the ratio of the rows' medians. A verdict with a
third or more of the rounds on the other side of the threshold is marked "within noise". A target whose
rows were not measured is NOT EVALUATED. Prints a Markdown table; exits 1 if any target is missed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

LW_FUSED_MAX_OVERHEAD = 1.10
VANILLA_MIN_SPEEDUP, VANILLA_SPEEDUP_SIZE = 3.0, 512
MIN_MAC_REDUCTION = 0.87


def latency_ratio(result: dict, numerator: str, denominator: str, size: int, threshold: float) -> tuple[float, str]:
    """numerator / denominator latency at ``size``, and how it was obtained."""
    rounds = result.get("interleaved", {}).get(str(size)) or []
    if rounds and numerator in rounds[0] and denominator in rounds[0]:
        ratios = [r[numerator] / r[denominator] for r in rounds]
        ratio = statistics.median(ratios)
        other_side = sum((r > threshold) != (ratio > threshold) for r in ratios)
        noise = f"; within noise: {other_side} of {len(ratios)} rounds on the other side" if 3 * other_side >= len(ratios) else ""
        return ratio, f"median of {len(ratios)} interleaved rounds (range {min(ratios):.3f}-{max(ratios):.3f}){noise}"
    rows = {r["config"]: r for r in result["rows"] if r["input_size"] == size}
    return rows[numerator]["latency"]["median_ms"] / rows[denominator]["latency"]["median_ms"], "row medians"


def evaluate(result: dict) -> list[tuple[str, int | None, str, str, str]]:
    """(target, input size, PASS | MISS | NOT EVALUATED, measured, how) for each target."""
    rows = {(r["config"], r["input_size"]): r for r in result["rows"] if r["config"] != "sam-vit-b"}
    sizes = sorted({size for _, size in rows})
    reference = next((r for r in result["rows"] if r["config"] == "sam-vit-b"), None)
    verdict = lambda ok: "PASS" if ok else "MISS"  # noqa: E731
    found = []
    for size in sizes:
        for target, other, threshold in (("T1a", "peg-only", LW_FUSED_MAX_OVERHEAD), ("T1b", "biosam2-lw", 1.0)):
            if ("biosam2-lw-fused", size) not in rows or (other, size) not in rows:
                found.append((target, size, "NOT EVALUATED", "-", f"needs biosam2-lw-fused and {other} at {size}"))
                continue
            ratio, how = latency_ratio(result, "biosam2-lw-fused", other, size, threshold)
            ok = ratio <= threshold if target == "T1a" else ratio < threshold  # compared as ratios: 1.1 - 1 > 0.1 in floats
            measured = f"{ratio - 1:+.1%} latency vs {other}" if target == "T1a" else f"{ratio:.3f}x of {other}"
            found.append((target, size, verdict(ok), measured, how))
    size = VANILLA_SPEEDUP_SIZE
    if ("biosam2-lw-fused", size) in rows and ("vanilla-sam2", size) in rows:
        speedup, how = latency_ratio(result, "vanilla-sam2", "biosam2-lw-fused", size, VANILLA_MIN_SPEEDUP)
        found.append(("T2", size, verdict(speedup >= VANILLA_MIN_SPEEDUP), f"{speedup:.2f}x faster than vanilla SAM2", how))
    else:
        found.append(("T2", size, "NOT EVALUATED", "-", f"needs biosam2-lw-fused and vanilla-sam2 at {size}"))
    variants = [(config, size) for size in sizes for config in ("biosam2-lw-fused", "biosam2-hp") if (config, size) in rows]
    if reference is None or not variants:
        found.append(("T3", None, "NOT EVALUATED", "-", "needs sam-vit-b and biosam2-lw-fused or biosam2-hp"))
    for config, size in variants if reference else []:
        row = rows[config, size]
        layers = 1 - row["mac_components"]["layers"] / reference["mac_components"]["layers"]
        reduction = 1 - row["macs"] / reference["macs"]
        found.append(("T3", size, verdict(reduction >= MIN_MAC_REDUCTION), f"{config}: {reduction:.1%} fewer MACs",
                      f"{row['macs'] / 1e9:.2f} vs {reference['macs'] / 1e9:.1f} GMACs; layers only: {layers:.1%} fewer"))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", type=Path, help="the output of biosam2 bench efficiency --json")
    result = json.loads(parser.parse_args(argv).json.read_text())
    found = evaluate(result)
    print("| target | input | verdict | measured | how |\n|---|---|---|---|---|")
    for target, size, status, measured, how in found:
        print(f"| {target} | {size or '-'} | {status} | {measured} | {how} |")
    return 1 if any(status == "MISS" for _, _, status, _, _ in found) else 0


if __name__ == "__main__":
    sys.exit(main())
