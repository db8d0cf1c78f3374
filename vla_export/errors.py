"""User-facing errors: one clear line, a distinct exit code, no traceback.

Every stage raises `UserError` for input the user can fix; the CLI prints `error: <message>` and exits with
`exit_code`. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

# Exit codes the CLI and the Makefile rely on.
EXIT_USER_ERROR = 2  # bad input: missing file, wrong format, bad option
EXIT_GATE_FAILED = 3  # an artifact was written but failed its accuracy/parity gate
EXIT_UNAVAILABLE = 4  # a backend this machine cannot run (no GPU, TensorRT not installed): a skip, not a failure


class UserError(Exception):
    """Input the user can fix. `str(err)` is the one line shown to them."""

    exit_code = EXIT_USER_ERROR

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class GateFailed(UserError):
    """An artifact missed its accuracy budget. The artifact stays on disk, marked failed in its manifest."""

    exit_code = EXIT_GATE_FAILED


class BackendUnavailable(UserError):
    """A backend (TensorRT, CUDA, onnxruntime-gpu) is missing here; pipelines report the stage as skipped."""

    exit_code = EXIT_UNAVAILABLE
