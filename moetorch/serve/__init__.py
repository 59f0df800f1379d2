"""OpenAI-compatible serving: `create_app(Engine(model, tokenizer, name))`, or `moetorch serve`.
Needs fastapi and uvicorn (`pip install "moetorch[serve]"`)."""

from .engine import Detokenizer, Engine, Piece, StopText

__all__ = ["Detokenizer", "Engine", "Piece", "StopText", "create_app"]


def create_app(engine: Engine, api_key: str | None = None):
    """The FastAPI app serving `engine` (see moetorch/serve/app.py)."""
    try:
        from .app import create_app as make
    except ImportError as e:
        raise ImportError(f"moetorch's server needs fastapi and uvicorn ({e}): pip install 'moetorch[serve]'") from e
    return make(engine, api_key)
