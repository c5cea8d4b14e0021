"""CUDA graphs of dense blocks on compact batches: one graph per (block, bucketed batch size).

After its host synchronisation a sparse block runs a dense module on the compact batch of
its kept samples. Issued eagerly, that module costs a launch (and Python) per kernel, all
exposed right after the sync; replayed from a CUDA graph it costs one launch. Bucketing
(dynkernels.nn.bucket) bounds the batch sizes a block sees, so a block needs at most one
graph per bucket size, the way vLLM and SGLang serve varying batch sizes.

A GraphPool is shared by the blocks of one network: one CUDA memory pool for all their
graphs, one lock, and the largest compact batch that is replayed (larger ones run eagerly).
A graph is captured on the first call with a new input signature (rows, row shape, strides,
dtype of every input), or ahead of time (SkipBlock.capture_graphs and the models' own). Each
call copies the compact batch into the graph's static input, replays, and returns the
graph's static output, which the caller merges (scatter_rows / scatter_add_rows) before
releasing the lock: the next replay of that graph overwrites it.

Why sharing one pool is safe in any replay order: every graph keeps its static input and
output alive, so a later capture can reuse only memory that is dead outside a replay (an
earlier graph's intermediates). A static output may therefore lie in another graph's
intermediates, and that is safe because each output is read (merged) right after its replay,
before any other replay: replay and merge run under the pool's lock, and a replay on another
CUDA stream than the previous one first waits for that stream.

Inference only: a replay records no autograd history, and BatchNorm in training mode would
update its statistics from the capture's inputs. The owners check this before replaying (see
check_inference): module in eval mode, gradients off (torch.no_grad or torch.inference_mode),
CUDA tensors. Memory: each captured (block, size) holds its input and output, so at most
(sum of captured sizes) x 2 rows of the block's activations, plus the pool's intermediates.
A graph replays the parameters it was captured with: after moving the module (.to(), .cuda(),
.half(): the owners drop their graphs themselves) or replacing parameter tensors (e.g.
load_state_dict(assign=True)), call reset(). A graphed block must be a function of its input
tensors alone: a tensor handed to it any other way (an attribute set before each call, as
LC-Net's channel-gated branch takes its salience) is the one captured, on every replay.
"""
import threading
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .._layout import row_layout
from . import bucket as _bucket

WARMUP_CALLS = 2  # eager calls on a side stream before a capture (cuDNN's benchmark mode tunes then)

# One capture at a time in the process (CUDA graphs allow no concurrent captures), across pools.
_CAPTURE_LOCK = threading.Lock()


def check_inference(owner: str, training: bool, x: torch.Tensor) -> None:
    """Raise unless a forward of `owner` may replay CUDA graphs: eval mode, no autograd, CUDA x."""
    if training:
        raise RuntimeError(
            f"{owner}: cuda_graphs is for inference, but the module is in training mode; call .eval(), "
            "or set cuda_graphs=False"
        )
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{owner}: cuda_graphs is for inference: run the forward under torch.no_grad() or "
            "torch.inference_mode() (a replayed graph records no autograd history), or set cuda_graphs=False"
        )
    if x.device.type != "cuda":
        raise ValueError(f"{owner}: cuda_graphs needs CUDA tensors, got x on {x.device}; set cuda_graphs=False")


def check_graphs_arg(owner: str, cuda_graphs) -> Optional["GraphPool"]:
    """cuda_graphs as a pool: False/None -> None (eager), True -> a new GraphPool, a GraphPool -> itself."""
    if cuda_graphs is None or cuda_graphs is False:
        return None
    if cuda_graphs is True:
        return GraphPool()
    if isinstance(cuda_graphs, GraphPool):
        return cuda_graphs
    raise TypeError(f"{owner}: cuda_graphs must be a bool or a GraphPool, got {type(cuda_graphs).__name__}")


class _Graph:
    __slots__ = ("graph", "inputs", "output")

    def __init__(self, graph, inputs, output):
        self.graph, self.inputs, self.output = graph, inputs, output


class GraphPool:
    """CUDA graphs of the dense blocks of one network, sharing one memory pool and one lock.

    max_rows: compact batches of more rows than this run eagerly (None: every size is
    captured; with a bucket the sizes are bounded anyway). `lock`: held by the callers from
    `run` until they have issued the merge that reads its output. `len(pool)`: graphs
    captured. Copies (copy.deepcopy, pickling) start empty, with the same max_rows.
    """

    def __init__(self, max_rows: Optional[int] = None):
        if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1):
            raise ValueError(f"GraphPool: max_rows must be a positive int or None, got {max_rows!r}")
        self.max_rows = max_rows
        self.lock = threading.RLock()
        self._graphs: Dict[Tuple, _Graph] = {}
        self._handle = None
        self._last_stream = None

    def __len__(self) -> int:
        return len(self._graphs)

    def __getstate__(self):
        return {"max_rows": self.max_rows}

    def __setstate__(self, state):
        self.__init__(state["max_rows"])

    def reset(self) -> None:
        """Drop every graph (they are recaptured on their next use)."""
        with self.lock:
            self._graphs.clear()
            self._last_stream = None

    def forget(self, fn) -> None:
        """Drop the graphs of one callable (its module was moved or changed)."""
        with self.lock:
            for key in [k for k in self._graphs if k[0] is fn]:
                del self._graphs[key]

    def run(self, fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:
        """fn(*inputs) through its graph for this input signature (captured now if new), or
        eagerly above max_rows. The output of a replay is the graph's static output: read it
        before the lock is released."""
        if self.max_rows is not None and inputs[0].shape[0] > self.max_rows:
            return fn(*inputs)
        with self.lock:
            key = (fn,) + tuple((t.shape, t.stride(), t.dtype) for t in inputs)
            entry = self._graphs.get(key)
            if entry is None:
                entry = self._graphs[key] = self._capture(fn, inputs)
            self._follow_last_stream(inputs[0].device)
            for static, t in zip(entry.inputs, inputs):
                static.copy_(t)
            entry.graph.replay()
            return entry.output

    def _follow_last_stream(self, device) -> None:
        """Order this replay after the previous one of any graph of the pool: on another CUDA
        stream, the current stream first waits for the one that read the previous output."""
        stream = torch.cuda.current_stream(device)
        if self._last_stream is not None and stream != self._last_stream:
            stream.wait_stream(self._last_stream)
        self._last_stream = stream

    def capture(self, fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> None:
        """Capture fn's graph for this input signature ahead of its first use (the values of
        inputs do not matter)."""
        with self.lock:
            key = (fn,) + tuple((t.shape, t.stride(), t.dtype) for t in inputs)
            if key not in self._graphs:
                self._graphs[key] = self._capture(fn, inputs)

    def _capture(self, fn, inputs) -> _Graph:
        device = inputs[0].device
        # Static tensors are made outside inference mode, so that later calls under plain
        # no_grad can copy into them (inference tensors cannot be written outside it).
        with torch.inference_mode(False), torch.no_grad(), _CAPTURE_LOCK:
            static = tuple(torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device) for t in inputs)
            for s, t in zip(static, inputs):
                s.copy_(t)
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(WARMUP_CALLS):
                    fn(*static)
            torch.cuda.current_stream(device).wait_stream(side)
            if self._handle is None:
                self._handle = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, pool=self._handle, capture_error_mode="thread_local"):
                    out = fn(*static)
            except Exception as e:
                raise RuntimeError(
                    f"GraphPool: capturing the CUDA graph of {type(fn).__name__} on inputs "
                    f"{[tuple(t.shape) for t in inputs]} failed ({type(e).__name__}: {e}); a graphed block must be "
                    "capturable (no host synchronisation, CUDA tensors only): set cuda_graphs=False"
                ) from e
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"GraphPool: the captured block must return one tensor, got {type(out).__name__}")
        return _Graph(graph, static, out)


def graph_sizes(owner: str, bucket, capacity, n: int, device: torch.device, sizes, pool: GraphPool) -> List[int]:
    """The compact batch sizes to capture ahead of time for batches of n samples on device:
    `sizes`, or every size the bucket gives (the capacity, if one is set); those above the
    pool's max_rows left out."""
    if sizes is None:
        if capacity is not None:
            sizes = [capacity]
        else:
            sizes = _bucket.bucket_sizes(_bucket.resolve_bucket(bucket, device), n)
            if sizes is None:
                raise ValueError(f"{owner}: with exact counts (bucket=None) give the sizes to capture")
    sizes = [int(s) for s in sizes]
    if any(s < 1 or s > n for s in sizes):
        raise ValueError(f"{owner}: sizes must be in [1, {n}] (the batch size), got {sizes}")
    return [s for s in sizes if pool.max_rows is None or s <= pool.max_rows]


def compact_like(x: torch.Tensor, rows: int) -> torch.Tensor:
    """A zero compact batch of `rows` rows as gather_rows makes it from x (shape, dtype, layout)."""
    return x.new_zeros((rows,) + tuple(x.shape[1:])).contiguous(memory_format=row_layout(x))
