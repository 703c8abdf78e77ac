"""`ddt-export`: the command line. Thin: each command parses, calls one library function, prints.

The command bodies live in `ddt_export/commands/`; this file is the app, the list of commands and the error
boundary. Errors a user can cause are `DDTExportError`s: printed on one line, no traceback, exit code 2; so is a
filesystem that refuses a write (read-only, full, no permission). Ctrl-C prints one line (what a command says
it left, e.g. generate's finished samples and --resume) and exits 130.
Heavy libraries (torch, onnx) are imported inside the commands that need them, so the production commands
(generate, schedule, fid, serve) run on the base install with no PyTorch.
"""
from __future__ import annotations

import errno
import functools
import sys
from typing import List, Optional

import typer
from rich.markup import escape

from ddt_export.commands import artifacts, quality, sampling, serving
from ddt_export.commands.common import console
from ddt_export.core.errors import DDTExportError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Deploy DDT: ONNX export, TensorRT/ONNX Runtime engines, torch-free sampling, FID gating.")

COMMANDS = {
    "convert": artifacts.convert, "export": artifacts.export, "calibrate": artifacts.calibrate,
    "build": artifacts.build, "generate": sampling.generate, "schedule": sampling.schedule,
    "fid": quality.fid, "fid-inception": quality.fid_inception, "validate": quality.validate, "bench": quality.bench,
    "evaluate": quality.evaluate, "tune": quality.tune,
    "serve": serving.serve,
}
FILESYSTEM_ERRNOS = (errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EFBIG)
INTERRUPTED = "nothing half-written was left under a final name"


def interruptible(fn):
    """A command that prints one line on Ctrl-C: the message the command raised KeyboardInterrupt with, else
    INTERRUPTED (Typer then exits 130 without a word of its own)."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt as e:
            say = str(e.args[0]) if e.args else INTERRUPTED
            console.print(f"[bold red]interrupted[/]: {escape(say)}", highlight=False, soft_wrap=True)
            raise

    return run


for _name, _fn in COMMANDS.items():
    app.command(_name)(interruptible(_fn))


def main(argv: Optional[List[str]] = None) -> None:
    """Console entry point: run the app, turning typed errors into one line and a non-zero exit."""
    try:
        app(args=argv, prog_name="ddt-export")
    except DDTExportError as e:
        console.print(f"[bold red]error:[/] {type(e).__name__}: {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except OSError as e:
        if e.errno not in FILESYSTEM_ERRNOS:
            raise
        where = f"{e.filename}: " if e.filename else ""
        console.print(f"[bold red]error:[/] OSError: {escape(where)}expected a writable file system with room, "
                      f"got {escape(e.strerror or str(e))}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
