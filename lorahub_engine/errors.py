"""Every error the engine raises about adapters, zoos and their fit to a model. All derive from AdapterError."""


class AdapterError(Exception):
    """Base class of every error about adapters and zoos."""


class AdapterFileError(AdapterError):
    """A file or folder is missing, unreadable, truncated or in a format we refuse (pickle)."""


class AdapterFormatError(AdapterError):
    """The files read, but their content is inconsistent: unknown keys, shapes that do not chain, bad config."""


class UnsupportedFeatureError(AdapterError):
    """The adapter uses a PEFT feature this engine does not implement (DoRA, lora_bias, embedding LoRA, ...)."""


class NonFiniteError(AdapterError):
    """A weight holds NaN or inf."""


class IncompatibleModelError(AdapterError):
    """The adapter does not fit the model: unknown target modules, wrong shapes, another base model."""


class MergeError(AdapterError):
    """A merge request is invalid: empty list, weights of the wrong length, unknown method or option."""


class OutputError(AdapterError):
    """An output cannot be written: the file system refused (permissions, space, a file where a folder is needed)."""


class OutputExistsError(OutputError):
    """The output path holds something that is not an earlier output of that kind; overwrite=True replaces it."""
