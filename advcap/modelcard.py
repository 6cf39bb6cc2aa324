"""The model card of a run's `hf/` export (`hf/README.md`): what the model is, how it was trained and, once
evaluated, how it scores clean and attacked. Written by training with the export, and again by evaluation
with the metrics; it reads only the run's own records (config, provenance, the metrics record)."""

from __future__ import annotations

from typing import Any, Optional

from advcap import __version__
from advcap.config import config_to_dict, epsilon_text

CARD = "README.md"
SHOWN = ("clean", "fgsm", "pgd", "targeted", "transfer-fgsm", "blind")


def model_card(cfg: Any, provenance: Optional[dict], record: Optional[dict] = None) -> str:
    """Markdown with YAML front matter (the HuggingFace model-card format)."""
    model = config_to_dict(cfg)["model"]
    base = model.get("init_from") or (f"{model.get('encoder')} + {model.get('decoder')}" if model.get("encoder")
                                      else f"preset {model.get('preset')}")
    prov = provenance or {}
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: image-to-text",
        "tags: [image-captioning, adversarial-training, advcap]",
        "---",
        "",
        f"# {cfg.run.dataset} / {cfg.run.phase} / seed {cfg.train.seed}",
        "",
        "A ViT encoder + GPT-2 decoder captioner (`VisionEncoderDecoderModel`) trained with advcap "
        f"{__version__} to stay correct under adversarial attack.",
        "",
        f"- **Started from**: {base}",
        f"- **Data**: {cfg.data.shards} ({cfg.run.dataset}), images {cfg.data.image_size} px",
        f"- **Phase**: `{cfg.run.phase}`: loss `{cfg.train.mode}`, frozen modules {list(cfg.freeze.modules) or 'none'}",
        f"- **Attack in training**: FGSM{' from a random start' if cfg.attack.random_start else ''}, "
        f"{epsilon_text(cfg.attack.epsilon)}",
        f"- **Training**: {prov.get('steps_trained', cfg.train.steps)} steps of global batch {cfg.train.global_batch_size}, "
        f"lr {cfg.train.lr}, seed {cfg.train.seed}, {prov.get('world_size', '?')} rank(s)",
        f"- **Command**: `{prov.get('command') or 'not recorded'}`",
        "",
        "```python",
        "from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer",
        "from PIL import Image",
        "",
        "model, processor, tokenizer = (AutoModelForImageTextToText.from_pretrained(HF_DIR),",
        "                               AutoImageProcessor.from_pretrained(HF_DIR), AutoTokenizer.from_pretrained(HF_DIR))",
        "ids = model.generate(**processor(Image.open('photo.jpg').convert('RGB'), return_tensors='pt'), max_new_tokens=32)",
        "print(tokenizer.decode(ids[0], skip_special_tokens=True))",
        "```",
        "",
    ]
    lines += _metrics_section(record)
    return "\n".join(lines) + "\n"


def _metrics_section(record: Optional[dict]) -> list[str]:
    if not record:
        return ["## Evaluation", "", "Not evaluated yet (`advcap eval RUN` writes the scores here)."]
    metrics = record["metrics"]
    out = ["## Evaluation", "",
           f"BLEU-4 is the paper's (nltk corpus BLEU, lower-cased [a-z0-9]+ words); CIDEr is CIDEr-D ×100 "
           f"(pycocoevalcap). Attacks at {record.get('epsilon', {}).get('text', 'the training ε')}.", ""]
    for split, by_condition in metrics.items():
        shown = [c for c in SHOWN if c in by_condition]
        out += [f"**{split}** ({next(iter(by_condition.values())).get('images', '?')} images)", "",
                "| | " + " | ".join(shown) + " |", "|---|" + "---|" * len(shown)]
        out.append("| BLEU-4 | " + " | ".join(f"{by_condition[c]['bleu4']:.3f}" for c in shown) + " |")
        if all(isinstance(by_condition[c].get("cider"), (int, float)) for c in shown):
            out.append("| CIDEr | " + " | ".join(f"{100 * by_condition[c]['cider']:.1f}" for c in shown) + " |")
        out.append("")
    return out
