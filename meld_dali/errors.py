"""Errors a user can fix (bad path, bad key, ...): the CLI prints them as one line, exit 1."""


class UserError(Exception):
    """A mistake in the user's input; its message names the file/key and the problem."""
