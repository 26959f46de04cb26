"""
dsnot-modifier: DSnoT (Dynamic Sparse No Training) as an llm-compressor modifier.

Importing this package registers ``DSnoTModifier`` with llm-compressor's
``ModifierFactory``, so that YAML recipes find it by name.
"""

from llmcompressor.modifiers.factory import ModifierFactory

from dsnot_modifier.distributed import DSnoTDistributedError
from dsnot_modifier.modifier import DSnoTConfigError, DSnoTModifier
from dsnot_modifier.owl import OWLError
from dsnot_modifier.owl_modifier import OWLModifier
from dsnot_modifier.report import DSnoTReport, LayerReport

__all__ = ["DSnoTModifier", "DSnoTConfigError", "OWLModifier", "OWLError", "DSnoTDistributedError", "DSnoTReport", "LayerReport", "__version__"]

__version__ = "0.1.0"

ModifierFactory.register("DSnoTModifier", DSnoTModifier)
ModifierFactory.register("OWLModifier", OWLModifier)
