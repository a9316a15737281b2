"""Errors meant for the user: the command line prints the message alone and exits with status 2."""


class UserError(Exception):
    """Bad input or an unsafe request; the message names the thing and says what to do."""

    exit_code = 2
