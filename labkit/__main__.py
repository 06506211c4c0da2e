"""labkit's command line.

    python -m labkit exercises            # regenerate exercises/ from solutions/
    python -m labkit exercises --check    # exit 1, listing the stale files, if exercises/ is out of date

(Also installed as the ``labkit`` command.) Each task is a subcommand, so that later ones can be added
with one more ``add_parser``.
"""

from __future__ import annotations

import argparse
import sys


def _exercises(args) -> int:
    from labkit import exercises

    if args.check:
        problems = exercises.check_up_to_date(args.root, args.solutions, args.exercises)
        if problems:
            print("exercises/ is not up to date with solutions/:", file=sys.stderr)
            for line in problems:
                print(f"  {line}", file=sys.stderr)
            print("Fix: python -m labkit exercises", file=sys.stderr)
            return 1
        print("exercises/ is up to date with solutions/")
        return 0
    try:
        exercises.generate(args.root, args.solutions, args.exercises)
    except (exercises.ExerciseFormatError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m labkit",
                                     description="labkit: tools of the course on distributed training")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = commands.add_parser("exercises", help="make exercises/ from solutions/ (or check it is up to date)",
                            description="Write exercises/<name>.ipynb from solutions/<name>.ipynb, replacing each "
                                        "'### BEGIN SOLUTION <id>: <task>' ... '### END SOLUTION' block with a "
                                        "stub that raises NotImplementedError (see labkit/exercises.py).")
    p.add_argument("--check", action="store_true",
                   help="change nothing; exit 1 and list the stale, missing or extra files if exercises/ is out of date")
    p.add_argument("--root", default=None,
                   help="the course folder (default: the current directory if it has solutions/, "
                        "else the checkout labkit is installed from)")
    p.add_argument("--solutions", default=None, help="solution notebooks folder (default: ROOT/solutions)")
    p.add_argument("--exercises", default=None, help="exercise notebooks folder (default: ROOT/exercises)")
    p.set_defaults(func=_exercises)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
