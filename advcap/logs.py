"""Logging of an advcap process: advcap's own progress and results, and only the third-party output that says
something to the user.

`setup_logging` is called once per process by whoever owns it: the command line (`advcap.cli`) and the
ablation's spawned workers. Below the DEBUG level (the default; `advcap --verbose` is DEBUG) it silences, each at
its source, the third-party notices that are known to be expected on every run:

- DeepSpeed's "Setting accelerator to CPU" (a warning on every CPU host, where no accelerator is the normal case);
- transformers' generation warning that no `attention_mask` was passed with a batch while the pad token is the EOS
  token. For an encoder-decoder captioner that mask would be the *encoder's*: a ViT's input is a fixed grid of
  patches with nothing padded, so there is no mask to pass (the decoder's own mask is passed: see
  `advcap.model.Captioner.generate`);
- transformers' progress bars for loading and writing checkpoints ("Loading weights", "Writing model shards"),
  which advcap's own log lines already announce (and with them the model hub's download bars).

Each filter drops only the named messages of the one logger that emits them; every other warning of those
libraries still shows.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

# (logger name, start of a message it logs) for each known notice; see the module docstring for why each.
KNOWN_NOTICES = (
    ("DeepSpeed", "Setting accelerator to CPU"),
    ("transformers.generation.utils", "The attention mask is not set with a batched input"),
)


class _DropMessages(logging.Filter):
    """Drops the records whose message starts with one of `starts` or contains one of `parts`."""

    def __init__(self, starts: tuple[str, ...] = (), parts: tuple[str, ...] = ()):
        super().__init__()
        self.starts, self.parts = starts, parts

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return not (message.startswith(self.starts) or any(part in message for part in self.parts))


@contextlib.contextmanager
def held_back(logger_name: str, part: str) -> Iterator[None]:
    """Drop, while in the block, the records of one logger whose message contains `part` (for a notice the
    caller checks and reports itself)."""
    logger = logging.getLogger(logger_name)
    drop = _DropMessages(parts=(part,))
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def setup_logging(level: int, tag: str = "") -> None:
    """Configure the root logger (`level`, lines `HH:MM:SS LEVEL <tag>logger: message`); above DEBUG, also
    silence the known third-party notices (`quiet_known_notices`)."""
    logging.basicConfig(level=level, format=f"%(asctime)s %(levelname)s {tag}%(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if level > logging.DEBUG:
        quiet_known_notices()


def quiet_known_notices() -> None:
    """Silence the notices of KNOWN_NOTICES and transformers' progress bars, for the rest of this process.

    A filter on a logger object outlives the library's own setup of it: DeepSpeed creates its logger at import
    and sets its level then (so setting a level beforehand would be undone), but it keeps the filters it finds.
    """
    for name in {name for name, _ in KNOWN_NOTICES}:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(tuple(start for n, start in KNOWN_NOTICES if n == name)))
    _disable_transformers_progress_bars()


def _disable_transformers_progress_bars() -> None:
    """transformers reads huggingface_hub's global progress-bar switch when it is imported, so switching that
    off first spares importing transformers (a second) in commands that never use it; this also hides the
    hub's download bars. Once transformers is imported, its own switch is the one it reads."""
    import sys

    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()
    if "transformers.utils.logging" in sys.modules:
        sys.modules["transformers.utils.logging"].disable_progress_bar()
