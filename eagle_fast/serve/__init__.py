"""OpenAI-compatible HTTP server and chat page: `python -m eagle_fast.serve --model PATH`."""

from eagle_fast.serve.config import ServeConfig


def create_app(config: ServeConfig, model=None, tokenizer=None, processor=None):
    """See eagle_fast.serve.app.create_app (imported here lazily: FastAPI is an optional dependency)."""
    from eagle_fast.serve.app import create_app as _create

    return _create(config, model=model, tokenizer=tokenizer, processor=processor)


__all__ = ["ServeConfig", "create_app"]
