"""Tests of advcap.config: shipped configs, parents, overrides, strict checks, round trip, batch split."""

from __future__ import annotations

import configparser
import dataclasses
from pathlib import Path

import pytest
import yaml

from advcap import config as C
from advcap.config import (
    Config,
    config_to_dict,
    diff_configs,
    grad_accum_steps,
    load_config,
    parse_condition,
    per_rank_batch_size,
    save_config,
    shipped_configs,
    validate,
)
from advcap.errors import AdvcapError
from advcap.rundir import run_path

REPO = Path(__file__).resolve().parent.parent
PHASES = ("baseline", "adversarial", "adv_train", "freeze_vit", "freeze_gpt", "freeze_gpt_xattn")
SHIPPED_FILES = sorted(C._shipped_dir().glob("*.yaml"))


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path.resolve()  # as error messages show it (tmp dirs may sit behind symlinks)


def _flat(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# ---------------------------------------------------------------- shipped configs


def test_every_phase_and_base_is_shipped():
    assert {"base", *PHASES} <= set(shipped_configs())
    assert {p.stem for p in SHIPPED_FILES} == set(shipped_configs())


@pytest.mark.parametrize("path", SHIPPED_FILES, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_validates(path):
    cfg = load_config(path.stem)
    assert isinstance(cfg, Config)
    validate(cfg)
    # Each phase file names its own phase, so its runs land in runs/<dataset>/<phase>/.
    if path.stem in PHASES:
        assert cfg.run.phase == path.stem
    # A shipped file holds only known keys besides `parent` (checked again here on the raw YAML).
    raw = yaml.safe_load(path.read_text()) or {}
    assert set(raw) - {"parent"} <= {f.name for f in dataclasses.fields(Config)}


def test_base_yaml_holds_every_default_equal_to_the_schema():
    # PyYAML (YAML 1.1) reads 5.0e-05 as a float only with the dot, which base.yaml keeps.
    raw = yaml.safe_load((C._shipped_dir() / "base.yaml").read_text())
    assert "parent" not in raw
    assert _flat(raw) == _flat(config_to_dict(Config()))


@pytest.mark.parametrize(
    "name, mode, modules, keep_trainable",
    [
        ("baseline", "clean", "none", []),
        ("adversarial", "adversarial", "none", []),
        ("adv_train", "mixed", "none", []),
        ("freeze_vit", "mixed", "encoder", []),
        ("freeze_gpt", "mixed", "decoder", []),
        ("freeze_gpt_xattn", "mixed", "decoder", ["crossattention", "ln_cross_attn"]),
    ],
)
def test_phase_settings(name, mode, modules, keep_trainable):
    cfg = load_config(name)
    assert (cfg.train.mode, cfg.freeze.modules, cfg.freeze.keep_trainable) == (mode, modules, keep_trainable)
    assert cfg.run.phase == name


def test_phases_differ_only_in_what_defines_them():
    """A paired design: every phase shares data, model, attack, schedule and evaluation."""
    base = load_config("baseline")
    defining = ("train.mode", "freeze", "run.phase")
    for name in PHASES:
        assert diff_configs(base, load_config(name), ignore=defining) == [], name


def test_parent_chain_resolution():
    vit = load_config("freeze_vit")  # freeze_vit → adv_train → base
    assert vit.train.mode == "mixed" and vit.freeze.modules == "encoder"
    xattn = load_config("freeze_gpt_xattn")  # three levels: → freeze_gpt → adv_train → base
    assert xattn.train.mode == "mixed" and xattn.freeze.modules == "decoder"
    assert xattn.freeze.keep_trainable == ["crossattention", "ln_cross_attn"]
    assert xattn.train.lr == 5e-5  # from base, through every level


# ---------------------------------------------------------------- overrides


def test_overrides_are_parsed_like_yaml():
    cfg = load_config(
        "freeze_vit",
        overrides=[
            "train.lr=1e-5",
            "attack.epsilon=0.03",
            "model.preset=tiny",
            "train.steps=10",
            "eval.splits=[test,train]",
            "eval.conditions=[clean,fgsm@0.1,transfer-fgsm]",
            "attack.random_start=true",
            "data.tokenizer=tok/dir",
            "train.weight_decay=0",
        ],
    )
    assert cfg.train.lr == 1e-5 and type(cfg.train.lr) is float
    assert cfg.attack.epsilon == 0.03
    assert cfg.model.preset == "tiny"
    assert cfg.train.steps == 10 and type(cfg.train.steps) is int
    assert cfg.eval.splits == ["test", "train"] and type(cfg.eval.splits) is list
    assert cfg.eval.conditions == ["clean", "fgsm@0.1", "transfer-fgsm"]
    assert cfg.attack.random_start is True
    assert cfg.data.tokenizer == "tok/dir"
    assert cfg.train.weight_decay == 0.0 and type(cfg.train.weight_decay) is float
    assert cfg.freeze.modules == "encoder"  # the file's values stay where not overridden


def test_later_override_wins_and_null_clears_optional():
    cfg = load_config("base", ["train.steps=5", "train.steps=7", "data.tokenizer=x", "data.tokenizer=null"])
    assert cfg.train.steps == 7
    assert cfg.data.tokenizer is None


def test_override_can_set_a_whole_section():
    cfg = load_config("base", ["train={lr: 0.001, steps: 3}"])
    assert (cfg.train.lr, cfg.train.steps, cfg.train.seed) == (0.001, 3, 0)


@pytest.mark.parametrize("item", ["train.lr", "=3", "train..lr=1", "train.lr=[1,"])
def test_malformed_override(item):
    with pytest.raises(AdvcapError, match="override"):
        load_config("base", [item])


# ---------------------------------------------------------------- unknown keys and wrong types


def test_unknown_key_in_override_names_key_and_override():
    with pytest.raises(AdvcapError) as err:
        load_config("adv_train", ["train.stepz=3"])
    msg = str(err.value)
    assert "train.stepz" in msg and "override 'train.stepz=3'" in msg
    assert "did you mean train.steps" in msg


def test_unknown_section_in_override():
    with pytest.raises(AdvcapError, match="unknown key 'optim'"):
        load_config("base", ["optim.lr=1"])


def test_unknown_key_in_file_names_key_and_file(tmp_path):
    path = _write(tmp_path / "mine.yaml", "parent: adv_train\nattack:\n  epsilonn: 0.1\n")
    with pytest.raises(AdvcapError) as err:
        load_config(path)
    assert "attack.epsilonn" in str(err.value) and str(path) in str(err.value)


def test_unknown_key_in_a_parent_file_names_the_parent(tmp_path):
    parent = _write(tmp_path / "common.yaml", "parent: base\nmodel:\n  presett: tiny\n")
    child = _write(tmp_path / "child.yaml", "parent: common\n")
    with pytest.raises(AdvcapError) as err:
        load_config(child)
    assert "model.presett" in str(err.value) and str(parent) in str(err.value)


def test_parent_is_only_a_top_level_key(tmp_path):
    path = _write(tmp_path / "x.yaml", "train:\n  parent: base\n")
    with pytest.raises(AdvcapError, match="unknown key 'train.parent'"):
        load_config(path)


@pytest.mark.parametrize(
    "item, key, shown",
    [
        ("train.steps=ten", "train.steps", "'ten'"),
        ("train.steps=1.5", "train.steps", "1.5"),
        ("train.steps=true", "train.steps", "True"),
        ("train.lr=fast", "train.lr", "'fast'"),
        ("train.lr=[1]", "train.lr", "[1]"),
        ("attack.random_start=maybe", "attack.random_start", "'maybe'"),
        ("attack.random_start=1", "attack.random_start", "1"),
        ("model.preset=3", "model.preset", "3"),
        ("model.preset=null", "model.preset", "None"),
        ("eval.splits=test", "eval.splits", "'test'"),
        ("eval.splits=[test,[train]]", "eval.splits[1]", "['train']"),
        ("train=3", "train", "3"),
        ("run.dataset=${oc.env:HOME}", "run.dataset", "'${oc.env:HOME}'"),
    ],
)
def test_wrong_type_names_key_value_and_override(item, key, shown):
    with pytest.raises(AdvcapError) as err:
        load_config("base", [item])
    msg = str(err.value)
    assert msg.startswith(f"{key}: {shown} is not allowed; expected ")
    assert msg.endswith(f"(override {item!r})")


def test_wrong_type_in_file_names_file(tmp_path):
    path = _write(tmp_path / "bad.yaml", "parent: baseline\ntrain:\n  global_batch_size: sixty-four\n")
    with pytest.raises(AdvcapError) as err:
        load_config(path)
    msg = str(err.value)
    assert "train.global_batch_size" in msg and "sixty-four" in msg and str(path) in msg


# ---------------------------------------------------------------- ranges


@pytest.mark.parametrize(
    "item, key, allowed",
    [
        ("attack.epsilon=-0.01", "attack.epsilon", "[0, 1]"),
        ("attack.epsilon=1.5", "attack.epsilon", "[0, 1]"),
        ("train.clean_weight=-0.1", "train.clean_weight", "[0, 1]"),
        ("train.clean_weight=1.1", "train.clean_weight", "[0, 1]"),
        ("train.lr=0", "train.lr", "> 0"),
        ("train.lr=-1e-5", "train.lr", "> 0"),
        ("train.lr=.nan", "train.lr", "finite"),
        ("train.lr=.inf", "train.lr", "finite"),
        ("train.grad_clip_norm=.inf", "train.grad_clip_norm", "finite"),
        ("train.steps=0", "train.steps", ">= 1"),
        ("train.global_batch_size=0", "train.global_batch_size", ">= 1"),
        ("train.max_batch_size_per_rank=0", "train.max_batch_size_per_rank", ">= 1"),
        ("train.seed=-1", "train.seed", "[0, 2**32)"),
        ("train.warmup_steps=-1", "train.warmup_steps", ">= 0"),
        ("train.mode=robust", "train.mode", "clean | adversarial | mixed"),
        ("model.preset=huge", "model.preset", "tiny | demo | vit-base-gpt2 | custom"),
        ("model.preset=custom", "model.preset", "model.init_from"),
        ("model.dropout=1", "model.dropout", "[0, 1)"),
        ("freeze.modules=both", "freeze.modules", "none | encoder | decoder"),
        ("freeze.also_freeze=['(']", "freeze.also_freeze[0]", "regular expression"),
        ("eval.splits=[test,dev]", "eval.splits[1]", "train | val | test"),
        ("eval.splits=[]", "eval.splits", "non-empty"),
        ("eval.conditions=[clean,clean]", "eval.conditions[1]", "at most once"),
        ("eval.conditions=[fgsm@2]", "eval.conditions[0]", "fgsm@<epsilon in [0, 1]>"),
        ("eval.conditions=[cw]", "eval.conditions[0]", "transfer-fgsm"),
        ("eval.pgd_target=caption", "eval.pgd_target", "reference | clean_caption"),
        ("eval.num_beams=0", "eval.num_beams", ">= 1"),
        ("data.workers=-1", "data.workers", ">= 0"),
        ("data.cache_mb=-1", "data.cache_mb", ">= 0"),
        ("data.cache_mb=64", "data.cache_mb", "data.workers=0"),  # adv_train reads with 2 workers
        ("data.tokenizer=''", "data.tokenizer", "non-empty"),
        ("run.phase=../elsewhere", "run.phase", "directory name"),
    ],
)
def test_out_of_range_names_key_value_allowed_and_source(item, key, allowed):
    with pytest.raises(AdvcapError) as err:
        load_config("adv_train", [item])
    msg = str(err.value)
    assert msg.startswith(f"{key}: ")
    assert allowed in msg
    assert f"(override {item!r})" in msg


def test_custom_preset_with_explicit_sources_is_valid():
    pair = load_config("base", ["model.preset=custom", "model.encoder=vit-dir", "model.decoder=gpt-dir"])
    whole = load_config("base", ["model.preset=custom", "model.init_from=runs/x/hf"])
    assert pair.model.encoder == "vit-dir" and whole.model.init_from == "runs/x/hf"
    with pytest.raises(AdvcapError, match="model.init_from"):
        load_config("base", ["model.init_from=a", "model.encoder=b"])


def test_out_of_range_value_from_a_file_names_the_file(tmp_path):
    path = _write(tmp_path / "eps.yaml", "parent: adv_train\nattack:\n  epsilon: -0.1\n")
    with pytest.raises(AdvcapError) as err:
        load_config(path)
    msg = str(err.value)
    assert "attack.epsilon: -0.1" in msg and str(path) in msg


def test_every_problem_is_reported_at_once():
    with pytest.raises(AdvcapError) as err:
        load_config("base", ["train.lr=-1", "train.steps=0"])
    assert "train.lr" in str(err.value) and "train.steps" in str(err.value)


def test_configs_are_frozen_and_validated_when_built():
    cfg = load_config("base")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.lr = 1.0  # type: ignore[misc]
    with pytest.raises(AdvcapError, match="train.lr"):
        dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=-1.0))
    assert dataclasses.replace(cfg.train, steps=3).steps == 3


def test_parse_condition():
    assert parse_condition("pgd") == ("pgd", None)
    assert parse_condition("transfer-fgsm") == ("transfer-fgsm", None)
    assert parse_condition("fgsm@0.03") == ("fgsm", 0.03)
    assert parse_condition("fgsm@1e-2") == ("fgsm", 0.01)
    for bad in ("fgsm@", "fgsm@x", "fgsm@-0.1", "fgsm@nan", "pgd@0.1", "FGSM"):
        with pytest.raises(AdvcapError, match="not allowed"):
            parse_condition(bad)


# ---------------------------------------------------------------- finding files


def test_bare_name_name_with_yaml_and_path_agree(tmp_path, monkeypatch):
    shipped = C._shipped_dir() / "freeze_vit.yaml"
    by_name = load_config("freeze_vit")
    assert load_config("freeze_vit.yaml") == by_name
    assert load_config(str(shipped)) == by_name
    assert load_config(shipped) == by_name
    monkeypatch.chdir(shipped.parent.parent)
    assert load_config(f"{shipped.parent.name}/freeze_vit.yaml") == by_name  # relative to the cwd


def test_none_loads_base():
    assert load_config() == load_config("base") == Config()


def test_user_file_elsewhere_with_shipped_parent(tmp_path):
    path = _write(tmp_path / "experiments" / "mine.yaml", "parent: adv_train\ntrain:\n  lr: 1.0e-4\n")
    cfg = load_config(path)
    assert cfg.train.mode == "mixed" and cfg.train.lr == 1e-4 and cfg.run.phase == "adv_train"


def test_parent_beside_the_file_wins_and_relative_paths_work(tmp_path):
    # A sibling named like a shipped config shadows it: names resolve beside the file first.
    _write(tmp_path / "adv_train.yaml", "parent: base\ntrain:\n  mode: adversarial\n")
    _write(tmp_path / "common" / "shared.yaml", "parent: base\ntrain:\n  steps: 42\n")
    child = _write(tmp_path / "exp" / "child.yaml", "parent: ../adv_train\n")
    grandchild = _write(tmp_path / "exp" / "gc.yaml", "parent: ../common/shared.yaml\n")
    sibling = _write(tmp_path / "sib.yaml", "parent: adv_train\n")
    assert load_config(child).train.mode == "adversarial"
    assert load_config(sibling).train.mode == "adversarial"
    assert load_config(grandchild).train.steps == 42


def test_missing_config_lists_shipped_names(tmp_path):
    with pytest.raises(AdvcapError) as err:
        load_config("no_such_phase")
    assert "no_such_phase" in str(err.value) and "freeze_vit" in str(err.value)
    path = _write(tmp_path / "orphan.yaml", "parent: nowhere\n")
    with pytest.raises(AdvcapError) as err:
        load_config(path)
    assert "'nowhere'" in str(err.value) and str(path) in str(err.value)


def test_parent_cycle_is_an_error(tmp_path):
    a = _write(tmp_path / "a.yaml", "parent: b\n")
    b = _write(tmp_path / "b.yaml", "parent: a.yaml\n")
    with pytest.raises(AdvcapError) as err:
        load_config(a)
    assert str(err.value) == f"config parents form a cycle: {a} -> {b} -> {a}"
    selfish = _write(tmp_path / "self.yaml", "parent: self\n")
    with pytest.raises(AdvcapError) as err:
        load_config(selfish)
    assert str(err.value) == f"config parents form a cycle: {selfish} -> {selfish}"


@pytest.mark.parametrize(
    "text, match",
    [("train: [1,\n", "cannot read config"), ("- 1\n", "mapping"), ("parent: 3\n", "parent: 3")],
)
def test_malformed_file(tmp_path, text, match):
    path = _write(tmp_path / "broken.yaml", text)
    with pytest.raises(AdvcapError, match=match) as err:
        load_config(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------- saving and comparing


@pytest.mark.parametrize("name", PHASES)
def test_save_load_round_trip(tmp_path, name):
    cfg = load_config(name, ["train.lr=1e-5", "train.seed=2", "eval.splits=[test]", "data.tokenizer=tok"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    saved = yaml.safe_load(path.read_text())
    assert "parent" not in saved and set(saved) == {f.name for f in dataclasses.fields(Config)}
    again = load_config(path)
    assert again == cfg
    assert diff_configs(again, cfg, ignore=()) == []


def test_config_to_dict_is_plain_data():
    data = config_to_dict(load_config("freeze_gpt_xattn"))
    assert data["freeze"]["keep_trainable"] == ["crossattention", "ln_cross_attn"]
    assert yaml.safe_load(yaml.safe_dump(data)) == data  # only YAML-native types


def test_diff_configs():
    a = load_config("adv_train")
    b = load_config("adv_train", ["train.lr=1e-4", "train.seed=1", "eval.splits=[test]"])
    assert diff_configs(a, a) == []
    assert diff_configs(b, a) == ["train.lr: 0.0001 != 5e-5", "eval.splits: ['test'] != ['test', 'train']"]
    assert "train.seed: 1 != 0" in diff_configs(b, a, ignore=())
    assert diff_configs(b, a, ignore=("train", "eval")) == []
    # Runs of one experiment differ only in the seed: averaging them is allowed.
    assert diff_configs(load_config("freeze_vit", ["train.seed=2"]), load_config("freeze_vit")) == []
    # Phases differ in what defines them.
    assert diff_configs(load_config("freeze_vit"), load_config("freeze_gpt")) == [
        "freeze.modules: 'encoder' != 'decoder'",
        "run.phase: 'freeze_vit' != 'freeze_gpt'",
    ]


def test_diff_configs_against_a_saved_mapping(tmp_path):
    cfg = load_config("baseline")
    saved = yaml.safe_load(save_config(cfg, tmp_path / "c.yaml").read_text())
    assert diff_configs(cfg, saved) == []
    del saved["train"]["lr"]
    assert diff_configs(cfg, saved) == ["train.lr: 5e-5 != <missing>"]


# ---------------------------------------------------------------- derived values


@pytest.mark.parametrize(
    "global_batch, cap, world, micro, accum",
    [
        (64, 64, 1, 64, 1),
        (64, 64, 2, 32, 1),
        (64, 64, 8, 8, 1),
        (64, 16, 1, 16, 4),
        (64, 16, 2, 16, 2),
        (64, 8, 4, 8, 2),
        (96, 64, 1, 48, 2),  # the fewest micro-batches under the cap, split evenly
        (96, 40, 2, 24, 2),
        (6, 1, 3, 1, 2),
    ],
)
def test_batch_split(global_batch, cap, world, micro, accum):
    cfg = load_config("base", [f"train.global_batch_size={global_batch}", f"train.max_batch_size_per_rank={cap}"])
    assert per_rank_batch_size(cfg, world) == micro
    assert grad_accum_steps(cfg, world) == accum
    assert world * micro * accum == global_batch and micro <= cap
    assert cfg.train.global_batch_size == global_batch  # derived values are never written back


def test_global_batch_not_divisible_by_world_size():
    cfg = load_config("base", ["train.global_batch_size=64"])
    for fn in (per_rank_batch_size, grad_accum_steps):
        with pytest.raises(AdvcapError) as err:
            fn(cfg, 3)
        assert "train.global_batch_size=64" in str(err.value) and "world size 3" in str(err.value)


def test_global_batch_not_divisible_into_micro_batches():
    # 50 samples per rank under a cap of 16 need 4 micro-batches, and 50 is not divisible by 4.
    cfg = load_config("base", ["train.global_batch_size=100", "train.max_batch_size_per_rank=16"])
    with pytest.raises(AdvcapError) as err:
        per_rank_batch_size(cfg, 2)
    msg = str(err.value)
    assert "train.global_batch_size=100" in msg and "world size 2" in msg and "max_batch_size_per_rank=16" in msg
    assert "e.g. 96 or 104" in msg
    assert per_rank_batch_size(load_config("base", ["train.global_batch_size=96",
                                                    "train.max_batch_size_per_rank=16"]), 2) == 16


def test_world_size_must_be_positive():
    with pytest.raises(ValueError):
        grad_accum_steps(Config(), 0)


def test_run_dir():
    cfg = load_config("freeze_vit", ["run.out=/scratch/runs", "run.dataset=coco", "train.seed=2"])
    assert run_path(cfg) == Path("/scratch/runs/coco/freeze_vit/seed2")


# ---------------------------------------------------------------- packaging


def test_setup_cfg_ships_configs_and_every_subpackage():
    """setup.cfg lists packages explicitly (to map configs/ into advcap.configs): none may be missing."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    packages = set(cfg["options"]["packages"].split())
    on_disk = {
        ".".join(p.parent.relative_to(REPO).parts)
        for p in (REPO / "advcap").rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    assert on_disk | {"advcap.configs"} <= packages
    assert "advcap.configs = configs" in cfg["options"]["package_dir"]
    assert "*.yaml" in cfg["options.package_data"]["advcap.configs"].split()


def test_the_paper_phases_are_shipped_configs():
    """PAPER_PHASES (the report's order, the demo's and `advcap demo`'s default) names shipped configs."""
    from advcap.config import PAPER_PHASES

    assert set(PAPER_PHASES) <= set(shipped_configs())
