"""Execution engines around the models: CUDA-graph decode (and later continuous batching)."""

from .cuda_graph import GraphedDecodeStep

__all__ = ["GraphedDecodeStep"]
