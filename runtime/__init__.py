"""dgrun: a portable runtime for DiffusionGemma.

    import dgrun
    model = dgrun.load("model.dgf")
    print(model.generate("def fibonacci(n):").text)
"""

from dgrun._version import __version__
from dgrun.engine import GenerationOutput, Model, ModelBusyError, load
from dgrun.format import FormatError
from dgrun.rng import DefaultRng, ReplayRng, Rng

__all__ = [
    "__version__", "load", "Model", "GenerationOutput", "ModelBusyError", "FormatError",
    "Rng", "DefaultRng", "ReplayRng",
]
