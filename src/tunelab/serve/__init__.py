"""`tunelab serve`: an OpenAI-compatible API over runs (app.py), with requests batched on the model
(engine.py). serve/cli.py imports fastapi only when the command runs, so the rest of the CLI works
without the `serve` extra."""
