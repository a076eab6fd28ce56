"""What every `fedlora-server` command shares: a bad argument or setting is one line and exit code 2."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from fedlora_common.settings import ConfigError

__all__ = ["OneLineParser", "config_error"]


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line and exits 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def config_error(exc: ConfigError | OSError) -> int:
    sys.stderr.write(f"fedlora-server: config error: {exc}\n")
    return 2
