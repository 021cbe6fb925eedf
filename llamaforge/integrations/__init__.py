"""Integrations of llamaforge models into other libraries (spaCy and spacy-llm).

Nothing here is imported by `import llamaforge`; each integration imports its library only when
its own module is imported:

- `llamaforge.integrations.spacy`: the spacy-llm model `llamaforge.Llama.v1` and the spaCy
  component `llamaforge_vectors` (both also found by spaCy through entry points).
- `llamaforge.integrations.models`: the per-process cache of loaded models they share (no spaCy).
"""
