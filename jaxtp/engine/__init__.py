"""The engine: sequences (host state), the scheduler (what runs each step), the runner (the
jitted device programs over the KV cache) and the on-device sampler."""
from jaxtp.engine.runner import TRACES, ModelDef, StepConfig, split
from jaxtp.engine.scheduler import MAX_SLOTS, Engine, run, slots_that_fit
from jaxtp.engine.sequence import Sequence, Status

__all__ = ["MAX_SLOTS", "TRACES", "Engine", "ModelDef", "Sequence", "Status", "StepConfig", "run",
           "slots_that_fit", "split"]
