"""shortcut: HuggingFace causal LMs that get faster on what they have practised.

Usage::

    import shortcut
    model, tokenizer = shortcut.load_model("smollm2")
    handle = shortcut.wrap(model)
    ...
    handle.remove()
"""

from .api import Shortcut, load, wrap
from .arch import ArchSpec, UnsupportedArchitectureError, register_architecture, registered_model_types
from .config import FastConfig, LearningConfig, LosslessConfig, ShortcutConfig
from .decode.runtime import FixedPlan, LayerPolicy
from .models import load_model
from .skills.folder import SkillsMismatchError
from .skills.validate import SkillsFileError

__all__ = [
    "ArchSpec",
    "FastConfig",
    "FixedPlan",
    "LayerPolicy",
    "LearningConfig",
    "LosslessConfig",
    "Shortcut",
    "ShortcutConfig",
    "SkillsFileError",
    "SkillsMismatchError",
    "UnsupportedArchitectureError",
    "load",
    "load_model",
    "register_architecture",
    "registered_model_types",
    "wrap",
]
__version__ = "0.1.0"
