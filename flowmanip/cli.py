"""The ``flowmanip`` command line.

    flowmanip pretrain RECIPE [key=value ...] [--resume | --overwrite]
    flowmanip finetune RECIPE [key=value ...] [--resume | --overwrite]
    flowmanip eval CKPT [--episodes N] [--stochastic] [--sigma S] [--json] [--per-episode FILE.json]
    flowmanip export CKPT -o policy.pt  (or -o policy.onnx)
    flowmanip convert-checkpoint OLD NEW [--trust]
    flowmanip demos generate|replay|to-robomimic|inspect ...

User errors print one line and exit with code 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from flowmanip.errors import FlowmanipError


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML, e.g. recipes/pickcube.yaml")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. env.num_envs=4 (before or "
                                                 "after the flags)")
    p.add_argument("--resume", action="store_true", help="continue from out_dir/<stage>/checkpoints/last")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in out_dir/<stage>")


CHECKPOINT_HELP = ("checkpoint directory (…/checkpoints/last), a run stage directory (…/finetune) "
                   "or a run directory (its finetune stage if it has one, else pretrain)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flowmanip", description=__doc__.split("\n\n")[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="fit a flow policy to demonstrations (flow matching)")
    _add_recipe_args(p)
    p = sub.add_parser("finetune", help="train a flow policy online with SAC Flow")
    _add_recipe_args(p)

    p = sub.add_parser("eval", help="measure success in ManiSkill (ManiSkill's evaluation rules)")
    p.add_argument("checkpoint", help=CHECKPOINT_HELP)
    p.add_argument("--episodes", type=int, default=None, help="default: the recipe's eval.episodes (100)")
    p.add_argument("--seed", type=int, default=None,
                   help="episode seeds are seed, seed+1, ... (default: the recipe's eval.seed, 0)")
    p.add_argument("--num-envs", type=int, default=None, help="parallel eval envs (default: the recipe's)")
    p.add_argument("--backend", choices=["auto", "gpu", "cpu"], default=None)
    p.add_argument("--video", metavar="DIR", help="write one MP4 per episode here (seed<S>.mp4)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--stochastic", action="store_true",
                   help="run the noise-augmented rollout (the fine-tune's behaviour policy), noise seeded by --seed")
    p.add_argument("--sigma", type=float, default=None,
                   help="flow policies: rollout noise per flow step; implies --stochastic (default: the checkpoint's)")
    p.add_argument("--flow-steps", type=int, default=None, metavar="K",
                   help="flow policies: Euler steps of the rollout (default: the checkpoint's K; flow matching "
                        "trains on continuous t, so any K >= 1 is a valid solver)")
    p.add_argument("--per-episode", metavar="FILE.json",
                   help="also write one record per episode (seed, success_once, success_at_end, return) here")

    p = sub.add_parser("export", help="write a self-contained policy file for deployment")
    p.add_argument("checkpoint", help=CHECKPOINT_HELP)
    p.add_argument("--format", choices=["torchscript", "onnx"], default=None,
                   help="default: onnx for an .onnx output, else torchscript")
    p.add_argument("-o", "--output", required=True, help="output file, e.g. policy.pt")
    p.add_argument("--stochastic", action="store_true", help="bake in the noise-augmented rollout")
    p.add_argument("--seed", type=int, default=None,
                   help="noise seed for --stochastic (default 0): the module draws from its own generator, so every "
                        "process that loads the file gets the same action stream; module.reseed(S) restarts it")

    p = sub.add_parser("convert-checkpoint",
                       help="rewrite a checkpoint of an earlier flowmanip (a pickled policy.pt) in the safe format")
    p.add_argument("old", help="checkpoint directory written by an earlier flowmanip (with policy.pt), or its policy.pt")
    p.add_argument("new", help="directory to write the converted checkpoint to (must not exist)")
    p.add_argument("--trust", action="store_true",
                   help="if a file holds more than tensors and plain data, unpickle it anyway (runs any code in it; "
                        "only for files you trust)")

    demos = sub.add_parser("demos", help="make, convert and inspect demonstration files").add_subparsers(
        dest="demos_command", required=True)
    p = demos.add_parser("generate", help="ManiSkill motion-planning demos (pd_joint_pos, .h5 + .json)")
    p.add_argument("env_id")
    p.add_argument("-n", "--num", type=int, default=10)
    p.add_argument("--seed-start", type=int, default=0)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--keep-failures", action="store_true", help="also keep unsuccessful episodes")
    p.add_argument("-o", "--output", required=True, help="output .h5 path")

    p = demos.add_parser("replay", help="change control/obs mode through ManiSkill's replay (records rewards)")
    p.add_argument("source", help="ManiSkill .h5 (with .json beside it)")
    p.add_argument("-c", "--control-mode", required=True)
    p.add_argument("-o", "--obs-mode", default="state",
                   help="observation mode to record: state, rgb, ... (as in ManiSkill's replay tool; the output "
                        "file is --output)")
    p.add_argument("--reward-mode", default="normalized_dense")
    p.add_argument("--camera-size", type=int, default=None, help="camera width=height for image obs modes")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--count", type=int, default=None, help="convert only the first N episodes")
    p.add_argument("--output", required=True, help="output .h5 path")

    p = demos.add_parser("to-robomimic", help="ManiSkill .h5 (+ .json) to a robomimic .hdf5")
    p.add_argument("source")
    p.add_argument("--output", required=True, help="output .hdf5 path")

    p = demos.add_parser("inspect", help="check a dataset and print its summary")
    p.add_argument("path", help=".h5 (ManiSkill) or .hdf5 (robomimic)")
    p.add_argument("--json", action="store_true")
    return parser


def _check_options(args) -> None:
    """Option checks that need no recipe or env, so that a long run does not end in a bad-path error."""
    from flowmanip.utils import check_output_dir, check_output_file

    for path in (getattr(args, "output", None), getattr(args, "per_episode", None)):
        if path:  # before any work: a 100-episode eval should not end in "that is a directory"
            check_output_file(path)
    if args.command == "eval" and args.video:
        check_output_dir(args.video, "--video")
    elif args.command == "export":
        suffix_fmt = "onnx" if args.output.lower().endswith(".onnx") else "torchscript"
        if args.format is None:
            args.format = suffix_fmt
        elif args.format != suffix_fmt:  # one of the two is onnx
            raise FlowmanipError(f"-o {args.output}: --format {args.format} writes "
                                 f"{'an .onnx file' if args.format == 'onnx' else 'TorchScript'}; "
                                 f"name the output {'*.onnx' if args.format == 'onnx' else '*.pt'} or drop --format")
        if args.seed is not None and not args.stochastic:
            raise FlowmanipError("--seed seeds the noise of --stochastic; the deterministic export has none")
        if args.format == "onnx" and args.stochastic:  # before the checkpoint loads
            raise FlowmanipError("--stochastic exports to TorchScript only (its seeded noise stream is the module's "
                                 "state); name the output *.pt")
        if args.format == "onnx":
            try:
                import onnx  # noqa: F401
            except ImportError:
                raise FlowmanipError("ONNX export needs the onnx package: pip install -e '.[dev]' "
                                     "(or name the output *.pt for TorchScript)") from None
    elif args.command == "demos" and args.demos_command == "replay":
        if os.sep in args.obs_mode or args.obs_mode.endswith((".h5", ".hdf5")):
            raise FlowmanipError(f"-o/--obs-mode {args.obs_mode!r} looks like a file; -o is the observation mode "
                                 "(state, rgb, ...) here, and the output file is --output")


def _run(args) -> int:
    _check_options(args)
    if args.command == "pretrain":
        from flowmanip.train.pretrain import run_pretrain

        r = run_pretrain(args.recipe, args.overrides, resume=args.resume, overwrite=args.overwrite)
        _print_done("pretrain", r["stage_dir"], r["eval"])
    elif args.command == "finetune":
        from flowmanip.train.finetune import run_finetune

        r = run_finetune(args.recipe, args.overrides, resume=args.resume, overwrite=args.overwrite)
        if r["is_main"]:
            _print_done("finetune", r["stage_dir"], r["final_eval"])
    elif args.command == "eval":
        from flowmanip.train.evaluate import evaluate_checkpoint

        result = evaluate_checkpoint(args.checkpoint, episodes=args.episodes, seed=args.seed, num_envs=args.num_envs,
                                     backend=args.backend, video_dir=args.video,
                                     per_episode=args.per_episode is not None, stochastic=args.stochastic,
                                     sigma=args.sigma, flow_steps=args.flow_steps)
        if args.per_episode:
            from flowmanip.utils import atomic_output

            with atomic_output(args.per_episode) as tmp, open(tmp, "w") as f:
                json.dump(result, f, indent=1)
            episodes = result.pop("per_episode")
            result["failed_seeds"] = [e["seed"] for e in episodes if not e["success_once"]]
        if args.video:
            result["videos"] = os.path.abspath(args.video)
        if args.json:
            print(json.dumps(result))
        else:
            for key, value in result.items():
                print(f"{key:>16}: {value:.3f}" if isinstance(value, float) else f"{key:>16}: {value}")
    elif args.command == "export":
        from flowmanip.export import export_checkpoint

        path = export_checkpoint(args.checkpoint, args.output, fmt=args.format, stochastic=args.stochastic,
                                 seed=args.seed or 0)
        print(f"wrote {path}")
    elif args.command == "convert-checkpoint":
        from flowmanip.train.checkpoint import convert_checkpoint

        print(f"wrote {convert_checkpoint(args.old, args.new, trust=args.trust)}")
    elif args.command == "demos":
        return _run_demos(args)
    return 0


def _print_done(stage: str, stage_dir: str, last_eval: dict | None) -> None:
    line = f"{stage} done: checkpoint {os.path.join(stage_dir, 'checkpoints', 'last')}"
    if last_eval:
        line += f", success_once {last_eval['success_once']:.3f} over {last_eval['episodes']} episodes"
    print(line + f"; metrics in {os.path.join(stage_dir, 'metrics.jsonl')}")


def _run_demos(args) -> int:
    from flowmanip.data import demos

    if args.demos_command == "generate":
        r = demos.generate_demos(args.env_id, args.output, args.num, args.seed_start, args.workers,
                                 only_success=not args.keep_failures)
        print(f"wrote {r['kept']} demos ({r['solved']}/{r['attempts']} seeds solved) to {r['path']}")
    elif args.demos_command == "replay":
        r = demos.replay_convert(args.source, args.output, args.control_mode, args.obs_mode, args.reward_mode,
                                 args.workers, args.camera_size, args.count)
        print(f"converted {r['episodes_out']}/{r['episodes_in']} episodes "
              f"{r['from_control_mode']} -> {r['control_mode']} ({r['obs_mode']} obs) to {r['path']}")
    elif args.demos_command == "to-robomimic":
        from flowmanip.data import read_maniskill, write_robomimic

        if not args.output.endswith(".hdf5"):
            raise FlowmanipError(f"{args.output}: robomimic files end in .hdf5")
        meta, episodes = read_maniskill(args.source)
        write_robomimic(args.output, meta, episodes)
        print(f"wrote {len(episodes)} demos to {args.output}")
    elif args.demos_command == "inspect":
        from flowmanip.data import read_dataset
        from flowmanip.data.validate import format_summary, summarize

        meta, episodes = read_dataset(args.path, require_obs=False)
        summary = summarize(meta, episodes)
        print(json.dumps(summary) if args.json else format_summary(summary))
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """argparse, plus what users type without thinking: ``--debug`` after the subcommand, and
    key=value overrides after ``--resume``/``--overwrite`` (argparse takes one run of positionals)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command in ("pretrain", "finetune") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.debug = debug
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")
    try:
        code = _run(args)
    except FlowmanipError as e:
        if args.debug:
            raise
        print(f"flowmanip: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("flowmanip: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code)
