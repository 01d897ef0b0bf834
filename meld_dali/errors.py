"""Errors a user can fix (bad path, bad key, ...): the CLI prints them as one line, exit 1."""


class UserError(Exception):
    """A mistake in the user's input; its message names the file/key and the problem."""


class BackendFault(UserError):
    """A loader backend cannot do its work on this machine (no NVDEC, a CUDA driver fault, a
    decoder that does not take these clips): one line naming the backend, what the backend
    said and the likely cause. Never a bad clip: the CPU path reads the clips."""

    def __init__(self, backend: str, reason: str, cause: str):
        self.backend, self.reason, self.cause = backend, reason, cause
        super().__init__(f"{backend} failed: {cause} (DALI: {reason}); `meld-dali doctor` "
                         "checks this machine, loader.backend=torch trains without DALI")
