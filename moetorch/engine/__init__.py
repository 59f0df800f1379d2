"""Execution engines around the models: CUDA-graph decode and prefill (and later continuous batching)."""

from .cuda_graph import GraphedDecodeStep, GraphedPrefill, capture

__all__ = ["GraphedDecodeStep", "GraphedPrefill", "capture"]
