"""Benchmarks: ``biosam2 bench efficiency`` (cost) and ``biosam2 bench accuracy`` (:mod:`.accuracy`).

The efficiency benchmark is split into:

- :mod:`biosam2.bench.flops`: MAC counting (torch's FlopCounterMode + formulas it lacks);
- :mod:`biosam2.bench.measure`: timing, peak memory, matmul throughput, machine description;
- :mod:`biosam2.bench.results`: the measured rows and what is derived from them;
- :mod:`biosam2.bench.report`: the Markdown report and the targets' evaluation;
- :mod:`biosam2.bench.efficiency`: the configurations, the protocol and the command line.

Kept free of imports so that ``import biosam2`` and the CLI's ``-h`` stay fast.
"""
