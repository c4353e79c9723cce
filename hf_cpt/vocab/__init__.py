"""Vocabulary extension: merging domain subwords into a tokenizer and initialising their embeddings."""
