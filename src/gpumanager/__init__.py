"""gpumanager: a streaming OpenAI/Ollama proxy that wakes GPU hosts on demand and pauses them when idle."""

__version__ = "0.1.0"
