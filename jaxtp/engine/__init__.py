"""The engine: sequences (host state), the scheduler (what runs each step), the block manager
(KV pages), the runner (the jitted device programs over the paged KV cache) and the on-device
sampler."""
from jaxtp.engine.runner import TRACES, ModelDef, StepConfig, split
from jaxtp.engine.scheduler import MAX_BATCHED_TOKENS, MAX_SLOTS, Engine, run
from jaxtp.engine.sequence import Sequence, Status

__all__ = ["MAX_BATCHED_TOKENS", "MAX_SLOTS", "TRACES", "Engine", "ModelDef", "Sequence", "Status",
           "StepConfig", "run", "split"]
