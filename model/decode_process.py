"""Decoding in a process of its own, with a deadline on every call.

decord can hang inside native code while holding the GIL (decord issues 269, 220, 294,
373), and opening a FIFO blocks forever: no thread can time such a call out, and one such
file would stall a Ray worker, and with it a whole DDP run. So every run-time decode (Ray
Data's decode tasks, the feature cache's actors, attention examples, `jlstm predict`, the
served model) goes through a `BoundedDecoder`: one child process per decoder, fed one
request at a time over a pipe. A call that has no answer within `timeout_s` kills the child
(SIGKILL: a native hang ignores anything gentler) and raises `DecodeTimeout`; the next call
starts a fresh child. A child that dies (a decoder crash) raises `VideoError` alike. The
caller records the clip as bad and goes on.

A file that timed out fails at once on later calls of the same decoder (until it is
replaced: a new inode, size or mtime): a hanging file costs one deadline per process, not
one per clip (a decode task has up to `decode_batch_size` clips of it).

Cost: the child writes the frames into a shared memory buffer (a memfd both processes
map), so only a few bytes cross the pipe and the frames are copied once more than in
process; each process pays one child start (about 0.2 s: Python, numpy, decord).
Sending the frames through the pipe instead cost 10-20% of the decode pipeline's clips/s
on 2 loaded cores (a 64 KiB pipe: a clip of 16 x 64 x 64 x 3 bytes took 3 writes and as
many wake-ups of each side). benchmarks/decode.py measures it against in-process decoding.

Ships with the registered model (only `model/` does): it imports numpy alone here, decord
in the child.
"""

from __future__ import annotations

import atexit
import mmap
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

# data.decode_timeout_s's default: a UCF101 clip decodes in milliseconds, a 1080p one in
# well under a second here; 30 s is only ever reached by a hang.
DEFAULT_TIMEOUT_S = 30.0
# Open readers a child keeps (decord indexes the whole file on open): clips of one video
# come together in evaluation order and in the cache build.
READERS_PER_CHILD = 4
# Linux prctl option: the kernel sends this signal to the child when its parent dies, so a
# child hung in native code never outlives the worker that started it.
_PR_SET_PDEATHSIG = 1


class VideoError(ValueError):
    """A video that cannot be decoded; the message is one line: the decoder's reason."""


class DecodeTimeout(VideoError):
    """A decode that did not answer within the decoder's deadline; its process was killed."""


def one_line(err: BaseException) -> str:
    """An exception as one line: decord's messages span many (a C++ stack), and errors end
    up in table rows and one-line reports."""
    return f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"


def open_video(path: str | Path, frame_size: int) -> Any:
    """A decord VideoReader of `path` that resizes to frame_size x frame_size while decoding,
    in this process and without a deadline (the child's side of `BoundedDecoder`).

    One decoder thread: parallelism comes from processes (Ray tasks, actors), each with its
    own CPU budget. Raises `VideoError` when the file cannot be opened or has no frames.
    """
    import decord  # imported where a video is decoded: loading the model needs no decoder

    try:
        reader = decord.VideoReader(str(path), width=frame_size, height=frame_size, num_threads=1)
    except Exception as err:  # decord raises DECORDError, RuntimeError, ...
        raise VideoError(one_line(err)) from None
    if len(reader) < 1:
        raise VideoError("the video has no frames")
    return reader


def _identity(path: str) -> tuple:
    """A file as the timeout memo knows it: its path and what changes when it is replaced."""
    try:
        st = os.stat(path)  # a stat never opens the file: a FIFO does not block it
    except OSError:
        return (path,)
    return (path, st.st_ino, st.st_size, st.st_mtime_ns)


def _anonymous_file() -> int:
    """A descriptor of a file with no name: a memfd, else an unlinked temporary file."""
    if hasattr(os, "memfd_create"):
        return os.memfd_create("jlstm-decode")
    with tempfile.TemporaryFile() as file:  # unlinked already: gone with its last descriptor
        return os.dup(file.fileno())


class BoundedDecoder:
    """Decodes in a child process; every call has a deadline of `timeout_s` seconds.

    Thread-safe (one request at a time): a served model may be called from several threads.
    """

    def __init__(self, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s = {timeout_s} must be > 0")
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._child: subprocess.Popen | None = None
        self._send: Connection | None = None
        self._recv: Connection | None = None
        # The files that timed out (by path and identity: a file replaced since is tried
        # again), with the reason.
        self._timed_out: dict[tuple, str] = {}
        # The frames' shared buffer: the child maps the same file.
        self._shared_file = _anonymous_file()
        self._shared: mmap.mmap | None = None

    def num_frames(self, path: str | Path, frame_size: int) -> int:
        """Frames of the video at `path` (opened at `frame_size`); `VideoError` if unreadable."""
        with self._lock:
            return int(self._call(("len", str(path), frame_size, None, 0)))

    def read(
        self, path: str | Path, frame_size: int, clips: Sequence[Sequence[int]]
    ) -> np.ndarray:
        """uint8 ``[N, T, S, S, 3]``: the frames `clips[i]` (T indices each) of the video at
        `path` resized to S = `frame_size`. Raises `VideoError` (`DecodeTimeout` past the
        deadline) naming the decoder's reason."""
        frames = [[int(f) for f in clip] for clip in clips]
        shape = (len(frames), len(frames[0]) if frames else 0, frame_size, frame_size, 3)
        if not frames:
            return np.zeros(shape, np.uint8)
        with self._lock:
            self._reserve(int(np.prod(shape)))
            self._call(("read", str(path), frame_size, frames, len(self._shared or b"")))
            assert self._shared is not None
            return np.ndarray(shape, np.uint8, buffer=self._shared).copy()

    def close(self) -> None:
        """Stop the child process (a later call starts a new one)."""
        with self._lock:
            self._stop()

    def _reserve(self, size: int) -> None:
        """Grow the shared buffer to hold `size` bytes (doubling: few remaps)."""
        if self._shared is not None and len(self._shared) >= size:
            return
        size = max(size, 2 * len(self._shared or b""), mmap.PAGESIZE)
        if self._shared is not None:
            self._shared.close()
        os.ftruncate(self._shared_file, size)
        self._shared = mmap.mmap(self._shared_file, size)

    def _call(self, request: tuple[str, str, int, Any, int]) -> Any:
        """One request to the child, under the deadline (the caller holds the lock)."""
        path = _identity(request[1])
        if path in self._timed_out:
            raise DecodeTimeout(self._timed_out[path])
        self._start()
        assert self._send is not None and self._recv is not None
        try:
            self._send.send(request)
            if not self._recv.poll(self.timeout_s):
                reason = (
                    f"timeout: no answer within {self.timeout_s:g} s "
                    "(data.decode_timeout_s); the decoder process was killed"
                )
                self._stop()
                self._timed_out[path] = reason
                raise DecodeTimeout(reason)
            status, value = self._recv.recv()
        except (EOFError, OSError):  # the child died: a crash in the decoder
            code = self._stop()
            raise VideoError(f"the decoder process died (exit code {code})") from None
        if status == "error":
            raise VideoError(value)
        return value

    def _start(self) -> None:
        if self._child is not None and self._child.poll() is None:
            return
        self._stop()
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        # The child imports `model` from where this process did (a served model's code path
        # is on sys.path, not on PYTHONPATH).
        package_root = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (package_root, env.get("PYTHONPATH")) if p
        )
        self._child = subprocess.Popen(
            [sys.executable, "-m", "model.decode_process", str(to_child_r), str(from_child_w),
             str(self._shared_file), str(os.getpid())],
            pass_fds=(to_child_r, from_child_w, self._shared_file), env=env,
            stdin=subprocess.DEVNULL,
        )
        os.close(to_child_r)
        os.close(from_child_w)
        self._send = Connection(to_child_w, readable=False)
        self._recv = Connection(from_child_r, writable=False)
        _live.add(self)

    def _stop(self) -> int | None:
        """Kill the child (if any) and close the pipes; returns its exit code."""
        code = None
        if self._child is not None:
            if self._child.poll() is None:
                self._child.send_signal(signal.SIGKILL)
            code = self._child.wait()
            self._child = None
        for conn in (self._send, self._recv):
            if conn is not None:
                conn.close()
        self._send = self._recv = None
        _live.discard(self)
        return code


# Decoders with a live child: stopped when this process exits normally (a killed process's
# children end by their parent-death signal).
_live: set[BoundedDecoder] = set()
atexit.register(lambda: [decoder.close() for decoder in list(_live)])

_shared: dict[float, BoundedDecoder] = {}


def shared_decoder(timeout_s: float = DEFAULT_TIMEOUT_S) -> BoundedDecoder:
    """This process's decoder with deadline `timeout_s`: a Ray worker runs many decode tasks
    and keeps one child for all of them."""
    if timeout_s not in _shared:
        _shared[timeout_s] = BoundedDecoder(timeout_s)
    return _shared[timeout_s]


def _serve(requests: Connection, replies: Connection, shared_file: int) -> None:
    """The child's loop: one request in, one reply out, until the parent closes the pipe.
    Frames go into the shared file, mapped at the size the request names."""
    readers: OrderedDict[tuple, Any] = OrderedDict()
    shared: mmap.mmap | None = None
    while True:
        try:
            kind, path, frame_size, clips, shared_size = requests.recv()
        except EOFError:
            return
        # Keyed by the file's identity too: a video replaced under the same path is reopened.
        key = (*_identity(path), frame_size)
        try:
            if key not in readers:
                readers[key] = open_video(path, frame_size)
                if len(readers) > READERS_PER_CHILD:
                    readers.popitem(last=False)
            readers.move_to_end(key)
            reader = readers[key]
            if kind == "len":
                replies.send(("value", len(reader)))
                continue
            if shared is None or len(shared) != shared_size:
                if shared is not None:
                    shared.close()
                shared = mmap.mmap(shared_file, shared_size)
            shape = (len(clips), len(clips[0]), frame_size, frame_size, 3)
            _decode_into(np.ndarray(shape, np.uint8, buffer=shared), reader, clips)
        except Exception as err:  # decord raises DECORDError, RuntimeError, IndexError...
            readers.pop(key, None)
            replies.send(("error", str(err) if isinstance(err, VideoError) else one_line(err)))
            continue
        replies.send(("frames", None))


def _decode_into(out: np.ndarray, reader: Any, clips: list[list[int]]) -> None:
    """Each clip's frames into its row of `out` (a view of the shared map, dropped on return:
    a view that outlived the call would keep the map from being remapped)."""
    for i, clip in enumerate(clips):
        out[i] = reader.get_batch(clip).asnumpy()


def _die_with_parent(parent_pid: int) -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before the signal was set
        os._exit(0)


if __name__ == "__main__":
    _die_with_parent(int(sys.argv[4]))
    _serve(Connection(int(sys.argv[1]), writable=False),
           Connection(int(sys.argv[2]), readable=False), int(sys.argv[3]))
