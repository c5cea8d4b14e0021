"""Triton kernels (optional: imported only when backend="triton" is used).

Each kernel is exposed with torch.library.triton_op so torch.compile can trace into it.
On a machine without a GPU they run on CPU tensors under TRITON_INTERPRET=1, which must be
set before this package is imported.
"""
from torch.library import wrap_triton as _torch_wrap_triton
from triton.runtime.interpreter import InterpretedFunction


def wrap_triton(kernel):
    """torch.library.wrap_triton (a kernel launch that torch.compile and make_fx can trace),
    except that a kernel of the interpreter is launched as it is: under TRITON_INTERPRET=1
    @triton.jit gives an InterpretedFunction, which torch 2.11 refuses ("wrap_triton only works
    on functions annotated with triton.jit") and torch 2.13 and later pass through unwrapped."""
    return kernel if isinstance(kernel, InterpretedFunction) else _torch_wrap_triton(kernel)
