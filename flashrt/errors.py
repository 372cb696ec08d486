"""Errors FlashRT raises on purpose. Each names what is wrong; the runtime maps them to error codes."""


class FlashRTError(Exception):
    """Base class: an expected failure with a message meant for the user."""

    code = "error"


class ConfigError(FlashRTError):
    """A config file or object is invalid: the message names the file, the key and what was expected."""

    code = "bad_config"


class CheckpointError(FlashRTError):
    """A checkpoint cannot be found, fetched or mapped onto the model (names the key and the shapes)."""

    code = "bad_checkpoint"


class InputError(FlashRTError):
    """An observation does not match the policy's spec (names the field and what was expected)."""

    code = "bad_input"


class PlatformError(FlashRTError):
    """The requested precision or backend is not supported on this platform."""

    code = "unsupported"


class AccuracyError(FlashRTError):
    """A quantized engine strays too far from its bf16 reference (the message has the figures)."""

    code = "accuracy"
