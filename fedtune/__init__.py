"""fedtune: federated 4-bit LoRA instruction tuning of LLMs on a real Flower deployment."""

__version__ = "0.1.0"
