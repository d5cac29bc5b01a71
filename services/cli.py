"""The ``elborl`` command line.

Every subcommand validates its configuration first (pydantic; fast, before torch, Ray or
diffusers are imported) and exits with status 2 and a message naming the file, line and
field when anything is wrong. Heavy imports happen inside the subcommands.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from services.config import ConfigError, RunConfig, config_to_yaml, load_config

DEFAULT_CONFIG = "configs/shapes.yaml"
log = logging.getLogger("elborl")


def _add_config_args(p: argparse.ArgumentParser, default: str | None = DEFAULT_CONFIG) -> None:
    p.add_argument(
        "--config",
        default=default,
        metavar="FILE",
        help=f"YAML run configuration (default: {default}; built-in defaults if absent)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one field, e.g. --set learner.lr=1e-4 (repeatable)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _load(args: argparse.Namespace) -> RunConfig:
    path = args.config
    if path == DEFAULT_CONFIG and not Path(path).exists():
        path = None  # run from outside the repo: built-in defaults
    return load_config(path, args.overrides)


Subcommands = argparse._SubParsersAction  # what add_subparsers returns


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="elborl",
        description="RL fine-tuning of text-to-image flow/diffusion models with ELBO likelihoods.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def _add_pretrain_command(sub: Subcommands) -> None:
    p = sub.add_parser("pretrain", help="pretrain the built-in base policy on rendered shapes")
    _add_config_args(p, "configs/pretrain.yaml")
    p.add_argument(
        "--output", metavar="DIR", help="checkpoint directory (default: pretrain.output)"
    )
    p.add_argument(
        "--fresh",
        action="store_true",
        help="discard the resume snapshot in <output>.resume/ and start over (without it, a "
        "rerun continues where an interrupted one stopped)",
    )
    p.set_defaults(func=_cmd_pretrain)


def _add_eval_command(sub: Subcommands) -> None:
    p = sub.add_parser("eval", help="held-out GenEval-style accuracy of a checkpoint")
    _add_config_args(p)
    p.add_argument(
        "--checkpoint", metavar="PATH", help="policy directory (default: model.checkpoint)"
    )
    p.add_argument(
        "--prompts", metavar="FILE", help="prompts file, one per line (default: held-out split)"
    )
    p.add_argument(
        "--num-images",
        type=int,
        metavar="N",
        help="images per prompt (default: eval.images_per_prompt)",
    )
    p.add_argument("--max-prompts", type=int, metavar="N", help="evaluate only the first N prompts")
    p.add_argument(
        "--pass-k",
        type=int,
        metavar="K",
        help="also report pass@1 and pass@K per category (samples at least 2K images per prompt)",
    )
    p.add_argument("--seed", type=int, help="sampling seed (default: the config's seed)")
    p.add_argument(
        "--rewards",
        action="store_true",
        help="score with the configured rewards (rewards.functions: the mean of each) instead "
        "of the world's verifier; --prompts is then any text file, one prompt per line (e.g. a "
        "real model's evaluation prompts)",
    )
    p.add_argument(
        "--grid",
        metavar="PNG",
        help="also save a grid of the first 32 images with prompts and scores",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=_cmd_eval)


def _add_train_command(sub: Subcommands) -> None:
    p = sub.add_parser("train", help="RL fine-tuning on a local or remote Ray cluster")
    _add_config_args(p)
    p.add_argument(
        "--address",
        metavar="ADDR",
        help="Ray cluster to join (default: RAY_ADDRESS or a local one)",
    )
    p.add_argument(
        "--resume", action="store_true", help="continue the latest complete checkpoint of the run"
    )
    p.set_defaults(func=_cmd_train)


def _add_export_command(sub: Subcommands) -> None:
    p = sub.add_parser(
        "export",
        help="write a run's trained policy where its family's tools load it",
        description="Export the trained policy of a run's checkpoint (the latest complete one, "
        "or --round N): a `tiny` policy as a saved policy directory (usable as "
        "model.checkpoint); an `sd3`, `flux` or `sd` LoRA in diffusers' LoRA format "
        "(pipe.load_lora_weights(OUT)), or with --merged the merged transformer "
        "(save_pretrained). A model card (README.md) records the base, config and metrics.",
    )
    p.add_argument("run", metavar="RUN_DIR", help="the run directory (runs/<name>)")
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write (new or empty)")
    p.add_argument("--round", type=int, metavar="N", help="the checkpoint of round N")
    p.add_argument("--merged", action="store_true", help="merge LoRA into the weights")
    _add_config_args(p, default=None)
    p.set_defaults(func=_cmd_export)


def _add_reward_serve_command(sub: Subcommands) -> None:
    p = sub.add_parser(
        "reward-serve",
        help="serve rewards over the elborl-reward/1 protocol",
        description="Serve registered rewards (--reward NAME, repeatable; default: the config's "
        "rewards.functions) over HTTP with the elborl-reward/1 protocol "
        "(docs/reward-protocol.md). A bearer token is required (--token-env).",
    )
    _add_config_args(p)
    p.add_argument("--reward", action="append", metavar="NAME", help="a reward to serve")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=18090, help="TCP port (default 18090)")
    p.add_argument(
        "--token-env",
        default="ELBORL_REWARD_TOKEN",
        metavar="VAR",
        help="environment variable holding the bearer token (default ELBORL_REWARD_TOKEN)",
    )
    p.add_argument("--max-batch", type=int, default=64, help="images per request at most")
    p.add_argument("--max-body-mb", type=float, default=256.0, help="request body limit, MB")
    p.add_argument("--max-concurrency", type=int, default=1, help="batches scored at once")
    p.set_defaults(func=_cmd_reward_serve)


def _add_config_command(sub: Subcommands) -> None:
    p = sub.add_parser("config", help="validate a configuration and print it fully resolved")
    _add_config_args(p)
    p.set_defaults(func=_cmd_config)


def _add_serve_command(sub: Subcommands) -> None:
    p = sub.add_parser(
        "serve",
        help="serve the status API and dashboard for the runs in a directory",
        description="Serve the status API, Prometheus metrics and the dashboard for every run "
        "under a runs directory (finished or live). The bearer token comes from the variable "
        "named by service.token_env (default ELBORL_TOKEN) or service.token_file.",
    )
    _add_config_args(p)
    p.add_argument(
        "--runs-dir",
        metavar="DIR",
        help="runs to serve (default: $ELBORL_RUNS_DIR, else the config's runs_dir)",
    )
    p.add_argument("--host", help="bind address (default: service.host, 127.0.0.1)")
    p.add_argument("--port", type=int, help="TCP port (default: service.port, 8470; 0 = any)")
    p.set_defaults(func=_cmd_serve)


def _add_status_command(sub: Subcommands) -> None:
    p = sub.add_parser(
        "status",
        help="print a run's state from a status service as a table",
        description="Ask a status service (`elborl serve`, or a run with service.enabled) for "
        "the state of its runs and print it. Uses the same token as the service.",
    )
    _add_config_args(p)
    p.add_argument("--url", help="service URL (default: http://<service.host>:<service.port>)")
    p.add_argument("--run", metavar="RUN", help="show one run in detail (default: list them)")
    p.add_argument("--json", action="store_true", help="print the JSON response instead")
    p.set_defaults(func=_cmd_status)


COMMANDS = (
    _add_pretrain_command,
    _add_eval_command,
    _add_train_command,
    _add_export_command,
    _add_reward_serve_command,
    _add_config_command,
    _add_serve_command,
    _add_status_command,
)


def _cmd_config(args: argparse.Namespace, cfg: RunConfig) -> int:
    sys.stdout.write(config_to_yaml(cfg))
    return 0


def _cmd_pretrain(args: argparse.Namespace, cfg: RunConfig) -> int:
    from services.commands import run_pretrain

    return run_pretrain(
        cfg,
        output=args.output,
        config_path=args.config,
        overrides=args.overrides,
        fresh=args.fresh,
    )


def _cmd_eval(args: argparse.Namespace, cfg: RunConfig) -> int:
    from services.commands import run_eval

    return run_eval(cfg, args)


def _cmd_serve(args: argparse.Namespace, cfg: RunConfig) -> int:
    from services.api.control import load_token
    from services.api.server import ApiServer

    token = load_token(cfg.service)
    runs_dir = Path(args.runs_dir) if args.runs_dir else cfg.runs_root()
    if not runs_dir.is_dir():
        raise ConfigError(f"--runs-dir {runs_dir}: no such directory")
    port = cfg.service.port if args.port is None else args.port
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be in 0..65535, got {port}")
    host = args.host or cfg.service.host
    ApiServer(runs_dir, token, host, port, cfg.service.cors_origins).serve_forever()
    return 0


def _cmd_status(args: argparse.Namespace, cfg: RunConfig) -> int:
    from services.api.client import print_status
    from services.api.control import load_token

    url = args.url or f"http://{cfg.service.host}:{cfg.service.port}"
    return print_status(url.rstrip("/"), load_token(cfg.service), args.run, args.json)


def _cmd_export(args: argparse.Namespace, cfg: RunConfig) -> int:
    from services.export import run_export

    run = Path(args.run)
    if not (run / "config.yaml").is_file():
        raise ConfigError(f"{run} is not a run directory (no config.yaml)")
    # The run's own configuration (plus --set), unless --config names another one.
    cfg = load_config(args.config or run / "config.yaml", args.overrides)
    return run_export(cfg, run, Path(args.out), args.round, args.merged)


def _cmd_reward_serve(args: argparse.Namespace, cfg: RunConfig) -> int:
    from rewards.config import RewardSpec
    from services.reward_serve import serve_rewards

    try:
        specs = [RewardSpec(name=n) for n in args.reward] if args.reward else cfg.rewards.functions
    except ValueError as exc:
        raise ConfigError(f"--reward: {exc}") from exc
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be in 0..65535, got {args.port}")
    return serve_rewards(
        specs,
        args.host,
        args.port,
        args.token_env,
        args.max_batch,
        args.max_body_mb,
        args.max_concurrency,
    )


def _cmd_train(args: argparse.Namespace, cfg: RunConfig) -> int:
    from services.commands import run_train

    return run_train(cfg, args)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        cfg = _load(args)
        func: Callable[[argparse.Namespace, RunConfig], int] = args.func
        return func(args, cfg)
    except ConfigError as exc:
        print(f"elborl {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"elborl {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
