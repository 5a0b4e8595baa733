"""Mistakes in what a user asked for, told apart from bugs: the command-line tools print them as one line."""

from __future__ import annotations


class UsageError(ValueError):
    """A wrong option, value, file or combination given by the user.

    The message names the option, the value and what would work; the entry points print it as one line and exit
    with status 2, without a traceback (``HYDRA_FULL_ERROR=1`` shows it).
    """
