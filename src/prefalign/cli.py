"""The command line: parse, build a config, call one function. Nothing else lives here."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys

from prefalign.errors import UserError

TRAIN_HELP = """Train a model with a preference loss (DPO and relatives, KTO) or SFT.
Every flag is also a YAML key for --config (max_steps <-> --max-steps); flags win over the file."""


def _train_parser(sub, name: str, help: str):
    from prefalign import config

    p = sub.add_parser(name, help=help, description=TRAIN_HELP, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", help="YAML file of config keys")
    p.add_argument("--num-processes", type=int, default=1, metavar="N",
                   help="data-parallel processes on this machine (re-runs this command through "
                        "`accelerate launch`; pairs/step = batch x accum x N)")
    config.add_flags(p)
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
    passed on, so Ctrl-C or a scheduler's SIGTERM still ends in a checkpoint."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n),
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "-m", "prefalign.cli", *_strip_num_processes(argv)]
    proc = subprocess.Popen(launch)
    forward = lambda signum, frame: proc.send_signal(signum)  # noqa: E731
    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)


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
    from prefalign import config, train

    if args.num_processes < 1:
        raise UserError(f"--num-processes must be >= 1; got {args.num_processes}")
    cfg = config.from_args(args, base)  # validate here, before starting N processes
    if args.num_processes > 1 and not _launched():
        return relaunch(args.argv, args.num_processes)
    try:
        result = train.train(cfg)
    finally:
        _leave_process_group()
    if result.stopped.startswith("signal"):
        # Not 0: a job script must not take an interrupted run for a finished one.
        return 128 + int(signal.Signals[result.stopped.split()[-1]])
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
    return cmd_train(args, base={"loss": "sft", "lr": 2e-5, "reference": "none"})


def cmd_losses(args):
    """Each loss with the parameters `train` passes it when none is set (its own defaults)."""
    from prefalign.losses import ALIASES, LOSSES, SFT, SFT_PARAMS

    for name, spec in sorted(LOSSES.items()):
        if name in ALIASES:
            print(f"{name:12s} (another name for {ALIASES[name]})")
            continue
        ref = "reference" if spec.needs_reference else "no reference"
        extra = f" + {spec.nll_weight:g} x chosen NLL" if spec.nll_weight else ""
        params = "  ".join(f"{k}={v!r}" for k, v in spec.params.items())
        print(f"{name:12s} {spec.kind:8s} {ref:13s} inputs={spec.inputs}{extra}  {params}")
    params = "  ".join(f"{k}={v!r}" for k, v in SFT_PARAMS.items())
    print(f"{SFT:12s} the chosen NLL; alone: SFT training; in a combination (--loss dpo,sft): a term  {params}")
    print("\nSet parameters with --loss-param KEY=VALUE (or LOSS.KEY=VALUE for one term of a combination),\n"
          "YAML loss_params, or the shorthands --beta, --gamma, ...; weights with --loss-weights.")


def cmd_eval(args):
    from prefalign.evaluate import run_eval

    run_eval(args)


def cmd_demo(args):
    from prefalign.demo.run import run_demo

    run_demo(output=args.output, quick=args.quick, seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prefalign", description="Align language models with preference data.")
    sub = parser.add_subparsers(dest="command", required=True)

    _train_parser(sub, "train", "train with a preference loss (dpo, ipo, kto, orpo, simpo, ...)").set_defaults(func=cmd_train)
    _train_parser(sub, "sft", "supervised fine-tuning on completions (the starting point for DPO)").set_defaults(func=cmd_sft)

    p = sub.add_parser("eval", help="held-out preference accuracy, margins, KL to the reference, lengths")
    p.add_argument("--model", required=True)
    p.add_argument("--ref-model", default="", help="reference model (default: none; KL and rewards need it)")
    p.add_argument("--data", required=True)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--samples", type=int, default=32, help="prompts to sample for the KL estimate (0 = skip)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--json", default="", help="also write the results to this JSON file")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("losses", help="list the losses")
    p.set_defaults(func=cmd_losses)

    p = sub.add_parser("demo", help="the whole story on a built-in task, on a CPU, in minutes")
    p.add_argument("--output", default="runs/demo")
    p.add_argument("--quick", action="store_true", help="a reduced run (seconds; used by the tests)")
    p.add_argument("--seed", type=int, default=0)
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


def main(argv=None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv  # for --num-processes, which runs the same command again on N processes
    try:
        rc = args.func(args)
        return rc if isinstance(rc, int) else 0
    except UserError as e:
        print(f"prefalign: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prefalign: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
