"""`keras-vg`: the command line. `keras-vg report LOG_DIR`, `keras-vg plot LOG_DIR -o FILE [--by variable]`.

Errors are one line on stderr saying what to do, with a non-zero exit code and
no traceback:

| exit | meaning |
|------|---------|
| 0    | done (a report with findings is still a success) |
| 1    | the run could not be read: no such directory, no keras-vg data in it, a newer format |
| 2    | bad command line (argparse) |

Example:

```sh
keras-vg report logs/run1
keras-vg plot logs/run1 -o heatmap.png                  # one row per layer
keras-vg plot logs/run1 -o variables.png --by variable  # one row per variable
```
"""

import argparse
import os
import sys

from keras_vg import format as fmt
from keras_vg.heatmap_marks import VIEWS

_EPILOG = """examples:
  keras-vg report logs/run1                 findings in plain words, with remedies for this model
  keras-vg plot logs/run1 -o heatmap.png    the layers x steps heatmap, vanishing cells hatched
  keras-vg plot logs/run1 -o vars.png --by variable
                                            the same with one row per variable

LOG_DIR is the directory given to keras_vg.GradientMonitor(log_dir=...).
Rules and thresholds: docs/DETECTION.md; the report: docs/DIAGNOSIS.md."""


class CommandError(Exception):
    """A problem the user can fix; its message says how."""


def _parser():
    parser = argparse.ArgumentParser(
        prog="keras-vg", description="Diagnose vanishing and exploding gradients recorded by keras_vg.GradientMonitor.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    report = commands.add_parser("report", help="print the diagnosis of a run, with remedies for its model",
                                 description="Print the diagnosis of a run, with remedies for its model.")
    report.add_argument("log_dir", metavar="LOG_DIR", help="the run directory (GradientMonitor's log_dir)")
    report.add_argument("--max-findings", type=int, default=20, metavar="N",
                        help="spell out at most N findings (default: 20)")
    plot = commands.add_parser("plot", help="write the layers x steps heatmap to an image file",
                               description="Write the layers x steps heatmap to an image file (needs matplotlib).")
    plot.add_argument("log_dir", metavar="LOG_DIR", help="the run directory (GradientMonitor's log_dir)")
    plot.add_argument("-o", "--output", required=True, metavar="FILE",
                      help="image file to write; the format follows the extension (.png, .svg, .pdf)")
    plot.add_argument("--stat", default="grad_norm", metavar="NAME",
                      choices=[s for s in fmt.STATS if fmt.axis_of(s) != fmt.AXIS_SCALAR],
                      help="statistic to draw (default: grad_norm; also update_ratio, dead_fraction, ...)")
    plot.add_argument("--by", default="layer", choices=VIEWS,
                      help="one row per layer (default; variables combined per layer) or per variable")
    return parser


def _read(log_dir):
    from keras_vg.reader import find_runs, read_run

    if not os.path.exists(log_dir):
        raise CommandError(f"no such directory: {log_dir}. Give the log_dir passed to "
                           "keras_vg.GradientMonitor(log_dir=...).")
    if not os.path.isdir(log_dir):
        raise CommandError(f"{log_dir} is a file; give the run directory that holds it: "
                           f"{os.path.dirname(log_dir) or '.'}")
    runs = find_runs(log_dir)
    if "." not in runs:
        if runs:
            shown = ", ".join(os.path.join(log_dir, r) for r in runs[:10])
            more = f" and {len(runs) - 10} more" if len(runs) > 10 else ""
            raise CommandError(f"no keras-vg data directly in {log_dir}. Runs found below it: {shown}{more}. "
                               f"Give one of them, e.g. keras-vg report {os.path.join(log_dir, runs[0])}")
        raise CommandError(f"no keras-vg data in {log_dir} or below it. Record a run with "
                           "callbacks=[keras_vg.GradientMonitor(log_dir=...)] and give that directory.")
    try:
        return read_run(log_dir)
    except fmt.FormatError as error:
        raise CommandError(str(error)) from None


def _report(args):
    run = _read(args.log_dir)
    print(run.diagnose().text(max_findings=max(1, args.max_findings)))


def _plot(args):
    run = _read(args.log_dir)
    directory = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(directory):
        raise CommandError(f"cannot write {args.output}: no such directory {directory}. Create it first.")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise CommandError("keras-vg plot needs matplotlib: pip install matplotlib") from None
    from keras_vg.plot import plot_run

    if args.stat not in run.stats():
        raise CommandError(f"this run did not record {args.stat}; it has: {', '.join(run.stats())}")
    if args.stat == "update_ratio" and args.by == "layer" and "weight_norm" not in run.stats():
        raise CommandError("update_ratio combines per layer through weight_norm, which this run did not record; "
                           "use --by variable")
    try:
        plot_run(run, stat=args.stat, path=args.output, by=args.by)
    except ValueError as error:  # matplotlib: an extension it cannot write
        raise CommandError(f"cannot write {args.output}: {error}") from None
    print(f"wrote {args.output}")


def main(argv=None):
    """Runs the `keras-vg` command.

    Args:
        argv: The arguments, without the program name; None for
            `sys.argv[1:]`. Defaults to `None`.

    Returns:
        The exit code: 0 on success, 1 when the run cannot be read or the
        output cannot be written, 2 for a bad command line.

    Example:

    >>> main(["report", "logs/run1"])   # doctest: +SKIP
    0
    """
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help (0) and usage errors (2): argparse has printed why
        return exit_.code
    # This process never needs TensorFlow: TensorBoard reads the files without it.
    from keras_vg.reader import tensorboard_without_tensorflow

    tensorboard_without_tensorflow()
    try:
        {"report": _report, "plot": _plot}[args.command](args)
    except CommandError as error:
        print(f"keras-vg: error: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # unreadable files, a full disk: say which, not a traceback
        print(f"keras-vg: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
