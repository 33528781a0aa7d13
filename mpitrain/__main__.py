"""``python -m mpitrain``: run the CLI; any uncaught exception on any rank ends the job.

A user error (bad config, bad data) prints one ``[rank r@host] error: ...`` line;
a bug prints its traceback too. Either way the rank calls ``Abort`` so no other
rank stays blocked in a receive.
"""

from __future__ import annotations

import sys
import traceback


def main(argv=None) -> int:
    from .runtime import UserError, abort, error_message

    try:
        from .cli import main as cli_main

        return cli_main(argv)
    except SystemExit as e:  # argparse and explicit exits: clean code on this rank
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if code != 0:
            from mpi4py import MPI

            if MPI.COMM_WORLD.Get_size() > 1:
                abort(code)
        return code
    except KeyboardInterrupt:
        print(error_message(KeyboardInterrupt("interrupted")), file=sys.stderr, flush=True)
        abort(130)
    except BaseException as exc:  # noqa: BLE001 - the whole point is to catch everything
        if not isinstance(exc, UserError):
            traceback.print_exc()
        print(error_message(exc), file=sys.stderr, flush=True)
        abort(1)
    return 1


if __name__ == "__main__":
    sys.exit(main())
