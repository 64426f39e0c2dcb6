"""What every command line of the pack shares: one line per error, whatever its source."""

from __future__ import annotations

import argparse


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line like every other error (exit 2), with where to look."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split())
