"""Hugging Face export: the self-contained model code (configuration_moc.py, modeling_moc.py,
copied into every export) and the converters around it (convert.py, tokenizer.py)."""
