"""How users reach the engine: the Python API (api.py), what it returns (outputs.py, with
incremental detokenization in detokenize.py), prompts to token ids (prompts.py), and the
OpenAI-compatible server (serving.py drives the engine for it, openai_api.py is the HTTP app)."""
