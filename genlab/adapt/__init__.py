"""Adapting trained models; supervised fine-tuning of a GPT is `model.sft: true` on chat data (`genlab.data.chat`)."""
