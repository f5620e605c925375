"""Output callbacks, run on the caller's event loop.

The library produces output on its own threads. Each chunk is handed to the loop that awaits
the call with ``loop.call_soon_threadsafe`` and decoded there (UTF-8, incrementally, so a
character split between chunks arrives whole), and only then is the user's callback called:
user code never runs on a library thread, and chunks arrive in order.

An exception raised by a callback does not stop the execution: that callback is not called
again, the execution runs to its end, and the exception is then raised from the awaited
``run()`` / ``exec()`` (the result is discarded). When the call itself failed, its own error is
raised and the callback's is attached to it as a note.
"""

from __future__ import annotations

import asyncio
import codecs
from collections.abc import Awaitable, Callable

__all__ = ["OutputCallback", "Streams"]

OutputCallback = Callable[[str], object]


class _Stream:
    def __init__(self, streams: Streams, name: str, callback: OutputCallback) -> None:
        self._streams = streams
        self._name = name
        self._callback = callback
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._failed = False

    def deliver(self, chunk: bytes) -> None:
        """Called on a library thread: only schedules the chunk on the caller's loop."""
        try:
            self._streams.loop.call_soon_threadsafe(self._emit, chunk)
        except RuntimeError:
            # The loop is closed: nobody is left to receive the output.
            pass

    def _emit(self, chunk: bytes) -> None:
        if self._streams.closed:
            return
        self._call(self._decoder.decode(chunk))

    def flush(self) -> None:
        self._call(self._decoder.decode(b"", final=True))

    def _call(self, text: str) -> None:
        if not text or self._failed:
            return
        try:
            self._callback(text)
        except Exception as e:  # noqa: BLE001 - reported from the awaited call
            self._failed = True
            self._streams.errors.append((self._name, e))


class Streams:
    """The output callbacks of one call."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.errors: list[tuple[str, Exception]] = []
        self.closed = False
        self._streams: list[_Stream] = []

    def wrap(self, name: str, callback: OutputCallback | None) -> Callable[[bytes], None] | None:
        """What the native layer calls for `callback` (``None`` for none)."""
        if callback is None:
            return None
        if not callable(callback):
            raise TypeError(f"{name} must be callable, not {type(callback).__name__}")
        stream = _Stream(self, name, callback)
        self._streams.append(stream)
        return stream.deliver

    def finish(self) -> None:
        """After the call succeeded: flush the decoders, raise the first callback error."""
        for stream in self._streams:
            stream.flush()
        self.closed = True
        if self.errors:
            name, error = self.errors[0]
            _note(error, f"raised by the {name} callback; the execution ran to its end")
            raise error

    async def settle(self, call: Awaitable[str]) -> str:
        """Awaits the native call, then finishes (or abandons, on failure) the callbacks."""
        try:
            text = await call
        except BaseException as e:
            self.abandon(e)
            raise
        self.finish()
        return text

    def abandon(self, error: BaseException | None) -> None:
        """After the call failed or was cancelled: drop later output, note callback errors."""
        self.closed = True
        if error is not None:
            for name, callback_error in self.errors:
                _note(error, f"the {name} callback also raised {callback_error!r}")


def _note(error: BaseException, text: str) -> None:
    add_note = getattr(error, "add_note", None)  # Python 3.11+
    if add_note is not None:
        add_note(text)
