"""dtlpy's per-request caller record, taken without reading source files, for the test processes.

dtlpy's `token_expired_decorator` (dtlpy/services/api_client.py) wraps every `gen_request` and calls
`inspect.stack()[1]` to pass the caller's frame on as a `stack` keyword, which the SDK then leaves
unused (its event tracker is commented out). `inspect.stack()` reads the source line of every frame
and, for each frame of a file that is not on disk (`<frozen runpy>`, execnet's `<string>` in a
pytest-xdist worker), scans all of `sys.modules` without caching the miss: in a test process, with
thousands of modules loaded, a cost on every request (measured in bench/RESULTS.md). `install()` gives the SDK
the same frame records (frame, file name, line, function) without the source lines, so the requests,
the token check and what the SDK does with the answers are unchanged.
"""
import inspect
import sys
import types


def caller_frames(context: int = 1) -> list:
    """`inspect.stack()` for the frames above the caller, without source lines (`context` is accepted and
    ignored)."""
    records = []
    frame = sys._getframe(1)
    while frame is not None:
        records.append(inspect.FrameInfo(frame, frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name,
                                         None, None))
        frame = frame.f_back
    return records


def install() -> None:
    """Point dtlpy's api_client at `caller_frames` for `inspect.stack` (every other name is `inspect`'s)."""
    from dtlpy.services import api_client
    if getattr(api_client.inspect, 'stack', None) is caller_frames:
        return
    shim = types.ModuleType('inspect')
    shim.__dict__.update(inspect.__dict__)
    shim.stack = caller_frames
    api_client.inspect = shim
