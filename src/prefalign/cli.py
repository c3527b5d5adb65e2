"""The command line: parse, build a config, call one function. Nothing else lives here."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys

from prefalign.errors import UserError, os_error_from, os_error_line, os_errors_name
from prefalign.validation import add_ranged, check_output_dir, check_output_file, path_arg

BOTH_DROP_EXIT = 3  # --both-drop-stop stopped the run (documented in the flag's help)

TRAIN_HELP = """Train a model with a preference loss (DPO and relatives, KTO) or SFT.
Every flag is also a YAML key for --config (max_steps <-> --max-steps); flags win over the file.
TRL's names are accepted too, as keys and flags (learning_rate, --per-device-train-batch-size,
bf16, save_steps, ...: the table is in docs/trl.md)."""
SFT_HELP = TRAIN_HELP.replace("with a preference loss (DPO and relatives, KTO) or SFT", "with supervised fine-tuning "
                              "(the chosen/completion NLL); the preference loss flags are train's")
# sft is train with these defaults (its help shows them) and without the preference-only flags.
SFT_BASE = {"loss": "sft", "lr": 2e-5, "reference": "none"}


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is a UserError: one `prefalign: error:` line and exit 2, like every other refusal."""

    def error(self, message):
        raise UserError(f"{self.prog.removeprefix('prefalign ')}: {message} (see `{self.prog} --help`)")


def _train_parser(sub, name: str, help: str, base: dict | None = None):
    from prefalign import config

    # No ArgumentDefaultsHelpFormatter: the flags' argparse defaults are None (to tell which were
    # given); each help text carries the real default (the field's, or the command's base) itself.
    p = sub.add_parser(name, help=help, description=SFT_HELP if base else TRAIN_HELP)
    p.add_argument("--config", type=path_arg, help="YAML file of config keys (default: none)")
    p.add_argument("--num-processes", type=int, default=1, metavar="N",
                   help="data-parallel processes on this machine (re-runs this command through "
                        "`accelerate launch`; pairs/step = batch x accum x N) (default: 1)")
    config.add_flags(p, skip=config.PREFERENCE_ONLY if base else (), base=base)
    return p


def _launched() -> bool:
    """True inside a process started by accelerate launch / torchrun (they set WORLD_SIZE)."""
    return "WORLD_SIZE" in os.environ or "LOCAL_RANK" in os.environ


def _strip_num_processes(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--num-processes":
            skip = True
        elif not a.startswith("--num-processes="):
            out.append(a)
    return out


def relaunch(argv: list[str], n: int) -> int:
    """Run this same command on n processes through accelerate's launcher (torchrun underneath;
    on a machine without GPUs each process trains on CPU with the gloo backend). Signals are
    passed on, so Ctrl-C, a scheduler's SIGTERM or a closed terminal's SIGHUP still end in a checkpoint."""
    launch = ["--multi_gpu", "--num_processes", str(n), "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no", "-m", "prefalign.cli", *_strip_num_processes(argv)]
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from prefalign.cli import launcher; "
                             "sys.exit(launcher(sys.argv[1:]))", *launch])
    forward = lambda signum, frame: proc.send_signal(signum)  # noqa: E731
    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        return proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def launcher(launch_args: list[str]) -> int:
    """accelerate launch, minus its own report of a failed process (a traceback, a box of
    details, log lines): rank 0 has already said what went wrong in one line (see main).
    Returns the exit status of the process that failed first (2 for a UserError)."""
    import logging
    import warnings

    # torch's elastic loggers take their level from LOGLEVEL when their modules are imported.
    level = os.environ.get("LOGLEVEL")
    os.environ["LOGLEVEL"] = "CRITICAL"
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.agent.server import api  # noqa: F401 (its logger, quiet)
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    if level is None:
        del os.environ["LOGLEVEL"]
    else:
        os.environ["LOGLEVEL"] = level

    # Another run's launcher on the default port: accelerate picks a free one, and says so at length.
    warnings.filterwarnings("ignore", message="Port .* is already in use")
    os.environ["PREFALIGN_LAUNCHER"] = "1"  # the ranks leave their error messages to this process
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        launch_command(launch_command_parser().parse_args(launch_args))
    except ChildFailedError as e:
        rank, failure = first_failure(e.failures)
        if failure.exitcode == 2 and _said(failure):
            print(f"prefalign: error: {failure.message}", file=sys.stderr)
        else:
            print(f"prefalign: error: training process rank {rank} exited with status {failure.exitcode}",
                  file=sys.stderr)
        return failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode
    except SignalException as e:  # the workers were given the signal and stopped with a checkpoint
        return 128 + int(e.sigval)
    return 0


def first_failure(failures: dict) -> tuple:
    """The (rank, failure) that explains a failed launch: a rank that gave up on a UserError (its
    message in its error file), else one that exited by itself, else one killed by a signal other
    than the SIGTERM/SIGKILL the launcher sends the others once one has failed (a rank that
    aborted, -6, is the cause, not the rank it stopped); the earliest, then the lowest rank."""
    stopped_by_launcher = (-int(signal.SIGTERM), -int(signal.SIGKILL))
    return min(failures.items(), key=lambda kv: (not (kv[1].exitcode == 2 and _said(kv[1])),
                                                 kv[1].exitcode < 0, kv[1].exitcode in stopped_by_launcher,
                                                 kv[1].timestamp, kv[0]))


def _said(failure) -> bool:
    return isinstance(failure.message, str) and failure.error_file_data.get("prefalign") is True


def _leave_process_group() -> None:
    """Wait for the other ranks, then tear the group down before the interpreter exits: a gloo
    group left to the exit handlers can abort a rank ("terminate called without an active
    exception") while another rank still writes the model."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def cmd_train(args, base=None):
    from prefalign import config, trainer

    if args.num_processes < 1:
        raise UserError(f"--num-processes must be >= 1; got {args.num_processes}")
    cfg = config.from_args(args, base)  # validate here, before starting N processes
    config.check_before_start(cfg)
    if args.num_processes > 1 and not _launched():
        return relaunch(args.argv, args.num_processes)
    try:
        with os_errors_name(cfg.output):
            result = trainer.train(cfg)
    finally:
        _leave_process_group()
    if result.already_finished:
        return 0  # said so, on one line
    if result.stopped.startswith("signal"):
        # Not 0: a job script must not take an interrupted run for a finished one.
        return 128 + int(signal.Signals[result.stopped.split()[-1]])
    if result.stopped == "both-drop alarm":
        return BOTH_DROP_EXIT  # model and checkpoint saved; not 0, the run did not finish
    if os.environ.get("RANK", "0") != "0":
        return 0  # one summary per run, from rank 0
    last = result.history[-1] if result.history else {}
    keys = ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen")
    summary = "  ".join(f"{k} {last[k]:.4g}" for k in keys if isinstance(last.get(k), float))
    print(f"done: {result.steps} steps -> {result.output}  {summary}")
    if result.final_eval:
        print("held-out: " + "  ".join(f"{k} {v:.4g}" for k, v in result.final_eval.items()
                                        if k in ("loss", "rewards/accuracies", "rewards/margins")))


def cmd_sft(args):
    return cmd_train(args, base=SFT_BASE)


def cmd_losses(args):
    """Each loss with the parameters `train` passes it when none is set (its own defaults).
    From the import-light table: listing the losses loads no torch."""
    from prefalign.loss_table import ALIASES, SFT, SFT_PARAMS, TABLE

    for name in sorted({**TABLE, **ALIASES}):
        if name in ALIASES:
            print(f"{name:12s} (another name for {ALIASES[name]})")
            continue
        info = TABLE[name]
        ref = "reference" if info.needs_reference else "no reference"
        extra = f" + {info.nll_weight:g} x chosen NLL" if info.nll_weight else ""
        params = "  ".join(f"{k}={v!r}" for k, v in info.params.items())
        print(f"{name:12s} {info.kind:8s} {ref:13s} inputs={info.inputs}{extra}  {params}\n{'':13s}{info.about}")
    params = "  ".join(f"{k}={v!r}" for k, v in SFT_PARAMS.items())
    print(f"{SFT:12s} the chosen NLL; alone: SFT training; in a combination (--loss dpo,sft): a term  {params}")
    print("\nSet parameters with --loss-param KEY=VALUE (or LOSS.KEY=VALUE for one term of a combination),\n"
          "YAML loss_params, or the shorthands --beta, --gamma, ...; weights with --loss-weights.")


def cmd_eval(args):
    from prefalign import fields
    from prefalign.evaluation import run_eval
    from prefalign.settings import EvalConfig

    cfg = fields.from_flags(EvalConfig, args, args.config)
    check_output_file(cfg.json, "--json")
    run_eval(cfg)


def cmd_demo(args):
    from prefalign.demo.run import run_demo

    check_output_dir(args.output, "--output")
    run_demo(output=args.output, quick=args.quick, seed=args.seed)


def cmd_reward(args):
    from prefalign.fields import from_flags
    from prefalign.reward_config import RewardConfig, with_saved_settings
    from prefalign.reward_train import train_reward
    from prefalign.yamlio import load_mapping

    cfg = from_flags(RewardConfig, args, args.config or "")
    if cfg.resume and cfg.output:
        # Flags and --config keys win over the saved settings, as they do over the defaults.
        given = {k for k, v in vars(args).items() if v is not None}
        if args.config:
            given |= {k.replace("-", "_") for k in load_mapping(os.path.expanduser(args.config))}
        cfg = with_saved_settings(cfg, given)
    check_output_dir(cfg.output, "--output")
    with os_errors_name(cfg.output):
        result = train_reward(cfg)
    if result.already_finished:
        return 0
    if result.stopped.startswith("signal"):
        return 128 + int(signal.Signals[result.stopped.split()[-1]])
    last = result.history[-1] if result.history else {}
    print(f"done: {result.steps} steps -> {result.output}  "
          + "  ".join(f"{k} {last[k]:.4g}" for k in ("loss", "rewards/accuracies") if k in last))
    if result.final_eval:
        print(f"held-out: pairwise accuracy {result.final_eval['rewards/accuracies']:.4g}  "
              f"loss {result.final_eval['loss']:.4g}")


def _reward_parser(sub) -> None:
    from prefalign.fields import add_flags
    from prefalign.reward_config import RewardConfig

    p = sub.add_parser("reward", help="train a Bradley-Terry reward model on preference pairs (for rm:PATH rewards)",
                       description="Train a reward model (AutoModelForSequenceClassification, one output) on the "
                                   "pairs `train` reads: loss -log sigmoid(r_chosen - r_rejected - margin) "
                                   "[+ centering]. OUTPUT/model is then a reward spec: --reward rm:OUTPUT/model.")
    p.add_argument("--config", type=path_arg, help="YAML file of config keys (default: none)")
    add_flags(p, RewardConfig)
    p.set_defaults(func=cmd_reward)


def build_parser() -> argparse.ArgumentParser:
    from prefalign import __version__, fields
    from prefalign.settings import EvalConfig

    # Building the parsers imports no torch/transformers (tests/test_cli_ux.py): every command's
    # heavy modules load inside its cmd_* function, so --help answers in well under a second.
    parser = _Parser(prog="prefalign", description="Align language models with preference data.")
    parser.add_argument("--version", action="version", version=f"prefalign {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also show the libraries' own loading bars and warnings (default: hidden)")
    sub = parser.add_subparsers(dest="command", required=True)

    _train_parser(sub, "train", "train with a preference loss (dpo, ipo, kto, orpo, simpo, ...)").set_defaults(func=cmd_train)
    _train_parser(sub, "sft", "supervised fine-tuning on completions (the starting point for DPO)",
                  base=SFT_BASE).set_defaults(func=cmd_sft)

    p = sub.add_parser("eval", help="held-out preference accuracy, margins, KL to the reference, lengths",
                       description="Every flag is also a key of --config (YAML); flags win.")
    p.add_argument("--config", type=path_arg, default="", help="YAML file of eval's keys (default: none)")
    fields.add_flags(p, EvalConfig)
    p.set_defaults(func=cmd_eval)

    _reward_parser(sub)

    p = sub.add_parser("losses", help="list the losses")
    p.set_defaults(func=cmd_losses)

    p = sub.add_parser("demo", help="the whole story on a built-in task, on a CPU, in minutes")
    p.add_argument("--output", type=path_arg, default="runs/demo", help="output folder (default: 'runs/demo')")
    p.add_argument("--quick", action="store_true", help="a reduced run (seconds; used by the tests)")
    add_ranged(p, "--seed", int, "[0, 2**31)", "the demo derives seeds + k from it", default=0)
    p.set_defaults(func=cmd_demo)

    for extra in _extra_commands():
        extra(sub)
    return parser


def _extra_commands():
    """Commands registered by other modules (online, audit, experiments) when present."""
    found = []
    for mod_name in ("prefalign.online.cli", "prefalign.audit", "prefalign.experiments.cli"):
        try:
            mod = __import__(mod_name, fromlist=["register"])
        except ModuleNotFoundError as e:
            if e.name != mod_name:
                raise
            continue
        found.append(mod.register)
    return found


def _report(e: UserError) -> None:
    """One line on stderr per run. Under --num-processes every rank meets the same bad input and
    hands its message to the launcher (torch elastic's error file), which prints one of them: a rank
    printing itself could be cut off by the launcher stopping it, or say it twice with the others.
    Under another launcher, rank 0 prints."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        import json
        import time

        with open(error_file, "w") as fh:
            json.dump({"message": str(e), "timestamp": int(time.time()), "prefalign": True}, fh)
    if not (error_file and os.environ.get("PREFALIGN_LAUNCHER")) and os.environ.get("RANK", "0") == "0":
        print(f"prefalign: error: {e}", file=sys.stderr)


_UNSET = object()


def main(argv=None) -> int:
    restore_verbose = _UNSET
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
        args.argv = argv  # for --num-processes, which runs the same command again on N processes
        if args.verbose:
            # Read where models load (models.verbose); an environment variable so that the processes
            # of --num-processes inherit it; put back when main returns (main may be called in-process).
            restore_verbose = os.environ.get("PREFALIGN_VERBOSE")
            os.environ["PREFALIGN_VERBOSE"] = "1"
        elif args.command in ("train", "sft", "reward"):
            from prefalign.models import hide_known_warnings  # torch is loaded by these commands anyway

            hide_known_warnings()
        rc = args.func(args)
        return rc if isinstance(rc, int) else 0
    except UserError as e:
        _report(e)
        return 2
    except Exception as e:  # permissions, a full disk, a read-only file system, a file where a dir should be
        os_error = os_error_from(e)
        if os_error is None:
            raise
        print(f"prefalign: error: {os_error_line(os_error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prefalign: interrupted", file=sys.stderr)
        return 130
    finally:
        if restore_verbose is not _UNSET:
            if restore_verbose is None:
                os.environ.pop("PREFALIGN_VERBOSE", None)
            else:
                os.environ["PREFALIGN_VERBOSE"] = restore_verbose


if __name__ == "__main__":
    rc = main()
    if _launched():
        # A rank leaves without interpreter teardown: gloo's worker threads can still hold tensors
        # there, and freeing them while Python shuts down aborts the process ("terminate called
        # without an active exception") after the run has finished and saved everything, which
        # fails the whole launch. Everything the run writes is closed by now; flush the consoles.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    sys.exit(rc)
