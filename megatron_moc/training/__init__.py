"""Pretraining: data, tokenizer, engine setup, checkpoints, logging."""
