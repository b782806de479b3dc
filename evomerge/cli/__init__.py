"""`evomerge` command line: `main` runs a subcommand and turns user errors into one clear line."""

from __future__ import annotations

import os
import sys

from evomerge.cli.parser import build_parser


# Errors whose message is for the user (what is wrong, which field, the fix): printed as one
# `evomerge: error: ...` paragraph, exit 2. Matched by (module, class name) against the modules
# already imported, so main() imports nothing heavy (torch, lm-eval, Ray) just to catch them: an
# exception cannot be an instance of a class whose module was never imported.
USER_ERRORS = (
    ("evomerge.schema", "ConfigError"), ("evomerge.sources", "SourceError"), ("evomerge.study", "StudyError"),
    ("evomerge.kinds.base", "RecipeError"), ("evomerge.exporter", "ExportError"), ("evomerge.methods", "MergeError"),
    ("evomerge.trial_table", "TrialsError"), ("evomerge.toy", "ToyWorldError"), ("evomerge.dims", "SpaceError"),
    ("evomerge.kinds.dfs.stack", "StackError"), ("evomerge.fitness", "FitnessError"),
    ("evomerge.dashboard.security", "DashboardError"),
)

# Exit status when stdout is closed early (`evomerge status | head -1`): 128 + SIGPIPE, what the
# shell reports for any tool that a closed pipe stops (`yes | head -1`), so `set -o pipefail`
# scripts see the usual status and the output is never claimed to be complete.
EXIT_STDOUT_CLOSED = 141


def _is_user_error(exc: BaseException) -> bool:
    for module, name in USER_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and isinstance(exc, cls):
            return True
    return False


def _stdout_is_closed() -> bool:
    """True when stdout's reader has gone (a BrokenPipeError from a socket is a real error)."""
    try:
        import select

        fd = sys.stdout.fileno()
        if not hasattr(select, "poll"):
            return True
        poll = select.poll()
        poll.register(fd, select.POLLOUT)
        return any(ev & (select.POLLERR | select.POLLHUP | select.POLLNVAL) for _, ev in poll.poll(0))
    except (OSError, ValueError, AttributeError):
        return True


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's last flush does not fail a second time."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
        sys.stdout.flush()  # a closed stdout shows up here, not at interpreter exit
        return code
    except BrokenPipeError:
        if not _stdout_is_closed():
            raise
        _silence_stdout()
        return EXIT_STDOUT_CLOSED
    except Exception as exc:
        if not _is_user_error(exc):
            raise
        print(f"evomerge: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        # The runner re-raises with the exact resume command once a study exists.
        print("evomerge: interrupted" + (f"; {exc}" if str(exc) else ""), file=sys.stderr)
        return 130
