"""The proxy layer: the Ollama and OpenAI routes, their dialects, streaming and translation."""
