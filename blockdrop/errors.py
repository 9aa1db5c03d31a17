"""The one exception type for mistakes a user can make, and how the CLIs report it."""
from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(Exception):
    """Bad input from the user (flag, file, data): the message names the thing and the fix."""


def run_cli(main: Callable[[], None]) -> None:
    """Run a CLI's main; a UserError becomes `error: ...` on stderr and exit status 2."""
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
