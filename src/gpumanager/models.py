"""Model-name rules, shared by every layer: how a requested name matches the names hosts list.

Ollama adds `:latest` to an untagged name (`llama3` == `llama3:latest`); names that are not Ollama
names (Hugging Face ids such as `org/Model-7B` on an OpenAI-compatible upstream) stay as they are.
"""

from __future__ import annotations


def model_names(name: str) -> tuple[str, ...]:
    """The names a requested model may be listed under: the exact name first, then with `:latest`
    when the name has no tag."""
    last = name.rsplit("/", 1)[-1]
    return (name,) if ":" in last else (name, name + ":latest")


def listed_name(models: frozenset[str], model: str) -> str:
    """The name a host lists for `model` (an OpenAI-compatible server knows no `:latest` shorthand)."""
    return next((name for name in model_names(model) if name in models), model)
