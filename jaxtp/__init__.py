"""jaxtp: tensor-parallel inference for Hugging Face decoder LLMs on JAX/XLA SPMD."""
from jaxtp.api import LLM, Completion, CompletionOutput, Model, RequestOutput, generate, load
from jaxtp.config import ModelConfig
from jaxtp.sampling import SamplingParams

__all__ = ["LLM", "Completion", "CompletionOutput", "Model", "ModelConfig", "RequestOutput",
           "SamplingParams", "generate", "load"]
__version__ = "0.1.0"
