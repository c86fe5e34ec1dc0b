"""An OpenAI-compatible HTTP API in front of a running Triton server (``python -m serving.openai_api``)."""
