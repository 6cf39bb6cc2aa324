"""The `advcap` command line: one subcommand per job; the work lives in the library modules."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from advcap.errors import AdvcapError
from advcap.stopping import EXIT_NO_PROGRESS, EXIT_STOPPED, NO_PROGRESS_ADVICE, Stopped, report_outcome


CLI_MODULES: list[str] = ["advcap.ablation", "advcap.report", "advcap.evaluate", "advcap.inference", "advcap.demo"]


def _cmd_synth(args: argparse.Namespace) -> None:
    from advcap.data.synth import generate

    generate(args.out, n_images=args.images, seed=args.seed, size=args.size)


def _cmd_shards(args: argparse.Namespace) -> None:
    from advcap.data.shardwriter import convert

    convert(
        fmt=args.format,
        annotations=args.annotations,
        images=args.images,
        out=args.out,
        split=args.split,
        resize=args.resize,
        shard_size=args.shard_size,
        workers=args.workers,
        strict=args.strict,
        # None: the library's default (advcap.data.images.DEFAULT_MAX_PIXELS), defined there only
        **({} if args.max_pixels is None else {"max_pixels": args.max_pixels}),
    )


def _cmd_verify(args: argparse.Namespace) -> None:
    from advcap.data.verify import verify

    if not verify(args.shards, dict(args.samples), args.retries):
        raise SystemExit(1)


def _split_count(text: str) -> tuple[str, int]:
    from advcap.data.sources import SPLITS

    split, _, count = text.partition("=")
    if split not in SPLITS or not count.isdigit() or int(count) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected SPLIT=N with SPLIT train, val or test and N ≥ 1")
    return split, int(count)


def _cmd_tokenizer(args: argparse.Namespace) -> None:
    from advcap.data.manifest import load_manifest
    from advcap.tokenizer import train_tokenizer, train_captions

    train_tokenizer(train_captions(load_manifest(args.shards)), args.out, vocab_size=args.vocab_size)


def _cmd_train(args: argparse.Namespace) -> None:
    from advcap.config import load_config
    from advcap.train import STOPPED, STOPPED_NO_PROGRESS, train

    cfg = load_config(args.config, args.overrides)
    if args.check:
        from advcap.data.manifest import data_manifest, require_complete_shards
        from advcap.rundir import run_path

        require_complete_shards(data_manifest(cfg.data))
        print(f"ok: config {args.config} resolves; shards {cfg.data.shards} are complete; run dir {run_path(cfg)}")
        return
    outcome = train(cfg, resume=args.resume, stop_at_step=args.stop_at_step)
    if outcome == STOPPED:
        raise Stopped("stopped on request at a checkpoint")
    if outcome == STOPPED_NO_PROGRESS:
        raise Stopped("stopped on request before its first step", progress=False)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="advcap", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="render the built-in demo caption set (Karpathy split format)")
    p.add_argument("--out", required=True, help="output directory (captions.json + images/)")
    p.add_argument("--images", type=int, default=1000, help="number of scenes to render")
    p.add_argument("--seed", type=int, default=0, help="random seed (output is byte-identical per seed)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels (16..224)")
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("shards", help="convert COCO / Flickr8k / Karpathy-split annotations to WebDataset shards")
    p.add_argument("--format", required=True, choices=["karpathy", "coco", "flickr8k"])
    p.add_argument("--annotations", required=True, help="annotation file (Karpathy JSON, COCO captions JSON, Flickr8k.token.txt)")
    p.add_argument("--images", required=True, help="image directory")
    p.add_argument("--out", required=True, help="output directory for {split}-NNNNNN.tar and manifest.json")
    p.add_argument("--split", default=None, help="split name for raw COCO files, which carry none (e.g. val)")
    p.add_argument("--resize", type=int, default=256, help="shorter side in pixels, never upscaled; 0 keeps original bytes")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--workers", type=int, default=1, help="image-processing processes")
    p.add_argument("--strict", action="store_true", help="a missing or undecodable image is an error, not a skip")
    p.add_argument("--max-pixels", type=int, default=None, metavar="N",
                   help="skip images whose header claims more than N pixels (width×height) without decoding them "
                   "(decompression bombs; default 50 million); 0: only Pillow's own limit")
    p.set_defaults(func=_cmd_shards)

    p = sub.add_parser("verify", help="re-read every shard, check counts and hashes against manifest.json, decode every image")
    p.add_argument("shards", help="a shard folder holding manifest.json, a URL folder, or shard URLs/patterns joined by ::")
    p.add_argument("--samples", action="append", type=_split_count, default=[], metavar="SPLIT=N",
                   help="a split's size, for shards without a manifest beside them (repeat per split)")
    p.add_argument("--retries", type=int, default=3, help="times a failed fetch is retried (default 3)")
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer on the train captions of a shard set")
    p.add_argument("--shards", required=True, help="shard directory holding manifest.json")
    p.add_argument("--out", required=True, help="output directory (loads with AutoTokenizer)")
    p.add_argument("--vocab-size", type=int, default=1000)
    p.set_defaults(func=_cmd_tokenizer)

    p = sub.add_parser(
        "train",
        help="train one phase × seed (the same entry point `accelerate launch launch/train.py` runs)",
        description="Exit status 75 means stopped on request (signal or --stop-at-step): resume with --resume latest.",
    )
    p.add_argument("--config", required=True, help="a config path or the bare name of a shipped config (e.g. freeze_vit)")
    p.add_argument("--resume", default=None, help="'latest' or a checkpoint directory to continue from; 'auto': the latest checkpoint if there is "
                   "one, else a fresh start (for requeued jobs)")
    p.add_argument("--stop-at-step", type=int, default=None, help="checkpoint and stop after this step, as if preempted")
    p.add_argument("--check", action="store_true",
                   help="only check that the config resolves and its shards are complete, then exit (before a cluster job)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-5 model.preset=tiny")
    p.set_defaults(func=_cmd_train)

    # Later stages register their own subcommands: each module has `add_cli(subparsers)` and keeps
    # heavy imports inside its functions, so `advcap --help` stays fast.
    for module in CLI_MODULES:
        importlib.import_module(module).add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    from advcap.distributed import launch_world_size

    try:
        _main(argv)
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    if launch_world_size() > 1:
        _exit_without_finalization(code)
    if code:
        raise SystemExit(code)


def _exit_without_finalization(code: object) -> None:
    """End a rank of a multi-process job once its work and its messages are done, skipping the interpreter's
    finalization: there, process-group objects that DeepSpeed still references are destroyed after the
    interpreter is half torn down, and a DeepSpeed rank that had finished and recorded its run was seen to abort
    there (SIGABRT, twice in this project's test runs; not reproduced on demand, so this is a mitigation).
    Exit codes are kept."""
    import os

    if isinstance(code, str):
        print(code, file=sys.stderr)
    status = 0 if code is None else code if isinstance(code, int) else 1
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _main(argv: list[str] | None) -> None:
    from advcap.distributed import NAMED_OS_ERRORS, describe_error, launch_rank, leave_process_group

    parser = _build_parser()
    args = parser.parse_args(argv)
    rank = launch_rank()
    # Under a launcher every rank runs the same code: rank 0 tells the story, the others only warn.
    level = logging.DEBUG if args.verbose else logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s %(levelname)s {f'[rank{rank}] ' if rank else ''}%(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        args.func(args)
        leave_process_group()
    except AdvcapError as err:
        print(f"advcap {args.command}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except Stopped as err:
        if rank == 0:
            report_outcome(err.progress)
        if not err.progress:
            print(f"advcap {args.command}: {err}; {NO_PROGRESS_ADVICE}", file=sys.stderr)
            raise SystemExit(EXIT_NO_PROGRESS) from None
        print(f"advcap {args.command}: {err}; run the same command again to go on", file=sys.stderr)
        raise SystemExit(EXIT_STOPPED) from None
    except OSError as err:
        if err.errno not in NAMED_OS_ERRORS or args.verbose:
            raise
        # A full disk, a read-only or vanished file system: what and where, not a traceback.
        print(f"advcap {args.command}: error: {describe_error(err)}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
