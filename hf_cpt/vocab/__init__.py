"""Vocabulary extension: merging domain subwords into a tokenizer and initialising their embeddings.

`learn_domain_tokens` (tokens.py) -> `extend_model` (extend.py) with an initialiser from `EMBEDDING_INITS`
(init.py); OFA's external word vectors come from vectors.py, Token Distillation (`distill`) lives in
distill.py. See docs/vocab.md.
"""
