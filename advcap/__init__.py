"""advcap: adversarially robust image captioning (ViT encoder + GPT-2 decoder) with in-step FGSM."""

__version__ = "0.1.0"
