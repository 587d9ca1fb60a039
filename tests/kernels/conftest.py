"""Triton kernel tests run on the CPU through Triton's interpreter."""

import os

# must be set before triton.jit decorates the kernels (at import of pdserve.kernels.triton_*)
os.environ.setdefault("TRITON_INTERPRET", "1")


def _patch_interpreter_index() -> None:
    """Triton 3.6's interpreter does int() on a 1-element array, which NumPy >= 2.4 refuses.

    Loop bounds loaded from memory (`range(start, end)`) hit it; `.item()` works on any NumPy.
    """
    try:
        import triton.runtime.interpreter as interpreter
    except ImportError:  # the tests skip themselves without triton
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None:
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._patch_lang_tensor = patched


_patch_interpreter_index()
