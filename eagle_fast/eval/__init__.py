"""Benchmark scoring: the official metrics of the standard multimodal benchmarks (see ``metrics``)."""
