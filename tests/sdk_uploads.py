"""dtlpy's upload stream read without an event loop per chunk, for the test processes.

aiohttp reads an upload's file through dtlpy's `AsyncUploadStream.read(size)`
(dtlpy/services/async_utils.py) 64 KiB at a time, and each call runs `asyncio.run` of a coroutine that
reads the chunk through `asyncio.to_thread`: an event loop and a worker thread started and joined per
chunk, so a checkpoint's upload to the emulator spends most of its time there (measured in
bench/RESULTS.md). `install()` reads the same bytes from the same buffer and reports them to the same
progress callback: the form, the bytes on the wire, the SDK's retries and what it does with the answers
are unchanged. Left out: the SDK's per-chunk read timeout (`chunk_timeout`, for a local disk that
stalls), which no test exercises.
"""


def read(self, size: int = -1) -> bytes:
    """`AsyncUploadStream.read` without the event loop: the chunk, and the callback told its size."""
    data = self.buffer.read(size)
    if self.callback is not None:
        self.callback(size)
    return data


def install() -> None:
    """Point dtlpy's `AsyncUploadStream.read` at `read` (idempotent)."""
    from dtlpy.services import async_utils
    async_utils.AsyncUploadStream.read = read
