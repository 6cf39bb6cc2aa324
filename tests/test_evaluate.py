"""Evaluation of a real (tiny) trained run: output schema and counts, BLEU recomputed from the predictions,
attacks and the blind condition changing captions, transfer, best-val, TensorBoard, the CLI, the `hf/` export
through transformers' Auto classes and pipelines (5.x in-process, 4.x in a subprocess: tests/transformers4.py),
and 1 vs 2 ranks giving identical results.

The run learns a task a tiny model masters in 60 steps: plain-colour images whose five captions name the
colour ("a red square", "the blue square", …), so its clean captions depend on the image and attacks
and blanking have something to change.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from advcap.checkpoint import load_checkpoint_weights
from advcap.cli import main
from advcap.conditions import caption_labels
from advcap.config import load_config
from advcap.data.manifest import load_manifest
from advcap.data.shardwriter import convert
from advcap.errors import AdvcapError
from advcap.evaluate import evaluate, load_run_config
from advcap.inference import caption_image, load_model
from advcap.metrics import corpus_bleu_scores
from advcap.rundir import RunDir, run_path
from advcap.tokenizer import train_captions, train_tokenizer

import transformers4  # tests/: transformers 4.x beside the venv's 5.x

REPO = Path(__file__).resolve().parent.parent
S = 32
COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
TEMPLATES = ("a {} square", "a {} image", "a {} picture", "{} square", "the {} square")
CONDITIONS = ["clean", "fgsm", "fgsm@0.3", "pgd", "targeted", "blind", "transfer-fgsm"]
BLEU = ("bleu1", "bleu2", "bleu3", "bleu4")
TRAIN_SUBSET = 10
STEPS = 60


def make_colour_set(root: Path, n_images: int = 48) -> tuple[Path, Path]:
    """A Karpathy-split file over plain-colour JPEGs: every 8th image is test, the one before it val."""
    rng = random.Random(0)
    (root / "images").mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(n_images):
        colour = list(COLORS)[i % len(COLORS)]
        rgb = tuple(min(255, max(0, c + rng.randrange(-25, 26))) for c in COLORS[colour])
        name = f"img_{i:03d}.jpg"
        Image.new("RGB", (S, S), rgb).save(root / "images" / name, quality=95)
        split = "test" if i % 8 == 7 else "val" if i % 8 == 6 else "train"
        entries.append({"filename": name, "imgid": i, "split": split, "sentences": [{"raw": t.format(colour)} for t in TEMPLATES]})
    (root / "captions.json").write_text(json.dumps({"images": entries}))
    return root / "captions.json", root / "images"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished run: 60 steps of the tiny preset, checkpoints at steps 40 and 60 kept."""
    from advcap.train import train

    root = tmp_path_factory.mktemp("eval")
    annotations, images = make_colour_set(root / "src")
    # resize=0 keeps the JPEG bytes, so the source files are exactly what the shards hold.
    convert("karpathy", annotations, images, root / "shards", shard_size=8, resize=0)
    train_tokenizer(train_captions(load_manifest(root / "shards")), root / "tok", vocab_size=300)
    overrides = [
        "model.preset=tiny", f"data.image_size={S}", "data.workers=0", f"train.steps={STEPS}",
        "train.global_batch_size=8", "train.warmup_steps=1", "train.lr=1e-2", "model.dropout=0.0",
        "train.checkpoint_every_steps=20", "train.keep_checkpoints=2", f"run.out={root / 'runs'}",
        f"data.shards={root / 'shards'}", f"data.tokenizer={root / 'tok'}",
        "eval.splits=[test,train]", f"eval.train_subset_images={TRAIN_SUBSET}", "eval.batch_size=4",
        "eval.max_new_tokens=8", "eval.pgd_steps=2", "eval.pgd_step_size=0.05", "eval.audit_images=6",
        f"eval.conditions=[{','.join(CONDITIONS)}]",
    ]
    out = run_path(load_config(None, overrides))
    # Transfer from the run itself: transfer-fgsm must then equal white-box fgsm exactly.
    cfg = load_config(None, [*overrides, f"eval.transfer_from={out}"])
    train(cfg)
    return out


@pytest.fixture(scope="module")
def evaluated(run) -> dict:
    """One in-process (1 rank) evaluation with the run's settings; the files' contents as they were written."""
    returned = evaluate(run)
    record = json.loads((run / "metrics.json").read_text())
    return {
        "returned": returned,
        "predictions_text": (run / "predictions.jsonl").read_text(),
        "metrics": record["metrics"],
        "predictions": [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()],
        "record": record,
    }


def copy_run(run: Path, tmp_path: Path) -> Path:
    """A copy of the run (its own output files), for evaluations that must not overwrite the shared ones."""
    return Path(shutil.copytree(run, tmp_path / "run"))


def by_split(predictions: list[dict], split: str) -> list[dict]:
    return [p for p in predictions if p["split"] == split]


def test_outputs_have_the_schema_and_the_split_counts(run, evaluated):
    metrics, predictions = evaluated["metrics"], evaluated["predictions"]
    assert evaluated["returned"] == metrics
    manifest = load_manifest(load_config(run / "config.yaml").data.shards)
    expected = {"test": manifest.samples("test"), "train": min(TRAIN_SUBSET, manifest.samples("train"))}
    assert expected == {"test": 6, "train": 10}
    assert list(metrics) == ["test", "train"]
    for split, n in expected.items():
        assert list(metrics[split]) == CONDITIONS
        for condition, values in metrics[split].items():
            coco = {"coco_bleu1", "coco_bleu2", "coco_bleu3", "coco_bleu4", "meteor", "rouge_l", "cider"}
            targeted = {"target_success", "target_bleu4", "target_images"} if condition == "targeted" else set()
            assert set(values) == {*BLEU, "images", *coco, *targeted} and values["images"] == n
            assert all(0.0 <= values[key] <= 1.0 for key in [*BLEU, "meteor", "rouge_l"])
        lines = by_split(predictions, split)
        assert len(lines) == n
        for line in lines:
            assert list(line) == ["image_id", "split", "references", "captions", "targets"]
            assert list(line["captions"]) == CONDITIONS and len(line["references"]) == 5
    # The test split whole; the train subset is the first images in the loader's order (the manifest's:
    # sorted by image id), and predictions follow that order.
    assert [p["image_id"] for p in by_split(predictions, "test")] == [f"img_{i:03d}" for i in range(7, 48, 8)]
    train_ids = sorted(f"img_{i:03d}" for i in range(48) if i % 8 < 6)
    assert [p["image_id"] for p in by_split(predictions, "train")] == train_ids[:TRAIN_SUBSET]
    assert evaluated["record"]["select"] == "final" and evaluated["record"]["step"] == STEPS
    assert evaluated["record"]["conditions"]["fgsm@0.3"] == {"kind": "fgsm", "epsilon": 0.3}
    assert evaluated["record"]["conditions"]["pgd"] == {"kind": "pgd", "epsilon": 0.05}  # attack.epsilon
    # One record: the metrics with the settings, image counts and model digest they answer to.
    record = evaluated["record"]
    assert record["settings"] == dataclasses.asdict(load_config(run / "config.yaml").eval)
    assert record["images"] == {split: {"evaluated": n, "expected": n} for split, n in expected.items()}
    assert record["partial"] is False
    assert record["model_sha256"] == json.loads((run / "provenance.json").read_text())["weights_sha256"]
    assert record["predictions_sha256"] == hashlib.sha256(evaluated["predictions_text"].encode()).hexdigest()


def test_bleu_in_metrics_is_recomputed_from_the_predictions(evaluated):
    for split, by_condition in evaluated["metrics"].items():
        lines = by_split(evaluated["predictions"], split)
        for condition, values in by_condition.items():
            scores = corpus_bleu_scores([p["captions"][condition] for p in lines], [p["references"] for p in lines])
            assert scores == {k: values[k] for k in BLEU}
    # The run learned to name colours: clean captions beat the captions of a model that does not look.
    test = evaluated["metrics"]["test"]
    assert test["clean"]["bleu1"] > test["blind"]["bleu1"]


def test_coco_metrics_equal_pycocoevalcap_run_on_the_written_files(run, evaluated):
    """The field's numbers: pycocoevalcap itself (pycocotools' COCO + its tokenizer and scorers, as COCOEvalCap
    runs them) on the COCO-format files the evaluation wrote, independently of the code that scored them."""
    import contextlib
    import io

    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    from pycocotools.coco import COCO

    meteor = Meteor()
    for split in ("test", "train"):
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO(str(run / "coco" / split / "references.json"))
        for condition in ("clean", "pgd", "blind"):
            with contextlib.redirect_stdout(io.StringIO()):
                results = coco.loadRes(str(run / "coco" / split / f"{condition}.json"))
                ids = coco.getImgIds()
                gts = PTBTokenizer().tokenize({i: coco.imgToAnns[i] for i in ids})
                res = PTBTokenizer().tokenize({i: results.imgToAnns[i] for i in ids})
                bleu, _ = Bleu(4).compute_score(gts, res)
            ours = evaluated["metrics"][split][condition]
            assert [ours[f"coco_bleu{n}"] for n in range(1, 5)] == pytest.approx(bleu, abs=1e-12)
            assert ours["meteor"] == pytest.approx(meteor.compute_score(gts, res)[0], abs=1e-12)
            assert ours["rouge_l"] == pytest.approx(Rouge().compute_score(gts, res)[0], abs=1e-12)
            assert ours["cider"] == pytest.approx(Cider().compute_score(gts, res)[0], abs=1e-12)
    notes = evaluated["record"]["metric_notes"]
    assert "nltk" in notes["bleu1..bleu4"] and "PTB tokenizer" in notes["coco_bleu1..coco_bleu4, meteor, rouge_l, cider, spice"]
    assert notes["spice"].startswith("unavailable: its Stanford CoreNLP models")  # named, never a silent gap


def test_pgd_with_restarts_hurts_at_least_as_much_as_fgsm(run, evaluated):
    """On the trained colour model: PGD (random starts, the best of two per image) raises the attacked loss
    of the references above FGSM's, and its captions score no higher."""
    from advcap.attacks import fgsm, pgd

    model, tokenizer = load_model(run)
    cfg = load_config(run / "config.yaml")
    manifest = load_manifest(cfg.data.shards)
    from advcap.data.loader import EvalStream

    batch = next(iter(EvalStream(manifest, "test", tokenizer, S, cfg.data.max_caption_tokens, 6)))
    pixels, labels = batch["pixels"], batch["labels"]
    loss = lambda x: model(x, labels)  # noqa: E731
    per_image = lambda x: model(x, labels, per_image=True)  # noqa: E731
    eps = cfg.attack.epsilon
    fgsm_loss = per_image(fgsm(loss, pixels, eps)).detach()
    starts = [pgd(loss, pixels, eps, 2.5 * eps / 10, 10, generator=torch.Generator().manual_seed(k)) for k in (1, 2)]
    best = pgd(loss, pixels, eps, 2.5 * eps / 10, 10, generator=torch.Generator().manual_seed(1), restarts=2,
               per_image_loss=per_image)
    # Restarts keep, per image, the start that hurts most: at least as strong as either start alone.
    assert torch.all(per_image(best) >= torch.maximum(*(per_image(x) for x in starts)) - 1e-4)
    assert per_image(best).sum() >= fgsm_loss.sum()
    test = evaluated["metrics"]["test"]
    assert test["pgd"]["bleu4"] <= test["fgsm"]["bleu4"] + 1e-9


def test_the_targeted_attack_makes_the_model_say_the_target(run):
    """Targeted PGD descends the loss of a chosen caption: its likelihood rises and, at a large ε, the tiny
    model says it for every image that had another colour. (The 60-step model's captions are two words,
    "a <colour>", so the target is one it can say.)"""
    from advcap.conditions import BatchCaptioner, Condition, Generation, PGDSettings
    from advcap.data.loader import EvalStream
    from advcap.evaluate import split_metrics

    model, tokenizer = load_model(run)
    cfg = load_config(run / "config.yaml")
    batch = next(iter(EvalStream(load_manifest(cfg.data.shards), "test", tokenizer, S, cfg.data.max_caption_tokens, 6)))
    target = "a red"
    bc = BatchCaptioner(model, tokenizer, Generation(8), PGDSettings(steps=20, restarts=1), target_caption=target)
    wanted = bc.labels([target] * 6, "cpu")
    before = model(batch["pixels"], wanted, per_image=True)
    images = bc.attack_pgd(batch["pixels"], wanted, 0.3, "seed", 20, 1, descend=True)
    assert torch.all(model(images, wanted, per_image=True) < before)
    captions, targets = bc(batch["pixels"], batch["labels"], batch["references"], [Condition("targeted", "targeted", 0.3)])
    assert targets == {"targeted": [target] * 6}
    records = [{"references": r, "captions": {"targeted": c}, "targets": {"targeted": t}}
               for r, c, t in zip(batch["references"], captions["targeted"], targets["targeted"])]
    scores = split_metrics(records, ["targeted"])["targeted"]
    # "a red" is no image's reference, so all six count; the non-red ones said something else when clean.
    clean, _ = bc(batch["pixels"], batch["labels"], batch["references"], [Condition("clean", "clean")])
    assert sum(c != target for c in clean["clean"]) >= 2
    assert scores["target_images"] == 6 and scores["target_success"] == 1.0, captions
    # Two-word captions have no 4-gram: BLEU-4 to the target is exactly 0 even when they are the target.
    assert scores["target_bleu4"] == 0.0


def test_the_audit_record_holds_its_sweeps(evaluated):
    audit = evaluated["record"]["audit"]
    assert audit["split"] == "test" and audit["images"] == 6
    eps = evaluated["record"]["epsilon"]["pixels"]
    expected = {"clean", "blind", "pgd", "pgd-2x-steps", "pgd-1-start", "pgd@0.5",
                *(f"fgsm@{min(1.0, f * eps):g}" for f in (0.25, 0.5, 1, 2, 4))}
    assert set(audit["bleu4"]) == expected and all(0 <= v <= 1 for v in audit["bleu4"].values())
    # Its captions too, image by image, for the report's noise allowance: they give the scores it holds.
    assert len(audit["references"]) == 6 and set(audit["captions"]) == expected
    for name, captions in audit["captions"].items():
        assert corpus_bleu_scores(captions, audit["references"])["bleu4"] == audit["bleu4"][name], name
    assert evaluated["record"]["epsilon"]["text"] == f"ε = {eps:g} ([0,1] pixels) = {eps * 255:.4g}/255 = {2 * eps:g} on [-1,1] inputs"


def test_the_audit_takes_the_evaluations_own_captions_where_they_coincide(evaluated):
    """The audit rides on the evaluation's pass: on its images (the first 6 of test; batches of 4, so the second
    batch is audited in part) clean, blind, PGD and FGSM at ε are the evaluation's captions, scored again."""
    audit = evaluated["record"]["audit"]
    first = by_split(evaluated["predictions"], "test")[:6]
    eps = evaluated["record"]["epsilon"]["pixels"]
    for audit_name, condition in {"clean": "clean", "blind": "blind", "pgd": "pgd", f"fgsm@{eps:g}": "fgsm"}.items():
        scores = corpus_bleu_scores([p["captions"][condition] for p in first], [p["references"] for p in first])
        assert audit["bleu4"][audit_name] == scores["bleu4"], audit_name
    # Its own conditions stay out of the predictions and COCO files.
    assert all(not name.startswith("audit") for p in evaluated["predictions"] for name in p["captions"])


def test_attacks_and_blanking_change_captions(evaluated):
    predictions = evaluated["predictions"]
    assert any(p["captions"]["fgsm@0.3"] != p["captions"]["clean"] for p in predictions)
    assert any(p["captions"]["blind"] != p["captions"]["clean"] for p in predictions)
    # Blind means all-zero images: one and the same caption for every image.
    assert len({p["captions"]["blind"] for p in predictions}) == 1


def test_transfer_from_the_same_model_is_white_box_fgsm(evaluated):
    assert all(p["captions"]["transfer-fgsm"] == p["captions"]["fgsm"] for p in evaluated["predictions"])


def test_metrics_are_logged_to_the_runs_tensorboard(run, evaluated):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    for split in ("test", "train"):
        for condition in CONDITIONS:
            for n in range(1, 5):
                (event,) = events.Scalars(f"eval/{split}/{condition}/bleu{n}")
                assert event.step == STEPS
                assert event.value == pytest.approx(evaluated["metrics"][split][condition][f"bleu{n}"], abs=1e-6)


def test_caption_labels_keep_tokens_up_to_the_first_eos():
    eos = 0
    ids = torch.tensor([[eos, 5, 6, eos, eos], [eos, 7, 8, 9, 10], [eos, eos, eos, eos, eos]])
    assert caption_labels(ids, eos).tolist() == [[5, 6, 0, -100], [7, 8, 9, 10], [0, -100, -100, -100]]


def test_checkpoint_weights_load_into_the_exported_architecture(run):
    exported, _ = load_model(run)
    kept, passed_over = RunDir(run).valid_checkpoints()
    assert [c.name for c in kept] == ["step00000040", "step00000060"] and passed_over == []
    last, _ = load_model(run)
    load_checkpoint_weights(last, kept[-1])  # the final checkpoint is what hf/ exported
    assert all(torch.equal(a, b) for a, b in zip(exported.state_dict().values(), last.state_dict().values()))
    earlier, _ = load_model(run)
    load_checkpoint_weights(earlier, kept[0])
    assert not all(torch.equal(a, b) for a, b in zip(exported.state_dict().values(), earlier.state_dict().values()))


def test_best_val_evaluates_the_kept_checkpoint_with_the_best_val_bleu4(run, evaluated, tmp_path):
    copy = copy_run(run, tmp_path)
    metrics = evaluate(copy, select="best-val", conditions=["clean"], splits=["test"])
    info = json.loads((copy / "metrics.json").read_text())
    scores = info["val_bleu4"]
    assert set(scores) == {"step00000040", "step00000060"}
    best = max(scores, key=lambda name: (scores[name], name))
    assert info["weights"] == f"checkpoints/{best}" and info["step"] == int(best[4:])
    assert list(metrics) == ["test"] and list(metrics["test"]) == ["clean"]
    if best == "step00000060":  # the final weights: the same captions as the final evaluation
        clean = [p["captions"]["clean"] for p in by_split(evaluated["predictions"], "test")]
        lines = [json.loads(line) for line in (copy / "predictions.jsonl").read_text().splitlines()]
        assert [p["captions"]["clean"] for p in lines] == clean


def test_pgd_can_target_the_models_own_clean_caption(run, tmp_path):
    copy = copy_run(run, tmp_path)
    metrics = evaluate(copy, conditions=["clean", "pgd"], splits=["test"], overrides=["eval.pgd_target=clean_caption"])
    info = json.loads((copy / "metrics.json").read_text())
    assert info["settings"]["pgd_target"] == "clean_caption" and info["overrides"] == ["eval.pgd_target=clean_caption"]
    assert info["pgd"]["target"] == "clean_caption"
    assert metrics["test"]["pgd"]["images"] == 6


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"select": "best"}, "--select 'best'"),
        ({"conditions": ["fgsm@2"]}, "fgsm@2"),
        ({"conditions": ["clean", "clean"]}, "given twice"),
        ({"splits": ["dev"]}, "'dev'"),
        ({"conditions": ["transfer-fgsm"], "overrides": ["eval.transfer_from=null"]}, "needs eval.transfer_from"),
        ({"overrides": ["train.lr=1"]}, "only eval"),
        ({"overrides": ["eval.num_beams=0"]}, "eval.num_beams"),
    ],
)
def test_user_mistakes_are_errors(run, kwargs, message):
    with pytest.raises(AdvcapError, match=message):
        evaluate(run, **kwargs)


def test_a_pipe_command_in_a_run_directory_is_not_run_unless_restated(run, tmp_path):
    import yaml

    copy = copy_run(run, tmp_path)
    cfg = yaml.safe_load((copy / "config.yaml").read_text())
    shards, marker = cfg["data"]["shards"], tmp_path / "ran"
    cfg["data"]["shards"] = f"pipe:touch {marker}; cat {shards}/test-{{000000..000001}}.tar"
    (copy / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(AdvcapError, match=r"data.shards runs a shell command .* restate it"):
        evaluate(copy, conditions=["clean"], splits=["test"])
    assert not marker.exists()
    restated = load_run_config(copy, [f"data.shards=pipe:cat {shards}/test-{{000000..000001}}.tar"])
    assert restated.data.shards.startswith("pipe:cat")
    assert load_run_config(copy, [f"data.shards={shards}"]).data.shards == shards  # shards moved: say where


def test_an_unfinished_run_is_refused(run, tmp_path):
    (tmp_path / "config.yaml").write_text((run / "config.yaml").read_text())
    with pytest.raises(AdvcapError, match="not a finished run"):
        evaluate(tmp_path)
    with pytest.raises(AdvcapError, match="not a run directory"):
        evaluate(tmp_path / "nowhere")


def test_cli_caption_and_attack(run, evaluated, tmp_path, capsys):
    test_line = by_split(evaluated["predictions"], "test")[0]
    image = run.parents[3] / "src" / "images" / f"{test_line['image_id']}.jpg"
    main(["caption", str(image), "--model", str(run)])
    assert capsys.readouterr().out.strip() == test_line["captions"]["clean"]
    main(["caption", str(image), "--model", str(run / "hf")])  # a bare export works too
    assert capsys.readouterr().out.strip() == test_line["captions"]["clean"]

    figure = tmp_path / "figs" / "attack.png"
    main(["attack", str(image), "--model", str(run), "--out", str(figure), "--epsilon", "0.3"])
    out = capsys.readouterr().out
    assert f"clean:       {test_line['captions']['clean']}" in out and "adversarial:" in out
    with Image.open(figure) as png:
        assert png.format == "PNG" and png.size == (900, 390)  # three square panels, captions below

    with pytest.raises(SystemExit) as exit_info:
        main(["caption", str(tmp_path / "missing.jpg"), "--model", str(run)])
    assert exit_info.value.code == 2 and "cannot read image" in capsys.readouterr().err


def test_the_export_captions_through_the_auto_classes_as_advcap_does(run, evaluated):
    """The HuggingFace way in (the model card's snippet): Auto classes of the installed transformers,
    generate through them, the same caption as the evaluation's clean one."""
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    hf = run / "hf"
    model = AutoModelForImageTextToText.from_pretrained(hf)
    processor, tokenizer = AutoImageProcessor.from_pretrained(hf), AutoTokenizer.from_pretrained(hf)
    for line in by_split(evaluated["predictions"], "test")[:3]:
        image = Image.open(run.parents[3] / "src" / "images" / f"{line['image_id']}.jpg").convert("RGB")
        ids = model.generate(**processor(image, return_tensors="pt"), max_new_tokens=8)
        assert tokenizer.decode(ids[0], skip_special_tokens=True).strip() == line["captions"]["clean"]


def readme_snippet(contains: str, hf: Path) -> str:
    """The python block of README's "Using advcap with your tools" section that contains `contains`, its
    example run's export replaced by `hf`."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Using advcap with your tools")[1].split("\n## ")[0]
    blocks = [block.split("```")[0] for block in section.split("```python\n")[1:]]
    (snippet,) = [block for block in blocks if contains in block]
    return snippet.replace('"runs/flickr8k/freeze_vit/seed0/hf"', repr(str(hf)))


def test_the_readme_snippet_captions_an_image(run, evaluated, capsys):
    line = by_split(evaluated["predictions"], "test")[0]
    image = run.parents[3] / "src" / "images" / f"{line['image_id']}.jpg"
    snippet = readme_snippet("AutoModelForImageTextToText", run / "hf")
    exec(snippet.replace('"photo.jpg"', repr(str(image))).replace("max_new_tokens=32", "max_new_tokens=8"), {})
    assert capsys.readouterr().out.strip() == line["captions"]["clean"]


@pytest.fixture(scope="module")
def export_captions(run, evaluated) -> dict[Path, str]:
    """Three test images → `advcap caption --model RUN/hf`'s caption: the export's own generation settings
    (greedy, at most 32 new tokens), which a user of the export gets by default."""
    images = [run.parents[3] / "src" / "images" / f"{line['image_id']}.jpg"
              for line in by_split(evaluated["predictions"], "test")[:3]]
    captions = {image: caption_image(image, run / "hf") for image in images}
    clean = {line["image_id"]: line["captions"]["clean"] for line in evaluated["predictions"]}
    assert all(text == clean[image.stem] for image, text in captions.items())  # what the evaluation said too
    assert len(set(captions.values())) > 1  # captions depend on the image, so a caption of another image fails
    return captions


def test_the_readme_pipeline_snippet_captions_as_advcap_does(run, export_captions, capsys):
    """transformers 5's `image-text-to-text` pipeline (5.x removed `image-to-text`) loads the export (its
    processor_config.json names the processor) and, prompted with the start token, gives advcap's caption."""
    snippet = readme_snippet('pipeline("image-text-to-text"', run / "hf")
    for image, expected in export_captions.items():
        exec(snippet.replace('"photo.jpg"', repr(str(image))), {})
        assert capsys.readouterr().out == expected + "\n"


@pytest.mark.parametrize("version", sorted(transformers4.RELEASES))
def test_the_export_captions_in_transformers_4(run, export_captions, version, pytestconfig):
    """The export loads in transformers 4.x (a separate install, run in a subprocess): the model classes and
    the README's `image-to-text` pipeline snippet give advcap's captions."""
    target = transformers4.install(version, Path(pytestconfig.cache.mkdir("transformers4")))
    snippet = readme_snippet('pipeline("image-to-text"', run / "hf")
    out = transformers4.caption(target, run / "hf", snippet, list(export_captions), max_new_tokens=32)
    assert out["version"] == version  # the 4.x install was imported, not the venv's 5.x
    assert out["generate"] == list(export_captions.values())
    assert out["snippet"] == [text + "\n" for text in export_captions.values()]


def test_the_export_carries_a_model_card_with_the_evaluation(run, evaluated):
    card = (run / "hf" / "README.md").read_text()
    record = evaluated["record"]
    assert card.startswith("---\nlibrary_name: transformers\n") and "pipeline_tag: image-to-text" in card
    assert record["epsilon"]["text"] in card and "`baseline`: loss `clean`" in card
    assert f"{STEPS} steps of global batch 8" in card and "AutoModelForImageTextToText.from_pretrained" in card
    test = record["metrics"]["test"]
    assert "| BLEU-4 | " + " | ".join(f"{test[c]['bleu4']:.3f}" for c in ("clean", "fgsm", "pgd", "targeted",
                                                                          "transfer-fgsm", "blind")) + " |" in card


def test_python_m_advcap_is_the_cli():
    proc = subprocess.run([sys.executable, "-m", "advcap", "eval", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--select" in proc.stdout


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_ranks_give_the_same_metrics_and_predictions_as_one(run, evaluated, tmp_path):
    copy = copy_run(run, tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "SLURM_"))}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--num_cpu_threads_per_process", "1", "--main_process_port", str(_free_port()),
    ]
    proc = subprocess.run(
        [*launch, str(REPO / "launch" / "eval.py"), str(copy)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((copy / "metrics.json").read_text())
    assert info["metrics"] == evaluated["metrics"] and info["images"] == evaluated["record"]["images"]
    assert (copy / "predictions.jsonl").read_text() == evaluated["predictions_text"]
    assert info["world_size"] == 2
    # Both ranks did part of each split, and (no image twice, all images there) the parts are disjoint.
    assert info["images_per_rank"] == {"test": [4, 2], "train": [6, 4]}
    assert "BLEU-4" in proc.stdout and proc.stdout.count("BLEU-4") == 1  # the table, printed once
