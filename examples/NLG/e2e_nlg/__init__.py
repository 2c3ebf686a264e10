"""Shared pieces of the NLG example scripts (model, data, tokenizer, training helpers)."""
