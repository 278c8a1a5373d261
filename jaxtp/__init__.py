"""jaxtp: tensor-parallel inference for Hugging Face decoder LLMs on JAX/XLA SPMD."""
from jaxtp import xla_flags

xla_flags.apply()  # before anything starts jax's backend

from jaxtp.api import LLM, Model, chat_prompt, generate, load, stream
from jaxtp.config import ModelConfig
from jaxtp.outputs import Completion, CompletionOutput, Delta, Logprob, RequestOutput
from jaxtp.sampling import SamplingParams

__all__ = ["LLM", "Completion", "CompletionOutput", "Delta", "Logprob", "Model", "ModelConfig",
           "RequestOutput", "SamplingParams", "chat_prompt", "generate", "load", "stream"]
__version__ = "0.1.0"
