"""Inference: loading, the generation engine and the chat session."""

from eagle_fast.inference.batch_engine import BatchEngine
from eagle_fast.inference.engine import Engine, GenerationConfig
from eagle_fast.inference.loading import load_model
from eagle_fast.inference.scheduler import EngineConfig
from eagle_fast.inference.session import ChatSession

__all__ = ["BatchEngine", "ChatSession", "Engine", "EngineConfig", "GenerationConfig", "load_model"]
