"""Execution engines around the models: CUDA-graph decode and prefill (and later continuous batching)."""

from .cuda_graph import (
    GraphedChunk,
    GraphedDecodeStep,
    GraphedPrefill,
    capture,
    compiled_own_forward,
    own_forward,
)

__all__ = ["GraphedChunk", "GraphedDecodeStep", "GraphedPrefill", "capture", "compiled_own_forward", "own_forward"]
