"""Triton kernels (optional: imported only when backend="triton" is used).

Each kernel is exposed with torch.library.triton_op so torch.compile can trace into it.
On a machine without a GPU they run on CPU tensors under TRITON_INTERPRET=1, which must be
set before this package is imported.
"""
import numpy as np
import triton
from torch.library import wrap_triton as _torch_wrap_triton
from triton.runtime import interpreter as _interpreter
from triton.runtime.interpreter import InterpretedFunction

from .._extension import triton_interpret


def wrap_triton(kernel):
    """torch.library.wrap_triton (a kernel launch that torch.compile and make_fx can trace),
    except that a kernel of the interpreter is launched as it is: under TRITON_INTERPRET=1
    @triton.jit gives an InterpretedFunction, which torch 2.11 refuses ("wrap_triton only works
    on functions annotated with triton.jit") and torch 2.13 and later pass through unwrapped."""
    return kernel if isinstance(kernel, InterpretedFunction) else _torch_wrap_triton(kernel)


def _major_minor(version: str) -> tuple:
    return tuple(int(part) for part in version.split(".")[:2])


def _squeeze_interpreter_indices() -> None:
    """Triton 3.6's interpreter holds a scalar kernel argument as a one-element 1-D array and
    takes its index (a runtime loop bound, `range(0, N, BLOCK)`) with int() of that array,
    which numpy 2.4 made an error ("only 0-dimensional arrays can be converted to Python
    scalars"); Triton 3.7 squeezes the array first. With Triton before 3.7 and numpy 2.4 or
    later, the interpreter's patch of tl.tensor gets the same squeeze, for the launches it
    patches (it restores the original after each). Compiled kernels never take this path."""
    patch_tensor = _interpreter._patch_lang_tensor

    def patch_tensor_squeezed(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    _interpreter._patch_lang_tensor = patch_tensor_squeezed


if triton_interpret() and _major_minor(triton.__version__) < (3, 7) and _major_minor(np.__version__) >= (2, 4):
    _squeeze_interpreter_indices()
