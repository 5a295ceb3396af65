"""The model zoo: architectures, data sets, training. Importing it registers every family."""

from . import alexnet, densenet, googlenet, lenet, mobilenet, resnet, vgg  # noqa: F401  (registration)
from .registry import (Classifier, ModelEntry, UnknownModelError, build_classifier, create_model,
                       default_spec, get_entry, list_models, spec_for)

__all__ = ["Classifier", "ModelEntry", "UnknownModelError", "build_classifier", "create_model",
           "default_spec", "get_entry", "list_models", "spec_for"]
