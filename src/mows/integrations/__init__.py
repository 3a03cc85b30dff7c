"""Engine integrations: vLLM (``--load-format=mows``), SGLang, transformers.

Each depends only on ``mows.client`` and imports its engine lazily.
"""
