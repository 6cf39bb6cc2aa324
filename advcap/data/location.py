"""Where shards live, and opening them: a local folder, or URLs in WebDataset's conventions.

A shard source (`data.shards`, `advcap verify`'s argument) is one of
    a local folder            shards/coco               manifest.json and the tars inside it
    a URL folder              https://host/coco/        https://host/coco/manifest.json and the tars it lists
    shard URLs / patterns     https://host/coco/train-{000000..000123}.tar
                              pipe:aws s3 cp s3://bucket/train-{000000..000123}.tar -
                              file:/data/coco/val-000000.tar
                              several joined with `::`; brace patterns expanded as WebDataset does
A URL is `http(s)://`, `file:` or `pipe:CMD` (CMD's standard output is the shard: the way to reach
object stores, e.g. `pipe:aws s3 cp s3://… -`). A pattern may carry its split in front (`val=https://…`);
otherwise a shard's split is the `train`/`val`/`test` its file name starts with, as advcap names them.

Opening is retried: a fetch that fails before its first byte (connection refused, HTTP 5xx, a pipe
command that exits non-zero without output) is tried `retries` more times with a growing pause,
then raised as FetchError naming the URL and the last error. A transfer that breaks midway is not
retried (the samples already read would repeat): readers handle it like a corrupt shard.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import select
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from stat import S_ISREG
from typing import BinaryIO

import braceexpand

from advcap.data.sources import SPLITS
from advcap.errors import AdvcapError

log = logging.getLogger(__name__)

URL_SCHEMES = ("http://", "https://", "file:", "pipe:")
# A fetch that gets no byte for this long is given up: an HTTP socket read times out, a `pipe:` command is
# stopped. Without it a stalled server or command would hang a reader (and a single-process job) forever.
FETCH_TIMEOUT_S = 60.0
FIRST_RETRY_PAUSE_S = 0.5


class FetchError(AdvcapError):
    """A URL could not be opened (after retries); the message names the URL and the error."""

    def __init__(self, url: str, error: str, missing: bool = False):
        super().__init__(f"{url}: {error}")
        self.url, self.error, self.missing = url, error, missing


def is_remote(source: str) -> bool:
    """True if `source` is URLs or patterns rather than a local folder."""
    return _split_prefix(source)[1].startswith(URL_SCHEMES) or "::" in source or "{" in source


def is_url_folder(source: str) -> bool:
    """True for one http(s):// or file: URL that names no shard (….tar): a folder holding manifest.json."""
    return (source.startswith(("http://", "https://", "file:")) and "::" not in source and "{" not in source
            and not re.search(r"\.tar\b", source))


def runs_commands(source: str) -> bool:
    """True if reading `source` runs a shell command (a `pipe:` URL anywhere in it)."""
    return any(_split_prefix(part.strip())[1].startswith("pipe:") for part in source.split("::"))


def expand_shard_urls(source: str) -> list[tuple[str | None, str]]:
    """(split or None, URL) for every shard of a `::`-joined list of URLs and brace patterns."""
    shards = []
    for part in source.split("::"):
        split, url = _split_prefix(part.strip())
        if not url:
            raise AdvcapError(f"{source!r}: an empty entry between '::'")
        shards += [(split, u) for u in braceexpand.braceexpand(url)]
    return shards


def _split_prefix(part: str) -> tuple[str | None, str]:
    head, sep, rest = part.partition("=")
    if sep and head in SPLITS:
        return head, rest
    return None, part


def shard_name(url: str) -> str:
    """The shard's file name: the last `….tar` path component in the URL (or pipe command)."""
    names = re.findall(r"[^/\s'\"=:]+\.tar\b", url)
    if not names:
        raise AdvcapError(f"{url}: no shard file name (….tar) in it")
    return names[-1]


def beside(url: str, name: str) -> str:
    """The URL of file `name` in the same place as shard `url` (the shard's file name replaced)."""
    last = shard_name(url)
    at = url.rindex(last)
    return url[:at] + name + url[at + len(last):]


def split_of(url: str, given: str | None) -> str | None:
    """The split given in front of the pattern, else the one the file name starts with, else None."""
    if given is not None:
        return given
    stem = shard_name(url)
    for split in SPLITS:
        if stem.startswith(f"{split}-"):
            return split
    return None


def open_url(url: str, retries: int = 3) -> BinaryIO:
    """A binary stream of `url` (local path, file:, http(s)://, pipe:), opening retried as the module says."""
    pause = FIRST_RETRY_PAUSE_S
    for attempt in range(retries + 1):
        try:
            return _open_once(url)
        except FetchError as err:
            if err.missing or attempt == retries:
                if attempt:
                    raise FetchError(url, f"{err.error} (tried {attempt + 1} times)", err.missing) from None
                raise
            log.warning("%s: %s; retrying in %.1f s (%d of %d)", url, err.error, pause, attempt + 1, retries)
            time.sleep(pause)
            pause *= 2
    raise AssertionError("unreachable")


def fetch(url: str, retries: int = 3) -> bytes:
    """The whole content of `url` (small files: manifests)."""
    stream = open_url(url, retries)
    try:
        return stream.read()
    except OSError as err:
        raise FetchError(url, f"transfer failed: {err}") from None
    finally:
        stream.close()


def size_of(url: str) -> int | None:
    """The size in bytes the server or file system reports, or None where it cannot be asked (pipe:)."""
    if url.startswith(("http://", "https://")):
        request = urllib.request.Request(url, method="HEAD")
        try:
            with urllib.request.urlopen(request, timeout=FETCH_TIMEOUT_S) as response:
                length = response.headers.get("Content-Length")
        except (urllib.error.URLError, OSError) as err:
            raise _http_error(url, err) from None
        return int(length) if length is not None else None
    if url.startswith("pipe:"):
        return None
    path = _local_path(url)
    try:
        stat = path.stat()
        if not S_ISREG(stat.st_mode):
            raise FetchError(url, "not a file", missing=True)
        return stat.st_size
    except OSError as err:
        raise _local_error(url, err) from None


def _open_once(url: str) -> BinaryIO:
    if url.startswith(("http://", "https://")):
        try:
            return urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_S)
        except (urllib.error.URLError, OSError) as err:
            raise _http_error(url, err) from None
    if url.startswith("pipe:"):
        return _open_pipe(url)
    path = _local_path(url)
    try:
        return open(path, "rb")
    except OSError as err:
        raise _local_error(url, err) from None


def _local_path(url: str) -> Path:
    if url.startswith("file:"):
        return Path(urllib.parse.unquote(urllib.parse.urlparse(url).path))
    return Path(url)


def _http_error(url: str, err: OSError) -> FetchError:
    """An HTTP status or a connection failure as a FetchError; gone for good (no retry) for 403, 404 and 410."""
    if isinstance(err, urllib.error.HTTPError):
        return FetchError(url, f"HTTP {err.code} {err.reason}", missing=err.code in (403, 404, 410))
    reason = getattr(err, "reason", None)
    return FetchError(url, str(reason if reason is not None else err))


def _local_error(url: str, err: OSError) -> FetchError:
    if isinstance(err, FileNotFoundError):
        return FetchError(url, "missing", missing=True)
    return FetchError(url, f"cannot be read ({err.strerror or err})")


def _open_pipe(url: str) -> BinaryIO:
    """Run the command; fail (retryable) if it exits non-zero before writing anything."""
    # stderr to a file, not a pipe: a chatty command could fill a pipe nobody reads and stall. Its own session:
    # stopping it stops what it started too (a CLI's helper processes would otherwise keep the pipe open).
    errors = tempfile.TemporaryFile()
    process = subprocess.Popen(url[len("pipe:"):], shell=True, stdout=subprocess.PIPE, stderr=errors,
                               start_new_session=True, bufsize=0)  # unbuffered: select() sees every byte waiting
    stream = _PipeStream(url, process, errors)
    if not stream.peek(1):
        stream.read()  # at the end already: raises FetchError if the command failed
        stream.close()
        return io.BytesIO(b"")
    return stream


class _StallGuard(io.RawIOBase):
    """A command's standard output, read with a deadline: no byte for FETCH_TIMEOUT_S stops the command."""

    def __init__(self, stream: "_PipeStream", output: BinaryIO):
        super().__init__()
        self.stream, self.output = stream, output

    def readable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self.output.fileno()

    def readinto(self, buffer) -> int:  # type: ignore[override]
        ready, _, _ = select.select([self.output], [], [], FETCH_TIMEOUT_S)
        if not ready:
            self.stream.stop_command()
            raise FetchError(self.stream.url, f"the command wrote nothing for {FETCH_TIMEOUT_S:g} s: stopped it")
        return self.output.readinto(buffer)

    def close(self) -> None:
        self.output.close()
        super().close()


class _PipeStream(io.BufferedReader):
    """A command's standard output; closing it (or reaching its end) checks the exit status."""

    def __init__(self, url: str, process: subprocess.Popen, errors: BinaryIO):
        self.url, self.process, self.errors = url, process, errors
        self.checked = False
        super().__init__(_StallGuard(self, process.stdout))  # type: ignore[arg-type]

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        if not data and size != 0:
            self._check_exit(at_end=True)
        return data

    def close(self) -> None:
        if self.closed:
            return
        super().close()
        self._check_exit(at_end=False)

    def stop_command(self) -> None:
        """Stop the command and what it started; its exit status then says nothing more."""
        self._kill_session()
        self.process.wait()
        self.checked = True
        self.errors.close()

    def _kill_session(self) -> None:
        """SIGKILL the command's session (started with it): the command and every process it started."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)

    def _check_exit(self, at_end: bool) -> None:
        if self.checked:
            return
        self.checked = True
        killed = not at_end and self.process.poll() is None
        if killed:  # closed before the end: the reader is done with it
            self._kill_session()
        code = self.process.wait()
        self.errors.seek(0)
        stderr = self.errors.read().decode(errors="replace").strip()
        self.errors.close()
        if code != 0 and not killed:
            tail = stderr.splitlines()[-1] if stderr else "no message"
            raise FetchError(self.url, f"command exited with status {code}: {tail}")
