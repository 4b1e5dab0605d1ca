"""Benchmarks: how fast our models train and sample on this machine, and how they compare with peers.

A command (``dalle2 bench ...``), not timed tests: timings depend on the machine and on what else
runs on it. :mod:`dalle2.bench.models` measures each model of a preset; :mod:`dalle2.bench.peers`
builds the peer implementations (lucidrains' dalle2-pytorch, diffusers' ``UnCLIPPipeline``) at our
sizes and :mod:`dalle2.bench.comparisons` runs them side by side with ours. The peers are an
optional extra (``pip install -e '.[bench]'``), never a runtime dependency.
"""

# What `dalle2 bench models` accepts (here, so that building the CLI parser imports no torch).
BENCH_PRESETS = ("tiny", "small")  # the larger presets do not fit a CPU benchmark
BENCH_KINDS = ("clip", "prior", "decoder", "upsampler_256", "upsampler_1024")
