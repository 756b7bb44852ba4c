"""Exceptions raised by hf_moe_patch. Both subclass ValueError, as bad arguments do in torch."""


class UnsupportedModelError(ValueError):
    """The model's family has no adapter; the message names the supported ones."""


class InvalidOptionError(ValueError):
    """An unknown method, an unknown option, or an option value outside its valid range."""


class LayoutError(RuntimeError):
    """The batch layout of a forward (padding, sequence boundaries) could not be known for sure.

    Raised instead of routing with a guessed layout: usually a transformers release changed an
    internal the patch reads (the message names it).
    """
