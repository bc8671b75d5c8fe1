"""Serving: `python -m serve`, `python -m serve.convert`, `python -m serve.chat`, and serve.background for tools."""
