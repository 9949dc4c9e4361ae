"""A worker's entry point under ``meshwise run``: run the user's script as ``__main__``.

``python -m meshwise.worker SCRIPT ARGS...`` (or ``-m MODULE ARGS...``). An exception is
written to the agent's error file for the launcher to report once, instead of every
rank printing its own traceback; outside the launcher it is printed as usual.
"""

from __future__ import annotations

import os
import runpy
import sys

from meshwise.launch import ERROR_FILE_ENV, leave_group, record_failure


def main(argv: list[str]) -> int:
    if argv[:1] == ["-m"] and len(argv) >= 2:
        target, args, as_module = argv[1], argv[2:], True
    elif argv:
        target, args, as_module = argv[0], argv[1:], False
    else:
        print("usage: python -m meshwise.worker SCRIPT [ARGS...] | -m MODULE [ARGS...]", file=sys.stderr)
        return 2
    sys.argv = [target, *args]
    try:
        if as_module:
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            sys.path.insert(0, os.path.dirname(os.path.abspath(target)))
            runpy.run_path(target, run_name="__main__")
    except SystemExit as done:
        code = done.code
        return code if isinstance(code, int) else (0 if code is None else _report_exit(code))
    except Exception as exc:
        if not os.environ.get(ERROR_FILE_ENV):
            raise
        record_failure(exc, skip=lambda name: name in (__file__, "<frozen runpy>"))
        return 1
    finally:
        leave_group()
    return 0


def _report_exit(message: object) -> int:
    print(message, file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
