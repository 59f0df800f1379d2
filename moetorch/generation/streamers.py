"""Streamers: `generate(..., streamer=s)` calls `s.put(token_ids)` with the prompt, then each new
token (batch size 1), and `s.end()` when done. They only need `tokenizer.decode(ids, **kwargs)`."""

from __future__ import annotations

import asyncio
from queue import Queue
from typing import Any

import torch


class BaseStreamer:
    """Receives tokens from `generate`: `put(ids)` for each chunk, `end()` once at the end."""

    def put(self, value: torch.Tensor) -> None:
        raise NotImplementedError

    def end(self) -> None:
        raise NotImplementedError


class TextStreamer(BaseStreamer):
    """Print text to stdout as it is generated, a whole word (or line) at a time.

    Text is released up to the last space, at each newline, and after each CJK character, so that a
    word split over several tokens is never printed half-decoded. `skip_prompt=True` leaves out the
    prompt; `decode_kwargs` (e.g. `skip_special_tokens=True`) go to `tokenizer.decode`.
    """

    def __init__(self, tokenizer: Any, skip_prompt: bool = False, **decode_kwargs: Any) -> None:
        self.tokenizer = tokenizer
        self.skip_prompt = skip_prompt
        self.decode_kwargs = decode_kwargs
        self.token_cache: list[int] = []
        self.print_len = 0
        self.next_tokens_are_prompt = True

    def put(self, value: torch.Tensor) -> None:
        if value.dim() > 1:
            if value.shape[0] > 1:
                raise ValueError(f"{type(self).__name__} supports batch size 1 only, got {value.shape[0]} rows")
            value = value[0]
        if self.skip_prompt and self.next_tokens_are_prompt:
            self.next_tokens_are_prompt = False
            return
        self.next_tokens_are_prompt = False
        new = value.tolist()
        self.token_cache.extend(new)
        text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
        if text.endswith("\n"):
            # a line is out: the cache starts again from its last token that decodes to text, kept
            # as the decoding context of the next line (a SentencePiece tokenizer drops the leading
            # space of a text's first token, so the next line's indentation would lose one; as
            # Transformers 5.24 fixed it). Past special tokens that the decode skips: among this
            # put's tokens, else the cache keeps its start (the context an earlier line left).
            printable = text[self.print_len :]
            start = next((i for i in range(len(self.token_cache) - 1, len(self.token_cache) - len(new) - 1, -1)
                          if self.tokenizer.decode([self.token_cache[i]], **self.decode_kwargs)), 0)
            self.token_cache = self.token_cache[start:]
            self.print_len = len(self.tokenizer.decode(self.token_cache, **self.decode_kwargs))
        elif text and _is_cjk(ord(text[-1])):
            printable = text[self.print_len :]
            self.print_len += len(printable)
        else:
            printable = text[self.print_len : text.rfind(" ") + 1]
            self.print_len += len(printable)
        self.on_finalized_text(printable)

    def end(self) -> None:
        printable = ""
        if self.token_cache:
            printable = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)[self.print_len :]
        self.token_cache, self.print_len = [], 0
        self.next_tokens_are_prompt = True
        self.on_finalized_text(printable, stream_end=True)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        """Print `text`; a newline ends the stream."""
        print(text, flush=True, end=None if stream_end else "")


class TextIteratorStreamer(TextStreamer):
    """Queue the text for another thread: `for chunk in streamer: ...` while `generate` runs.

    `timeout` (seconds) bounds each wait on the queue, so a consumer is not stuck forever if
    `generate` fails in its thread (`queue.Empty` is raised instead).
    """

    def __init__(self, tokenizer: Any, skip_prompt: bool = False, timeout: float | None = None,
                 **decode_kwargs: Any) -> None:
        super().__init__(tokenizer, skip_prompt, **decode_kwargs)
        self.text_queue: Queue = Queue()
        self.stop_signal = None
        self.timeout = timeout

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.text_queue.put(text, timeout=self.timeout)
        if stream_end:
            self.text_queue.put(self.stop_signal, timeout=self.timeout)

    def __iter__(self):
        return self

    def __next__(self) -> str:
        value = self.text_queue.get(timeout=self.timeout)
        if value is self.stop_signal:
            raise StopIteration
        return value


class AsyncTextIteratorStreamer(TextStreamer):
    """Queue the text for an asyncio consumer: `async for chunk in streamer: ...` while `generate`
    runs in another thread. Make it inside the running event loop, which receives the text;
    `timeout` (seconds) bounds each wait (`TimeoutError`)."""

    def __init__(self, tokenizer: Any, skip_prompt: bool = False, timeout: float | None = None,
                 **decode_kwargs: Any) -> None:
        super().__init__(tokenizer, skip_prompt, **decode_kwargs)
        try:
            self.loop = asyncio.get_running_loop()
        except RuntimeError as e:
            raise RuntimeError("AsyncTextIteratorStreamer must be made inside a coroutine: it hands the text to "
                               "the running event loop") from e
        self.text_queue: asyncio.Queue = asyncio.Queue()
        self.stop_signal = None
        self.timeout = timeout

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        # generate runs in another thread: the loop's own thread puts the text into its queue
        self.loop.call_soon_threadsafe(self.text_queue.put_nowait, text)
        if stream_end:
            self.loop.call_soon_threadsafe(self.text_queue.put_nowait, self.stop_signal)

    def __aiter__(self):
        return self

    async def __anext__(self) -> str:
        value = await asyncio.wait_for(self.text_queue.get(), self.timeout)
        if value is self.stop_signal:
            raise StopAsyncIteration
        return value


def _is_cjk(cp: int) -> bool:
    """Whether code point `cp` is a CJK ideograph (these are printed one by one, having no spaces)."""
    return any(lo <= cp <= hi for lo, hi in _CJK_RANGES)


_CJK_RANGES = (
    (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F),
)

__all__ = ["BaseStreamer", "TextIteratorStreamer", "TextStreamer"]
