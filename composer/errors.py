"""Project exceptions. Every message names the offending thing (file, key, module, value)."""


class StudioError(Exception):
    """Base of every error the studio raises on purpose."""


class LoraFileError(StudioError):
    """A LoRA file cannot be read: truncated, corrupt, not safetensors, non-finite tensors."""


class PickleRefusedError(LoraFileError):
    """A pickle checkpoint (.ckpt, .pt, .bin, .pth) was offered; it is never unpickled."""


class UnknownKeysError(LoraFileError):
    """Keys in a LoRA file match no module of the target model."""

    def __init__(self, message: str, keys: list[str]):
        super().__init__(message)
        self.keys = keys


class FamilyMismatchError(StudioError):
    """A LoRA made for one base family (sd15, sdxl, flux) was applied to another."""


class OverBudgetError(StudioError):
    """A render job over a server's cost limit (pixels x steps x images): smaller, not later, is the fix."""


class BackboneError(StudioError):
    """A backbone cannot be loaded or built."""


class AdapterError(StudioError):
    """An adapter cannot be attached, activated or fused."""


class AdapterRuntimeError(AdapterError):
    """Adapters failed while their model ran: names them (resident names) and the module (component.path)."""

    def __init__(self, adapters: tuple[str, ...], module: str, cause: BaseException):
        line = first_line(cause)
        shown = ", ".join(repr(a) for a in adapters)
        super().__init__(f"adapter {shown} on module {module or '?'}: {line}")
        self.adapters = adapters
        self.module = module
        self.cause_line = line


def first_line(exc: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
