"""The training process of `tasks.training.train`: `python -m tasks.train_worker FD`.

Reads `(make_job, args)` (pickled) from stdin, runs the job, and sends its reports,
then its summary or its error, as messages on file descriptor FD.
"""
from __future__ import annotations

import os
import pickle
import sys
import traceback

from tasks.training import PipeReporter, run_training, send


def main() -> None:
    with os.fdopen(int(sys.argv[1]), "wb") as stream:
        try:
            make_job, args = pickle.loads(sys.stdin.buffer.read())
            send(stream, ("done", run_training(make_job(*args), PipeReporter(stream))))
        except BaseException as err:  # noqa: BLE001 - every failure must reach the task, which raises it
            send(stream, ("error", type(err).__name__, "".join(traceback.format_exception(err))))
            raise SystemExit(1) from None


if __name__ == "__main__":
    main()
