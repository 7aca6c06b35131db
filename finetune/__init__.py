"""gpt2-finetune: fine-tune GPT-2 family language models."""

__version__ = "0.1.0"
