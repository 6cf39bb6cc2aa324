"""Configuration: typed dataclasses, YAML files with parents, dotted command-line overrides.

A config file names its parent with a top-level `parent:` key (a bare name or a path relative to the
file) and holds only what differs from it; `configs/base.yaml` holds every default. Loading merges
schema defaults ← root ancestor ← … ← the file ← overrides (`train.lr=1e-5`, values parsed as YAML),
checks every key and type against the schema while merging, then checks ranges, so any mistake is an
`AdvcapError` naming the dotted key, the bad value, what is allowed and the file or override it came from.

A loaded `Config` is frozen: values derived from it (per-rank batch, accumulation, the run directory)
come from functions here and are never written back. `save_config` writes the resolved config, which
`load_config` reads back to an equal `Config`.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import math
import os
import re
import typing
from dataclasses import dataclass, field
from difflib import get_close_matches
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence, Union

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from advcap.errors import AdvcapError

MODEL_PRESETS = ("tiny", "demo", "vit-base-gpt2", "custom")
FREEZE_MODULES = ("none", "encoder", "decoder")
TRAIN_MODES = ("clean", "adversarial", "mixed")
# The paper's five phases, each a shipped config of that name (configs/<phase>.yaml), in the paper's order.
PAPER_PHASES = ("baseline", "adversarial", "adv_train", "freeze_vit", "freeze_gpt")
PRECISIONS = ("auto", "fp32", "bf16")
EVAL_SPLITS = ("train", "val", "test")
EVAL_CONDITIONS = ("clean", "fgsm", "pgd", "targeted", "blind", "transfer-fgsm")  # plus "fgsm@<epsilon>"
PGD_TARGETS = ("reference", "clean_caption")
VAL_METRICS = tuple(f"{c}_{q}" for c in ("clean", "fgsm", "pgd") for q in ("bleu4", "loss"))  # advcap.validation
OVERFIT_ACTIONS = ("off", "warn", "stop", "rollback")
# Sections that do not change the trained model: a run may go on, and seeds be averaged, with other values there.
UNTRAINED = ("eval", "log")
# Accelerate's tracker names (accelerate.utils.LoggerType without "all"; tests/test_trackers.py keeps them equal).
TRACKERS = ("tensorboard", "wandb", "mlflow", "aim", "comet_ml", "clearml", "dvclive", "swanlab", "trackio")

_FGSM_AT = re.compile(r"fgsm@(?P<eps>.+)")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # run.dataset / run.phase become directory names


@dataclass(frozen=True)
class SplitSamples:
    """Samples per split, for shards without a manifest.json beside them (else unused)."""

    train: Optional[int] = None
    """Samples in the train shards."""
    val: Optional[int] = None
    """Samples in the val shards."""
    test: Optional[int] = None
    """Samples in the test shards."""


@dataclass(frozen=True)
class DataConfig:
    """Where the shards are and how samples become pixels and tokens."""

    shards: str = "shards/demo"
    """A folder holding manifest.json and the tars, a URL folder, or shard URLs/patterns joined by `::`
    (http(s)://, file:, pipe:CMD; see advcap.data.location)."""
    samples: SplitSamples = field(default_factory=SplitSamples)
    """Split sizes, needed only for shards without a manifest beside them."""
    fetch_retries: int = 3
    """Times a failed shard or manifest fetch is retried before the shard counts as bad."""
    image_size: int = 224
    """S in pixels: images are resized to exactly S×S."""
    max_caption_tokens: int = 32
    """Caption length cap in tokens, EOS included."""
    workers: int = 2
    """DataLoader worker processes per rank."""
    shuffle_buffer: int = 1000
    """Samples held in the shuffle buffer."""
    cache_mb: int = 0
    """MiB of training shards (raw and decoded) a rank keeps in memory once read, so that later epochs neither
    read nor decode them again; the batches are the same. 0: off. Needs workers=0: a DataLoader's workers
    start empty each epoch."""
    tokenizer: Optional[str] = None
    """Tokenizer directory or hub name; None: the decoder's own (GPT-2's)."""

    def __post_init__(self) -> None:
        _raise_problems(_data_problems(self))


@dataclass(frozen=True)
class ModelConfig:
    """Which captioner is built (interpreted by advcap.model)."""

    preset: str = "vit-base-gpt2"
    """One of MODEL_PRESETS; `custom` means the pretrained pair or `init_from` is named explicitly."""
    encoder: Optional[str] = None
    """Hub name or path of a pretrained ViT; overrides the preset's encoder."""
    decoder: Optional[str] = None
    """Hub name or path of a pretrained GPT-2; overrides the preset's decoder."""
    init_from: Optional[str] = None
    """A whole captioner: hub name, hf/ export dir or checkpoint (instead of encoder/decoder)."""
    dropout: float = 0.1
    """Dropout probability in [0, 1) of preset-built models."""

    def __post_init__(self) -> None:
        _raise_problems(_model_problems(self))


@dataclass(frozen=True)
class FreezeConfig:
    """Which parameters train (interpreted by advcap.freeze)."""

    modules: str = "none"
    """Which module is frozen: none | encoder | decoder."""
    keep_trainable: list[str] = field(default_factory=list)
    """Regexes (re.search on parameter names) trained even inside a frozen module."""
    also_freeze: list[str] = field(default_factory=list)
    """Regexes (re.search on parameter names) frozen even inside a trained module."""

    def __post_init__(self) -> None:
        _raise_problems(_freeze_problems(self))


@dataclass(frozen=True)
class AttackConfig:
    """The FGSM attack inside the training step (and the default ε of evaluation)."""

    epsilon: float = 0.05
    """L∞ radius in [0,1] pixel units (the paper's 0.1 on [-1,1] inputs)."""
    random_start: bool = False
    """FGSM starts from a uniform random point in the ε-ball."""

    def __post_init__(self) -> None:
        _raise_problems(_attack_problems(self))


@dataclass(frozen=True)
class TrainConfig:
    """The loss, the optimizer, the schedule and the cadence of logs and checkpoints."""

    mode: str = "clean"
    """Loss of the step: clean | adversarial | mixed."""
    clean_weight: float = 0.5
    """α in α·clean + (1-α)·adversarial (mixed mode), in [0, 1]."""
    seed: int = 0
    """Seed of initialization, data order and attacks' random starts."""
    steps: int = 1000
    """Optimizer steps of the run."""
    global_batch_size: int = 64
    """Samples per optimizer step over all ranks: the experiment's unit (see per_rank_batch_size)."""
    max_batch_size_per_rank: int = 64
    """Memory cap on one rank's micro-batch; gradient accumulation makes up the rest."""
    lr: float = 5e-5
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay."""
    warmup_steps: int = 100
    """Optimizer steps of linear learning-rate warm-up."""
    grad_clip_norm: float = 1.0
    """Global gradient L2-norm clip; 0 disables clipping."""
    precision: str = "auto"
    """auto | fp32 | bf16. auto: bf16 autocast on a CUDA GPU that supports it, fp32 elsewhere (the CPU).
    Decides over the launcher's --mixed_precision, and fills DeepSpeed's "auto" bf16 setting."""
    max_nonfinite_steps: int = 5
    """Consecutive skipped (NaN/inf loss) steps before the run stops."""
    log_every_steps: int = 10
    """Optimizer steps between scalar logs."""
    image_log_every_steps: int = 200
    """Optimizer steps between logged clean/adversarial image grids."""
    checkpoint_every_steps: int = 500
    """Optimizer steps between checkpoints."""
    keep_checkpoints: int = 2
    """Most recent checkpoints kept on disk."""
    val_every_steps: int = 250
    """Optimizer steps between validations on a fixed val subset (advcap.validation); 0: none."""
    val_images: int = 256
    """Images of that subset: the first ones of the val split, the same for every phase and seed."""
    val_pgd_steps: int = 3
    """PGD iterations of validation's PGD (random start, step 2.5·ε / steps, one restart): cheap, not strong."""
    keep_best: str = "pgd_bleu4"
    """Validation figure whose best value keeps checkpoints/best (VAL_METRICS; *_loss is minimised, *_bleu4
    maximised), or none."""
    overfit_guard: str = "warn"
    """What a catastrophic-overfitting alarm does in an adversarial or mixed run: off | warn | stop | rollback
    (stop, and finish with the checkpoints/best weights)."""
    overfit_fgsm_share: float = 0.2
    """The signature: FGSM raises the val loss by less than this share of what PGD raises it (FGSM robustness
    that PGD does not confirm), while PGD raises it by at least overfit_min_gap."""
    overfit_min_gap: float = 0.1
    """PGD's val loss minus the clean val loss (nats per token) below which the signature is not read."""
    overfit_patience: int = 2
    """Consecutive validations showing the signature that raise the alarm (one can be noise)."""

    def __post_init__(self) -> None:
        _raise_problems(_train_problems(self))


@dataclass(frozen=True)
class EvalConfig:
    """Caption generation and BLEU on clean and attacked images."""

    splits: list[str] = field(default_factory=lambda: ["test", "train"])
    """Splits evaluated, each one of EVAL_SPLITS."""
    train_subset_images: int = 500
    """Images of the train split that are evaluated (the first ones, a fixed subset)."""
    batch_size: int = 32
    """Images per rank per generation batch."""
    max_new_tokens: int = 32
    """Generated caption length cap in tokens."""
    num_beams: int = 1
    """Beam width of generation; 1 is greedy."""
    conditions: list[str] = field(default_factory=lambda: ["clean", "fgsm", "pgd", "targeted", "blind"])
    """Image conditions evaluated: EVAL_CONDITIONS or fgsm@<epsilon> (see parse_condition)."""
    pgd_steps: int = 10
    """PGD iterations (also of the targeted attack)."""
    pgd_step_size: Optional[float] = None
    """PGD step in [0,1] pixel units; null: 2.5·ε / pgd_steps (the usual rule: a total travel of 2.5ε)."""
    pgd_restarts: int = 2
    """PGD random starts; per image the one with the highest attack loss is kept."""
    pgd_random_start: bool = True
    """PGD starts from a uniform random point in the ε-ball (needed for restarts > 1)."""
    pgd_target: str = "reference"
    """Caption whose loss PGD ascends: reference | clean_caption."""
    target_caption: Optional[str] = None
    """The caption the targeted attack tries to make the model say; null: for each image, the first reference
    of the next image in its evaluation batch (a caption of another image)."""
    transfer_from: Optional[str] = None
    """Run dir whose checkpoint crafts the transfer-fgsm images."""
    coco_metrics: bool = True
    """Also score the COCO caption metrics (pycocoevalcap: BLEU, METEOR, ROUGE-L, CIDEr-D, SPICE if its models
    are present), which need Java; the paper's nltk BLEU is always scored."""
    audit: bool = True
    """Run the attack audit (more PGD steps and restarts, an ε sweep, a large ε) on a subset of the first split."""
    audit_images: int = 64
    """Images of the first eval split the audit attacks."""
    allow_partial: bool = False
    """Score a split even if some of its images cannot be read (the record and the report say so)."""

    def __post_init__(self) -> None:
        _raise_problems(_eval_problems(self))


@dataclass(frozen=True)
class DistConfig:
    """How the ranks of a distributed run wait for each other."""

    timeout_s: int = 600
    """Seconds a collective may wait for the other ranks (gloo and NCCL): a rank that died or hangs ends the
    job after this long. Longer than any rank-local work between two collectives (a checkpoint write)."""

    def __post_init__(self) -> None:
        _raise_problems(_dist_problems(self))


@dataclass(frozen=True)
class LogConfig:
    """Where scalars, hyperparameters, attack images and evaluation metrics go (advcap.tracking)."""

    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Accelerate trackers (TRACKERS) that receive them, each one installed; [] logs to none. The cadence is
    train.log_every_steps and train.image_log_every_steps."""

    def __post_init__(self) -> None:
        _raise_problems(_log_problems(self))


@dataclass(frozen=True)
class RunConfig:
    """Where the run directory is."""

    out: str = "runs"
    """Root of all runs; a run dir is <out>/<dataset>/<phase>/seed<seed> (see run_dir)."""
    dataset: str = "demo"
    """Dataset name in the run dir."""
    phase: str = "baseline"
    """Phase name in the run dir."""

    def __post_init__(self) -> None:
        _raise_problems(_run_problems(self))


@dataclass(frozen=True)
class Config:
    """The whole configuration of a run; each section validates itself when built."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    log: LogConfig = field(default_factory=LogConfig)
    run: RunConfig = field(default_factory=RunConfig)


# ---------------------------------------------------------------- loading


def load_config(config: str | os.PathLike[str] | None = None, overrides: Sequence[str] = ()) -> Config:
    """Load a config file with its parents, apply dotted overrides, and validate.

    Args:
        config: a path to a YAML file, or the bare name (with or without `.yaml`) of a shipped config;
            None loads `base`. A bare name is looked up in the current directory first.
        overrides: `dotted.key=value` strings applied in order; values are parsed as YAML
            (`train.steps=10` is an int, `eval.splits=[test,train]` a list, `data.tokenizer=null` None).
    Raises:
        AdvcapError: a missing file, a parent cycle, unknown keys, wrong types, out-of-range values.
    """
    chain = _parent_chain("base" if config is None else os.fspath(config))
    layers = [(f"in {path}", data) for path, data in chain]
    for item in overrides:
        layers.append((f"override {item!r}", _parse_override(item)))

    merged = OmegaConf.structured(Config)
    sources: dict[str, str] = {}
    for label, data in layers:
        _check_layer(data, Config, "", label)
        merged = OmegaConf.merge(merged, data)
        sources.update(dict.fromkeys(_flatten(data), label))
    _raise_problems(_problems(merged), sources)
    return OmegaConf.to_object(merged)


def validate(cfg: Any) -> None:
    """Raise AdvcapError naming every out-of-range value of `cfg` (a Config or a DictConfig of one)."""
    _raise_problems(_problems(cfg))


def shipped_configs() -> list[str]:
    """Bare names of the configs shipped with the package (e.g. `base`, `freeze_vit`), sorted."""
    return sorted(p.stem for p in _shipped_dir().glob("*.yaml"))


def _shipped_dir() -> Path:
    """The directory of the shipped YAML files (`configs/`, installed as `advcap.configs`)."""
    try:
        root = importlib.resources.files("advcap.configs")
    except ModuleNotFoundError:
        # An editable install cannot map a nested package without __init__.py (a setuptools
        # limitation), so there the files are read where they live: the checkout's configs/.
        return Path(__file__).resolve().parent.parent / "configs"
    # advcap.configs has no __init__.py, so `root` may be a MultiplexedPath; its children are paths.
    return Path(str(root.joinpath("base.yaml"))).parent


def _parent_chain(name: str) -> list[tuple[Path, dict[str, Any]]]:
    """[(path, contents without `parent`)] from the root ancestor down to the file `name` names."""
    chain: list[tuple[Path, dict[str, Any]]] = []
    path = _find_config(name, Path.cwd(), referrer=None)
    while True:
        if path in [p for p, _ in chain]:
            loop = " -> ".join(str(p) for p in [*(p for p, _ in chain), path])
            raise AdvcapError(f"config parents form a cycle: {loop}")
        data = _read_yaml(path)
        parent = data.pop("parent", None)
        chain.append((path, data))
        if parent is None:
            return chain[::-1]
        if not isinstance(parent, str) or not parent:
            raise AdvcapError(f"parent: {parent!r} is not allowed; expected a config name or path (in {path})")
        path = _find_config(parent, path.parent, referrer=path)


def _find_config(name: str, base_dir: Path, referrer: Path | None) -> Path:
    """Resolve `name`: a file relative to `base_dir` (also with `.yaml` added), else a shipped bare name."""
    candidates = [base_dir / Path(name).expanduser()]
    if not name.endswith(".yaml"):
        candidates.append(base_dir / Path(name + ".yaml").expanduser())
    if Path(name).name == name:  # a bare name, not a path
        candidates.append(_shipped_dir() / (name if name.endswith(".yaml") else name + ".yaml"))
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    what = f"parent {name!r} of {referrer}" if referrer else f"config {name!r}"
    tried = ", ".join(str(c) for c in candidates)
    raise AdvcapError(f"{what} not found (tried {tried}); shipped configs: {', '.join(shipped_configs())}")


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        # OmegaConf's YAML loader reads 1e-5 as a float (plain YAML 1.1 reads a string).
        loaded = OmegaConf.load(path)
    except (OSError, yaml.YAMLError, OmegaConfBaseException) as err:
        detail = " ".join(str(err).split())  # YAML errors span lines; the CLI prints one
        raise AdvcapError(f"cannot read config {path}: {detail}") from None
    data = OmegaConf.to_container(loaded, resolve=False)
    if not isinstance(data, dict):
        raise AdvcapError(f"config {path} must be a mapping of sections, not {type(data).__name__}")
    return data


def _parse_override(item: str) -> dict[str, Any]:
    """`train.lr=1e-5` → {"train": {"lr": 1e-05}}; the value is parsed as YAML."""
    key, sep, _ = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise AdvcapError(f"override {item!r} is not allowed; expected dotted.key=value (e.g. train.lr=1e-5)")
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist([item]), resolve=False)
    except (yaml.YAMLError, OmegaConfBaseException) as err:
        raise AdvcapError(f"override {item!r} cannot be parsed: {' '.join(str(err).split())}") from None


# ---------------------------------------------------------------- key and type checks


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _check_layer(data: Any, cls: type, prefix: str, label: str) -> None:
    """Every key of `data` must be a field of dataclass `cls`, with a value of the field's type."""
    section = prefix.rstrip(".") or "the config"
    if not isinstance(data, dict):
        raise AdvcapError(f"{section}: {data!r} is not allowed; expected a mapping of keys ({label})")
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in hints:
            close = get_close_matches(str(key), list(hints), n=1)
            hint = f"did you mean {prefix}{close[0]}? " if close else ""
            raise AdvcapError(
                f"unknown key {dotted!r} ({label}); {hint}{section} has: {', '.join(hints)}"
            )
        expected = hints[key]
        if dataclasses.is_dataclass(expected):
            _check_layer(value, expected, dotted + ".", label)
        else:
            _check_type(dotted, value, expected, label)


def _check_type(key: str, value: Any, expected: Any, label: str) -> None:
    args = typing.get_args(expected)
    if typing.get_origin(expected) is Union:  # Optional[X]
        if value is None:
            return
        (expected,) = [a for a in args if a is not type(None)]
    if typing.get_origin(expected) is list:
        (item_type,) = typing.get_args(expected)
        if not isinstance(value, list):
            raise AdvcapError(
                f"{key}: {value!r} is not allowed; expected a list, each item {_TYPE_NAMES[item_type]} "
                f"(e.g. {key}=[a,b]) ({label})"
            )
        for i, item in enumerate(value):
            _check_type(f"{key}[{i}]", item, item_type, label)
        return
    if not _is_instance(value, expected):
        raise AdvcapError(f"{key}: {value!r} is not allowed; expected {_TYPE_NAMES[expected]} ({label})")
    if isinstance(value, str) and "${" in value:
        raise AdvcapError(
            f"{key}: {value!r} is not allowed; expected plain text, no ${{...}} interpolation ({label})"
        )


def _is_instance(value: Any, expected: type) -> bool:
    if expected is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):  # bool is an int subclass; `steps: true` is a mistake
        return False
    if expected is float:
        return isinstance(value, (int, float))
    return isinstance(value, expected)


# ---------------------------------------------------------------- range checks

Problem = tuple[str, Any, str]  # (dotted key, bad value, what is allowed)


def _problems(cfg: Any) -> list[Problem]:
    checks = (
        (_data_problems, cfg.data),
        (_model_problems, cfg.model),
        (_freeze_problems, cfg.freeze),
        (_attack_problems, cfg.attack),
        (_train_problems, cfg.train),
        (_eval_problems, cfg.eval),
        (_dist_problems, cfg.dist),
        (_log_problems, cfg.log),
        (_run_problems, cfg.run),
    )
    return [p for check, section in checks for p in check(section)]


def _raise_problems(problems: Iterable[Problem], sources: Mapping[str, str] | None = None) -> None:
    messages = []
    for key, value, allowed in problems:
        where = ""
        if sources is not None:
            where = f" ({sources.get(key.split('[')[0], 'the default')})"
        messages.append(f"{key}: {_fmt(value)} is not allowed; expected {allowed}{where}")
    if messages:
        raise AdvcapError("; ".join(messages))


def _at_least(key: str, value: Optional[int], low: int, optional: bool = False) -> Iterator[Problem]:
    if value is None and optional:
        return
    if value < low:
        yield key, value, f"an integer >= {low}"


def _positive(key: str, value: float) -> Iterator[Problem]:
    if not (math.isfinite(value) and value > 0):
        yield key, value, "a finite number > 0"


def _non_negative(key: str, value: float) -> Iterator[Problem]:
    if not (math.isfinite(value) and value >= 0):
        yield key, value, "a finite number >= 0"


def _in_unit_interval(key: str, value: float, right_open: bool = False) -> Iterator[Problem]:
    if not (0 <= value < 1 if right_open else 0 <= value <= 1):
        yield key, value, "a number in [0, 1)" if right_open else "a number in [0, 1]"


def _one_of(key: str, value: str, allowed: Sequence[str]) -> Iterator[Problem]:
    if value not in allowed:
        yield key, value, "one of " + " | ".join(allowed)


def _non_empty(key: str, value: Optional[str], optional: bool = False) -> Iterator[Problem]:
    if value is None and optional:
        return
    if not value or not value.strip():
        yield key, value, "a non-empty string" + (" or null" if optional else "")


def _distinct(key: str, values: Sequence[str]) -> Iterator[Problem]:
    if not values:
        yield key, list(values), "a non-empty list"
    for i, value in enumerate(values):
        if value in list(values)[:i]:
            yield f"{key}[{i}]", value, "each entry at most once"


def _data_problems(d: Any) -> Iterator[Problem]:
    yield from _non_empty("data.shards", d.shards)
    for split in EVAL_SPLITS:
        yield from _at_least(f"data.samples.{split}", getattr(d.samples, split), 1, optional=True)
    yield from _at_least("data.fetch_retries", d.fetch_retries, 0)
    yield from _at_least("data.image_size", d.image_size, 1)
    yield from _at_least("data.max_caption_tokens", d.max_caption_tokens, 2)
    yield from _at_least("data.workers", d.workers, 0)
    yield from _at_least("data.shuffle_buffer", d.shuffle_buffer, 1)
    yield from _at_least("data.cache_mb", d.cache_mb, 0)
    if d.cache_mb > 0 and d.workers > 0:
        yield "data.cache_mb", d.cache_mb, "0 unless data.workers=0 (DataLoader workers start empty each epoch)"
    yield from _non_empty("data.tokenizer", d.tokenizer, optional=True)


def _model_problems(m: Any) -> Iterator[Problem]:
    yield from _one_of("model.preset", m.preset, MODEL_PRESETS)
    for key in ("encoder", "decoder", "init_from"):
        yield from _non_empty(f"model.{key}", getattr(m, key), optional=True)
    if m.init_from is not None and (m.encoder is not None or m.decoder is not None):
        yield "model.init_from", m.init_from, "null when model.encoder or model.decoder is set (one source)"
    if m.preset == "custom" and m.init_from is None and (m.encoder is None or m.decoder is None):
        yield "model.preset", m.preset, "'custom' only with model.init_from or both model.encoder and model.decoder"
    yield from _in_unit_interval("model.dropout", m.dropout, right_open=True)


def _freeze_problems(f: Any) -> Iterator[Problem]:
    yield from _one_of("freeze.modules", f.modules, FREEZE_MODULES)
    for key in ("keep_trainable", "also_freeze"):
        for i, pattern in enumerate(getattr(f, key)):
            try:
                re.compile(pattern)
            except re.error as err:
                yield f"freeze.{key}[{i}]", pattern, f"a regular expression ({err})"


def _attack_problems(a: Any) -> Iterator[Problem]:
    yield from _in_unit_interval("attack.epsilon", a.epsilon)


def _train_problems(t: Any) -> Iterator[Problem]:
    yield from _one_of("train.mode", t.mode, TRAIN_MODES)
    yield from _one_of("train.precision", t.precision, PRECISIONS)
    yield from _in_unit_interval("train.clean_weight", t.clean_weight)
    if not 0 <= t.seed < 2**32:
        yield "train.seed", t.seed, "an integer in [0, 2**32)"
    for key in ("steps", "global_batch_size", "max_batch_size_per_rank", "max_nonfinite_steps",
                "log_every_steps", "image_log_every_steps", "checkpoint_every_steps", "keep_checkpoints",
                "val_images", "val_pgd_steps", "overfit_patience"):
        yield from _at_least(f"train.{key}", getattr(t, key), 1)
    yield from _at_least("train.val_every_steps", t.val_every_steps, 0)
    yield from _one_of("train.keep_best", t.keep_best, (*VAL_METRICS, "none"))
    yield from _one_of("train.overfit_guard", t.overfit_guard, OVERFIT_ACTIONS)
    if t.overfit_guard == "rollback" and t.keep_best == "none":
        yield "train.overfit_guard", t.overfit_guard, "stop, warn or off when train.keep_best is none (nothing to roll back to)"
    yield from _in_unit_interval("train.overfit_fgsm_share", t.overfit_fgsm_share)
    yield from _non_negative("train.overfit_min_gap", t.overfit_min_gap)
    yield from _at_least("train.warmup_steps", t.warmup_steps, 0)
    yield from _positive("train.lr", t.lr)
    yield from _non_negative("train.weight_decay", t.weight_decay)
    yield from _non_negative("train.grad_clip_norm", t.grad_clip_norm)


def _eval_problems(e: Any) -> Iterator[Problem]:
    yield from _distinct("eval.splits", e.splits)
    for i, split in enumerate(e.splits):
        yield from _one_of(f"eval.splits[{i}]", split, EVAL_SPLITS)
    yield from _distinct("eval.conditions", e.conditions)
    for i, condition in enumerate(e.conditions):
        try:
            parse_condition(condition)
        except AdvcapError:
            allowed = " | ".join(EVAL_CONDITIONS) + " | fgsm@<epsilon in [0, 1]>"
            yield f"eval.conditions[{i}]", condition, f"one of {allowed}"
    for key in ("train_subset_images", "batch_size", "max_new_tokens", "num_beams", "pgd_steps", "pgd_restarts",
                "audit_images"):
        yield from _at_least(f"eval.{key}", getattr(e, key), 1)
    if e.pgd_step_size is not None:
        yield from _positive("eval.pgd_step_size", e.pgd_step_size)
    if e.pgd_restarts > 1 and not e.pgd_random_start:
        yield "eval.pgd_restarts", e.pgd_restarts, "1 when eval.pgd_random_start is false (restarts differ only in their start)"
    yield from _one_of("eval.pgd_target", e.pgd_target, PGD_TARGETS)
    yield from _non_empty("eval.target_caption", e.target_caption, optional=True)
    yield from _non_empty("eval.transfer_from", e.transfer_from, optional=True)


def _dist_problems(d: Any) -> Iterator[Problem]:
    yield from _at_least("dist.timeout_s", d.timeout_s, 1)


def _log_problems(log: Any) -> Iterator[Problem]:
    for i, name in enumerate(log.trackers):
        yield from _one_of(f"log.trackers[{i}]", name, TRACKERS)
        if name in list(log.trackers)[:i]:
            yield f"log.trackers[{i}]", name, "each tracker at most once"


def _run_problems(r: Any) -> Iterator[Problem]:
    yield from _non_empty("run.out", r.out)
    for key in ("dataset", "phase"):
        value = getattr(r, key)
        if not _NAME.fullmatch(value) or value in (".", ".."):
            yield f"run.{key}", value, "a directory name of letters, digits, '.', '_' and '-'"


def parse_condition(condition: str) -> tuple[str, Optional[float]]:
    """Split an eval condition into (kind, epsilon): `fgsm@0.03` → ("fgsm", 0.03), `pgd` → ("pgd", None).

    epsilon is None when the condition uses `attack.epsilon`; it is in [0,1] pixel units otherwise.
    Raises AdvcapError for anything but EVAL_CONDITIONS and fgsm@<epsilon in [0, 1]>.
    """
    if condition in EVAL_CONDITIONS:
        return condition, None
    match = _FGSM_AT.fullmatch(condition)
    if match:
        try:
            epsilon = float(match["eps"])
        except ValueError:
            epsilon = math.nan
        if 0 <= epsilon <= 1:
            return "fgsm", epsilon
    raise AdvcapError(
        f"eval condition {condition!r} is not allowed; expected one of {' | '.join(EVAL_CONDITIONS)} "
        "or fgsm@<epsilon in [0, 1]>"
    )


# ---------------------------------------------------------------- saving and comparing


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The config as nested plain dicts and lists (section → key → value)."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | os.PathLike[str]) -> Path:
    """Write the resolved config (every key, no parent) as YAML to `path`; returns the path.

    The file is replaced atomically, and `load_config(path)` gives back a config equal to `cfg`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = (
        "# advcap resolved config: every key, no parent. Reload with --config <this file>.\n"
        + OmegaConf.to_yaml(config_to_dict(cfg))
    )
    from advcap import atomic

    return atomic.write_text(path, text)


def diff_configs(
    a: Config | Mapping[str, Any], b: Config | Mapping[str, Any], ignore: Sequence[str] = ("train.seed",)
) -> list[str]:
    """Dotted keys whose values differ, as "train.lr: 0.0001 != 5e-5"; empty when the configs agree.

    `ignore` lists dotted keys or whole sections (`run` ignores every run.* key) left out of the
    comparison; by default the seed, so runs of one experiment over several seeds compare equal.
    """
    flat_a = _flatten(config_to_dict(a) if isinstance(a, Config) else a)
    flat_b = _flatten(config_to_dict(b) if isinstance(b, Config) else b)
    missing = object()
    diffs = []
    for key in [*flat_a, *(k for k in flat_b if k not in flat_a)]:
        if any(key == ig or key.startswith(ig + ".") for ig in ignore):
            continue
        va, vb = flat_a.get(key, missing), flat_b.get(key, missing)
        if va != vb:
            diffs.append(f"{key}: {_fmt(va, missing)} != {_fmt(vb, missing)}")
    return diffs


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1e-5}} → {"train.lr": 1e-5}; lists are values, not sections."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _fmt(value: Any, missing: object = None) -> str:
    if missing is not None and value is missing:
        return "<missing>"
    if isinstance(value, float):
        return re.sub(r"e([+-])0+(?=\d)", r"e\1", repr(value))  # 5e-05 → 5e-5
    return repr(value)


# ---------------------------------------------------------------- derived values


def pgd_step_size(cfg_eval: "EvalConfig", epsilon: float) -> float:
    """PGD's step in pixel units at `epsilon`: eval.pgd_step_size, or 2.5·ε / eval.pgd_steps."""
    return cfg_eval.pgd_step_size if cfg_eval.pgd_step_size is not None else 2.5 * epsilon / cfg_eval.pgd_steps


def epsilon_text(epsilon: float) -> str:
    """ε in the three conventions a reader may know: [0,1] pixels, /255, and the paper's [-1,1] inputs."""
    return f"ε = {epsilon:g} ([0,1] pixels) = {epsilon * 255:.4g}/255 = {2 * epsilon:g} on [-1,1] inputs"



def per_rank_batch_size(cfg: Config, world_size: int) -> int:
    """Samples in one rank's micro-batch (one forward/backward) for `world_size` ranks.

    global_batch_size = world_size × per_rank_batch_size × grad_accum_steps, with the micro-batch at
    most `train.max_batch_size_per_rank`. Raises AdvcapError when the global batch cannot be split so.
    """
    return _split_batch(cfg, world_size)[0]


def grad_accum_steps(cfg: Config, world_size: int) -> int:
    """Micro-batches each rank accumulates per optimizer step (>= 1); see per_rank_batch_size."""
    return _split_batch(cfg, world_size)[1]


def _split_batch(cfg: Config, world_size: int) -> tuple[int, int]:
    """(micro-batch, accumulation): the fewest equal micro-batches per rank that fit the memory cap."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    total, cap = cfg.train.global_batch_size, cfg.train.max_batch_size_per_rank
    if total % world_size:
        raise AdvcapError(
            f"train.global_batch_size={total} is not divisible by the world size {world_size}; "
            f"expected a multiple of {world_size} (e.g. {max(world_size, total - total % world_size)})"
        )
    per_rank = total // world_size
    accum = -(-per_rank // cap)
    if per_rank % accum:
        unit = world_size * accum
        raise AdvcapError(
            f"train.global_batch_size={total} cannot be split over world size {world_size}: each rank's "
            f"{per_rank} samples need {accum} micro-batches of at most train.max_batch_size_per_rank={cap}, "
            f"and {per_rank} is not divisible by {accum}; expected a multiple of world size × "
            f"accumulation = {unit} (e.g. {total - total % unit} or {total - total % unit + unit}), "
            "or another train.max_batch_size_per_rank"
        )
    return per_rank // accum, accum
