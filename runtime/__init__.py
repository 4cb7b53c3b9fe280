"""dgrun: a portable runtime for DiffusionGemma.

    import dgrun
    model = dgrun.load("model.dgf")
    print(model.generate("def fibonacci(n):").text)
"""

from dgrun._version import __version__
from dgrun.backends import BackendUnavailable
from dgrun.chat import ChatSession, ChatTemplate, ChatTemplateError
from dgrun.constrain import ConstraintError
from dgrun.engine import GenerationOutput, Model, ModelBusyError, default_model_path, load, shipped_models
from dgrun.format import FormatError
from dgrun.generate import Commit, Draft, Request
from dgrun.rng import DefaultRng, ReplayRng, Rng
from dgrun.scheduler import Handle, Scheduler
from dgrun.tokenizer import NoTokenizerError

__all__ = [
    "__version__", "load", "default_model_path", "shipped_models", "Model", "GenerationOutput", "ModelBusyError",
    "FormatError", "BackendUnavailable", "NoTokenizerError", "ChatSession", "ChatTemplate", "ChatTemplateError",
    "Draft", "Commit", "Rng", "DefaultRng", "ReplayRng", "Request", "Scheduler", "Handle", "ConstraintError",
]
