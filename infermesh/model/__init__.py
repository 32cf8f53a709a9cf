"""The finance sentiment model: LoRA fine-tuning, serving artifacts and evaluation."""
