"""jaxtp: tensor-parallel inference for Hugging Face decoder LLMs on JAX/XLA SPMD."""
from jaxtp import xla_flags

xla_flags.apply()  # before anything starts jax's backend
xla_flags.enable_compilation_cache()

from jaxtp.config import ModelConfig  # noqa: E402
from jaxtp.engine.sampling import SamplingParams  # noqa: E402
from jaxtp.entrypoints.api import LLM, Model, chat_prompt, generate, load, stream  # noqa: E402
from jaxtp.entrypoints.outputs import Completion, CompletionOutput, Delta, Logprob, RequestOutput  # noqa: E402

__all__ = ["LLM", "Completion", "CompletionOutput", "Delta", "Logprob", "Model", "ModelConfig",
           "RequestOutput", "SamplingParams", "chat_prompt", "generate", "load", "stream"]
__version__ = "0.1.0"
