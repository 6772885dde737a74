"""Adapting trained models: supervised fine-tuning on chat conversations (`genlab.adapt.sft`)."""
