"""``python -m mpitrain``: run the CLI; any uncaught exception on any rank ends the job.

A user error (bad config, bad data) prints one ``[rank r@host] error: ...`` line;
a bug prints its traceback too. Either way the rank calls ``Abort`` so no other
rank stays blocked in a receive. Ranks other than 0 wait a moment before reporting,
so an error every rank hits (bad config, bad data) prints once, from rank 0.
"""

from __future__ import annotations

import sys
import traceback


def main(argv=None) -> int:
    from .runtime import UserError, abort, defer_to_rank0, error_message, job_size, report

    try:
        from .cli import main as cli_main

        return cli_main(argv)
    except SystemExit as e:  # argparse and explicit exits: clean code on this rank
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if code != 0 and job_size() > 1:
            abort(code)
        return code
    except BrokenPipeError:  # stdout was closed early (`... | head`): not an error, no traceback
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's own flush at exit
        if job_size() > 1:
            abort(141)
        return 141  # 128 + SIGPIPE, as a shell reports it
    except KeyboardInterrupt:
        defer_to_rank0()
        report(error_message(KeyboardInterrupt("interrupted")))
        abort(130)
    except BaseException as exc:  # noqa: BLE001 - the whole point is to catch everything
        defer_to_rank0(exc)  # an error every rank hits is reported once, by rank 0
        if not isinstance(exc, UserError):
            traceback.print_exc()
        report(error_message(exc))
        abort(1)
    return 1


if __name__ == "__main__":
    sys.exit(main())
