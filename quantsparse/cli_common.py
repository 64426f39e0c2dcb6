"""What every command line of the pack shares: one line per error, whatever its source."""

from __future__ import annotations

import argparse
import sys
from typing import Callable


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line like every other error (exit 2), with where to look."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def run_command(prog: str, command: Callable[[], int], *, after: str = "; nothing was written",
                interrupt_hint: str = "") -> int:
    """``command()``, its failures as one line on stderr and an exit code: a refusal (ValueError, QuantSparseError
    included) 2, a system failure (disk full, I/O error) 1, Ctrl-C 130. ``after`` says what is left behind."""
    try:
        return command()
    except ValueError as e:
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"{prog}: error: {e.strerror or one_line(e)}{where}{after}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\ninterrupted{after}{interrupt_hint}", file=sys.stderr)
        return 130
