"""A worker's entry point under ``meshwise run``: run the user's script as ``__main__``.

``python -m meshwise.worker SCRIPT ARGS...`` (or ``-m MODULE ARGS...``). An exception is
written to the agent's error file for the launcher to report once, instead of every
rank printing its own traceback; outside the launcher it is printed as usual.
"""

from __future__ import annotations

import atexit
import faulthandler
import os
import runpy
import sys
import threading

from meshwise.launch import ERROR_FILE_ENV, die_with_parent, leave_group, record_failure
from meshwise.observe import VERIFY_ENV, mark_ranks


def _ours(filename: str) -> bool:
    """Traceback frames of this bootstrap and runpy, left out of what the user sees."""
    return filename in (__file__, "<frozen runpy>")


def main(argv: list[str]) -> int:
    if argv[:1] == ["-m"] and len(argv) >= 2:
        target, args, as_module = argv[1], argv[2:], True
    elif argv:
        target, args, as_module = argv[0], argv[1:], False
    else:
        print("usage: python -m meshwise.worker SCRIPT [ARGS...] | -m MODULE [ARGS...]", file=sys.stderr)
        return 2
    sys.argv = [target, *args]
    die_with_parent()
    mark_ranks()
    if os.environ.get(VERIFY_ENV):  # meshwise verify: both runs start from the same seeds, seeded or not
        import random

        import numpy
        import torch

        random.seed(0)
        numpy.random.seed(0)
        torch.manual_seed(0)
    try:
        if as_module:
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            sys.path.insert(0, os.path.dirname(os.path.abspath(target)))
            runpy.run_path(target, run_name="__main__")
    except SystemExit as done:
        if done.code is None or done.code == 0:
            return 0
        if os.environ.get(ERROR_FILE_ENV):  # the launcher reports it once, for the rank that caused it
            record_failure(done, skip=_ours)
        elif not isinstance(done.code, int):
            print(done.code, file=sys.stderr)
        return done.code if isinstance(done.code, int) else 1
    except KeyboardInterrupt:  # Ctrl-C reaches every rank; the launcher says it once
        return 130
    except Exception as exc:
        if not os.environ.get(ERROR_FILE_ENV):
            raise
        record_failure(exc, skip=_ours)
        return 1
    finally:
        leave_group()
    return 0


def _leave(code: int) -> None:
    """Exit after the script's own exit work (its threads, its atexit functions), skipping
    the interpreter's teardown of torch's C++ state: with gloo, that teardown after all
    work was done aborted (std::terminate, SIGABRT) in about 1 of 30 runs, failing a
    finished job."""
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    faulthandler.enable()  # a crash in native code shows the Python stack it happened under
    _leave(main(sys.argv[1:]))
