"""The `ssmkit` command: `ssmkit <application> <command> [options]` and `ssmkit demo`.

Every application module listed in `APPLICATIONS` exposes an `application` object (an
`ssmkit.apps.application.Application`); its `commands()` become subcommands whose flags are generated
from their configuration classes. Several processes: `torchrun --nproc-per-node N --no-python ssmkit
<application> train ...` (or `torchrun ... -m ssmkit.apps.cli ...`).

Exit codes: 0 success, 1 a run that failed with a clear error (any `ssmkit.errors.SsmkitError`, printed
as `ssmkit: error: ...`), 2 a usage or configuration error, 130 interrupted.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from ssmkit.apps.config import add_arguments, build_config, option
from ssmkit.errors import ConfigError, SsmkitError

__all__ = ["APPLICATIONS", "DemoConfig", "load_applications", "build_parser", "run_demo", "main"]

# application modules, in demo order
APPLICATIONS = ("ssmkit.apps.seqtask", "ssmkit.apps.classify", "ssmkit.apps.video", "ssmkit.apps.dna",
                "ssmkit.apps.audio", "ssmkit.apps.mil", "ssmkit.apps.restore")


@dataclass
class DemoConfig:
    """Options of `ssmkit demo`."""

    title = "demo"
    out_dir: str = option("runs/demo", "folder of the report (index.html, report.md) and of every run")
    smoke: bool = option(False, "tiny sizes that finish in seconds (what the test suite runs)")
    only: str = option("", "comma-separated applications to show (default: all that have a demo)")


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error message (and exit code 2) for a bad command line."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def load_applications() -> list:
    """The `application` object of every module in APPLICATIONS."""
    return [importlib.import_module(name).application for name in APPLICATIONS]


def build_parser(apps: list) -> argparse.ArgumentParser:
    """The parser of `ssmkit`: one subcommand per application (each with its commands) and `demo`."""
    from ssmkit import __version__

    parser = _Parser(prog="ssmkit", description="State-space models: train, evaluate and demo every application.",
                     epilog="Run `ssmkit <application> <command> --help` for the options of a command.")
    parser.add_argument("--version", action="version", version=f"ssmkit {__version__}")
    top = parser.add_subparsers(title="applications", dest="_application", required=True, metavar="APPLICATION")
    for app in apps:
        app_parser = top.add_parser(app.name, help=app.help, description=app.help)
        sub = app_parser.add_subparsers(title="commands", dest="_command", required=True, metavar="COMMAND")
        for command in app.commands():
            p = sub.add_parser(command.name, help=command.help, description=command.help,
                               usage="%(prog)s [options]")
            add_arguments(p, command.config)
            p.set_defaults(_config=command.config, _run=command.run, _parser=p)
    demo = top.add_parser("demo", help="a short tour of every application; writes index.html + report.md",
                          description="Train every application briefly on its embedded data and write a report.",
                          usage="%(prog)s [options]")
    add_arguments(demo, DemoConfig)
    demo.set_defaults(_config=DemoConfig, _run=lambda cfg: run_demo(cfg, apps), _parser=demo)
    return parser


def run_demo(cfg: DemoConfig, apps: list) -> int:
    """Run the demo of every application (or those in `cfg.only`) and write the report; returns the
    exit code: 1 when a section failed (the report still shows the others and the error)."""
    from ssmkit.apps.report import ReportSection, write_report

    names = [n.strip() for n in cfg.only.split(",") if n.strip()]
    unknown = sorted(set(names) - {a.name for a in apps})
    if unknown:
        raise ConfigError(f"--only: unknown application {', '.join(unknown)}; "
                          f"choose from {', '.join(a.name for a in apps)}")
    out_dir, main_rank = Path(cfg.out_dir), int(os.environ.get("RANK", 0)) == 0
    sections, failed, start = [], [], time.perf_counter()
    for app in apps:
        if names and app.name not in names:
            continue
        if main_rank:
            print(f"=== ssmkit demo: {app.name} ===", flush=True)
        t = time.perf_counter()
        try:
            section = app.demo(out_dir, cfg.smoke)
        except Exception as e:  # a broken section is reported and the tour goes on
            traceback.print_exc()
            section = ReportSection(app.name, status=f"{type(e).__name__}: {e}")
            failed.append(app.name)
        if section is None:
            continue
        if section.wall_s is None:
            section.wall_s = time.perf_counter() - t
        sections.append(section)
    if not main_rank:
        return 1 if failed else 0
    import torch

    wall = time.perf_counter() - start
    intro = (f"Generated {datetime.datetime.now().isoformat(timespec='seconds')} by `ssmkit demo"
             f"{' --smoke' if cfg.smoke else ''}` in {wall:.0f} s on {platform.machine()} "
             f"({os.cpu_count()} CPU cores{', CUDA' if torch.cuda.is_available() else ''}), torch {torch.__version__}. "
             f"Each section trained on the application's embedded default data.")
    html_path, md_path = write_report(sections, out_dir, "ssmkit demo", intro)
    print(f"demo report: {html_path} and {md_path} ({wall:.0f} s)"
          + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `ssmkit` console script; returns the exit code."""
    args, extra = build_parser(load_applications()).parse_known_args(argv)
    if extra:  # name the command whose --help lists the valid flags
        args._parser.error(f"unrecognized arguments: {' '.join(extra)}")
    prefix = f"ssmkit (rank {os.environ['RANK']})" if int(os.environ.get("WORLD_SIZE", 1)) > 1 else "ssmkit"
    try:
        cfg = build_config(args._config, {k: v for k, v in vars(args).items() if not k.startswith("_")})
        result = args._run(cfg)
        return result if isinstance(result, int) else 0
    except ConfigError as e:
        print(f"{prefix}: error: {e}", file=sys.stderr)
        return 2
    except SsmkitError as e:
        print(f"{prefix}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted", file=sys.stderr)
        return 130
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
