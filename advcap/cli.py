"""The `advcap` command line: one subcommand per job; the work lives in the library modules.

The one place where commands are defined: each has an `_add_<command>` (its arguments) and a `_cmd_<command>`
(parse → call the library → print the result). The library returns values and logs; only this module prints.
Heavy imports stay inside the command functions, so `advcap --help` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Callable, Sequence

# Choices, defaults and texts of the arguments, each defined where it is interpreted (these modules import lightly).
from advcap.config import EVAL_SPLITS, PAPER_PHASES
from advcap.data.sources import FORMATS
from advcap.demo import DEMO_SEEDS
from advcap.errors import AdvcapError
from advcap.evaluate import SELECTIONS
from advcap.report import EPSILON_CONVENTION
from advcap.stopping import EXIT_NO_PROGRESS, EXIT_STOPPED, NO_PROGRESS_ADVICE, Stopped, report_outcome

RUN_OR_EXPORT = "a finished run directory or an hf/ export directory"
IMAGE_FILE = "an image file (any format Pillow reads)"


def _split_overrides(values: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """(plain values, dotted overrides): `--phases a b model.preset=tiny` hands the override to --phases, since
    nargs="+" takes every word up to the next flag; anything with "=" is an override."""
    values = list(values or [])
    return [v for v in values if "=" not in v], [v for v in values if "=" in v]


# ---------------------------------------------------------------- data


def _add_synth(sub: Any) -> None:
    p = sub.add_parser("synth", help="render the built-in demo caption set (Karpathy split format)")
    p.add_argument("--out", required=True, help="output directory (captions.json + images/)")
    p.add_argument("--images", type=int, default=1000, help="number of scenes to render")
    p.add_argument("--seed", type=int, default=0, help="random seed (output is byte-identical per seed)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels (16..224)")
    p.set_defaults(func=_cmd_synth)


def _cmd_synth(args: argparse.Namespace) -> None:
    from advcap.data.synth import generate

    generate(args.out, n_images=args.images, seed=args.seed, size=args.size)


def _add_shards(sub: Any) -> None:
    p = sub.add_parser("shards", help="convert COCO / Flickr8k / Karpathy-split annotations to WebDataset shards")
    p.add_argument("--format", required=True, choices=FORMATS)
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


def _add_verify(sub: Any) -> None:
    p = sub.add_parser("verify", help="re-read every shard, check counts and hashes against manifest.json, decode every image")
    p.add_argument("shards", help="a shard folder holding manifest.json, a URL folder, or shard URLs/patterns joined by ::")
    p.add_argument("--samples", action="append", type=_split_count, default=[], metavar="SPLIT=N",
                   help="a split's size, for shards without a manifest beside them (repeat per split)")
    p.add_argument("--retries", type=int, default=3, help="times a failed fetch is retried (default 3)")
    p.set_defaults(func=_cmd_verify)


def _split_count(text: str) -> tuple[str, int]:
    from advcap.data.sources import SPLITS

    split, _, count = text.partition("=")
    if split not in SPLITS or not count.isdigit() or int(count) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected SPLIT=N with SPLIT train, val or test and N ≥ 1")
    return split, int(count)


def _cmd_verify(args: argparse.Namespace) -> None:
    from advcap.data.verify import verify

    if not verify(args.shards, dict(args.samples), args.retries):
        raise SystemExit(1)


def _add_tokenizer(sub: Any) -> None:
    p = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer on the train captions of a shard set")
    p.add_argument("--shards", required=True, help="shard directory holding manifest.json")
    p.add_argument("--out", required=True, help="output directory (loads with AutoTokenizer)")
    p.add_argument("--vocab-size", type=int, default=1000)
    p.set_defaults(func=_cmd_tokenizer)


def _cmd_tokenizer(args: argparse.Namespace) -> None:
    from advcap.data.manifest import load_manifest
    from advcap.tokenizer import train_captions, train_tokenizer

    train_tokenizer(train_captions(load_manifest(args.shards)), args.out, vocab_size=args.vocab_size)


# ---------------------------------------------------------------- training and evaluation


def _add_train(sub: Any) -> None:
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


def _add_eval(sub: Any) -> None:
    p = sub.add_parser(
        "eval",
        help="caption clean and attacked images of a finished run: BLEU (paper's and COCO's), CIDEr, ... into metrics.json",
        description="The same entry point `accelerate launch launch/eval.py RUN_DIR` runs; ranks split the images.",
    )
    p.add_argument("run", help="a finished run directory (runs/<dataset>/<phase>/seed<k>)")
    p.add_argument("--select", choices=SELECTIONS, default="final",
                   help="final: the hf/ export; best-val: checkpoints/best (kept by validation while training), "
                   "else the kept checkpoint with the best clean val BLEU-4")
    p.add_argument("--conditions", nargs="+", default=None, metavar="CONDITION",
                   help="clean fgsm pgd targeted blind transfer-fgsm fgsm@<epsilon> (default: the run's eval.conditions)")
    p.add_argument("--splits", nargs="+", default=None, metavar="SPLIT",
                   help=f"{' '.join(EVAL_SPLITS)} (default: the run's eval.splits)")
    p.add_argument("overrides", nargs="*",
                   help="eval.* overrides of the run's config, e.g. eval.pgd_steps=20 eval.pgd_target=clean_caption")
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args: argparse.Namespace) -> None:
    from accelerate import PartialState

    from advcap.evaluate import evaluate, format_metrics

    conditions, from_conditions = _split_overrides(args.conditions)
    splits, from_splits = _split_overrides(args.splits)
    metrics = evaluate(args.run, select=args.select, conditions=conditions if args.conditions else None,
                       splits=splits if args.splits else None, overrides=[*args.overrides, *from_conditions, *from_splits])
    if PartialState().is_main_process:
        print(format_metrics(metrics))


# ---------------------------------------------------------------- the study


def _add_ablation(sub: Any) -> None:
    p = sub.add_parser(
        "ablation",
        help="train + evaluate phases × seeds locally, in sequence, into OUT/<phase>/seed<k>/ (paired design)",
        description="Finished runs with the same config are skipped, unfinished ones resumed; a run directory "
        "holding a different config is refused (never reused). Failed runs are reported at the end and the "
        "exit status is non-zero; the others still run.",
    )
    p.add_argument("--phases", nargs="+", required=True,
                   help=f"phase config names or paths, e.g. {' '.join(PAPER_PHASES)}")
    p.add_argument("--seeds", nargs="+", type=int, required=True, help="train.seed values, e.g. 0 1 2")
    p.add_argument("--out", required=True, help="runs/<dataset>: run dirs land in OUT/<phase>/seed<k>/")
    p.add_argument("--config-dir", default=None, help="folder searched first for <phase>.yaml")
    p.add_argument("--parallel", type=int, default=1,
                   help="runs at a time, each in its own process with its share of the cores (CPU hosts, small models)")
    p.add_argument("--dry-run", action="store_true", help="check the configs and shards, print the plan (what each run dir holds) and exit")
    p.add_argument("overrides", nargs="*", help="dotted overrides for every phase, e.g. model.preset=tiny train.steps=100")
    p.set_defaults(func=_cmd_ablation)


def _cmd_ablation(args: argparse.Namespace) -> None:
    from advcap.ablation import (check_parallel, check_shards, format_plan, format_results, plan_ablation,
                                 raise_for_results, run_plan)
    from advcap.distributed import launch_rank

    phases, from_phases = _split_overrides(args.phases)
    check_parallel(args.parallel)
    plan = plan_ablation(phases, args.seeds, args.out, [*from_phases, *args.overrides], args.config_dir)
    if args.dry_run:
        check_shards(plan)
        print(format_plan(plan))
        return
    results = run_plan(plan, args.parallel)
    if launch_rank() == 0:  # under `accelerate launch` every rank runs the ablation together
        print(format_results(results))
    raise_for_results(plan, results)


def _add_report(sub: Any) -> None:
    p = sub.add_parser(
        "report",
        help="mean ± std over seeds per phase of BLEU-4 (clean/attacked), paired differences, cost, plots",
        description="Reads only run-directory files (config.yaml, provenance.json, the metrics.json record) under "
        "RUNS/<phase>/seed<k>/ and writes report.md, report.csv and PNG plots. " + EPSILON_CONVENTION + ".",
    )
    p.add_argument("runs", help="the ablation folder runs/<dataset>")
    p.add_argument("--out", default=None, help="output directory (default: RUNS/report)")
    p.add_argument("--phases", nargs="+", default=None,
                   help="the phases the study asked for (default: those present); missing ones are listed")
    p.add_argument("--seeds", nargs="+", type=int, default=None,
                   help="the seeds the study asked for (default: those present); missing ones are listed")
    p.set_defaults(func=_cmd_report)


def _cmd_report(args: argparse.Namespace) -> None:
    from advcap.report import report_dir, summary, write_report

    report = write_report(args.runs, args.out, args.phases, args.seeds)
    print(summary(report, report_dir(args.runs, args.out)))


def _add_demo(sub: Any) -> None:
    p = sub.add_parser("demo", help="the whole study in miniature: demo set → pretrain → 5 phases × 3 seeds → report")
    p.add_argument("--out", default="runs/demo", help="output directory (data, pretrained stand-ins, runs, report)")
    p.add_argument("--phases", nargs="+", default=list(PAPER_PHASES))
    p.add_argument("--seeds", nargs="+", type=int, default=list(DEMO_SEEDS))
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default: the demo's)")
    p.add_argument("overrides", nargs="*", help="extra dotted overrides for every run")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> None:
    from advcap.demo import run_demo

    settings = {"train_steps": args.steps} if args.steps else {}
    print(run_demo(args.out, args.phases, args.seeds, settings, args.overrides).main_table)


# ---------------------------------------------------------------- single images


def _add_caption(sub: Any) -> None:
    p = sub.add_parser("caption", help="print the caption a trained model gives an image")
    p.add_argument("image", help=IMAGE_FILE)
    p.add_argument("--model", required=True, help=RUN_OR_EXPORT)
    p.set_defaults(func=_cmd_caption)


def _cmd_caption(args: argparse.Namespace) -> None:
    from advcap.inference import caption_image

    print(caption_image(args.image, args.model))


def _add_attack(sub: Any) -> None:
    p = sub.add_parser(
        "attack", help="FGSM one image: figure of original | adversarial | amplified difference with both captions"
    )
    p.add_argument("image", help=IMAGE_FILE)
    p.add_argument("--model", required=True, help=RUN_OR_EXPORT)
    p.add_argument("--out", required=True, help="output figure (PNG)")
    p.add_argument("--epsilon", type=float, default=None,
                   help="L∞ radius in [0,1] pixel units (default: the run's attack.epsilon)")
    p.set_defaults(func=_cmd_attack)


def _cmd_attack(args: argparse.Namespace) -> None:
    from advcap.inference import attack_image

    clean, adversarial = attack_image(args.image, args.model, args.out, args.epsilon)
    print(f"clean:       {clean}\nadversarial: {adversarial}\nfigure:      {args.out}")


# ---------------------------------------------------------------- the parser and the process

COMMANDS: tuple[Callable[[Any], None], ...] = (
    _add_synth, _add_shards, _add_verify, _add_tokenizer, _add_train, _add_ablation, _add_report, _add_eval,
    _add_caption, _add_attack, _add_demo,
)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="advcap", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, and every third-party notice (see advcap.logs)")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
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
    from advcap.logs import setup_logging

    parser = _build_parser()
    args = parser.parse_args(argv)
    rank = launch_rank()
    # Under a launcher every rank runs the same code: rank 0 tells the story, the others only warn.
    setup_logging(logging.DEBUG if args.verbose else logging.INFO if rank == 0 else logging.WARNING,
                  tag=f"[rank{rank}] " if rank else "")
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
