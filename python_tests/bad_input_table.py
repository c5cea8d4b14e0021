"""What every public entry point does with bad input: the table docs/errors.md is rendered from.

Each row: the entry point, the kind of bad input, a call that makes it, and the exception
(type and the start of its message) that the call raises. test_bad_input.py runs every row
and checks that docs/errors.md is this table rendered (`python python_tests/bad_input_table.py`
rewrites it).
"""
import os
import sys
from typing import Callable, NamedTuple

import torch
import torch.nn as nn

import dynkernels
from dynkernels import nn as dnn
from dynkernels import reference

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "errors.md")


class Row(NamedTuple):
    entry: str  # the public entry point
    bad: str  # the kind of bad input
    call: Callable[[], object]
    exc: type
    message: str  # how the message starts


def _inputs():
    """Small valid inputs the rows spoil one at a time."""
    x = torch.randn(5, 3)
    idx, count = reference.compact(torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0]))
    return x, idx, count


def _conv_kwargs(**change):
    kw = dict(x=torch.randn(2, 3, 6, 6), weight=torch.randn(4, 3, 3, 3), bias=torch.randn(4), out_gate=torch.ones(2, 4),
              in_gate=torch.ones(2, 3), stride=1, padding=1, dilation=1)
    kw.update(change)
    return kw


def _conv(**change):
    kw = _conv_kwargs(**change)
    return dynkernels.channel_sparse_conv2d(**kw)


def _bn_block(c=4):
    return nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c))


def _skip_forward(x, gate, **kw):
    return dnn.SkipBlock(nn.Conv2d(3, 3, 3, padding=1), **kw)(x, gate)


def _route_forward(x, choice, branches=None, **kw):
    branches = branches or [nn.Identity(), nn.Identity()]
    return dnn.RouteBlock(branches, **kw)(x, choice)


def _early_exit(threshold=0.5, stages=2, exits=2, controllers=None, **kw):
    return dnn.EarlyExit([nn.Identity()] * stages, [nn.Flatten()] * exits, threshold, controllers=controllers, **kw)


def _no_grad(module, *args):
    with torch.no_grad():
        return module(*args)


def rows():
    """Every row of the table, in the order of the document."""
    dk = dynkernels
    x, idx, count = _inputs()
    i64 = idx.long()
    out_of_range = torch.tensor([0, 5, 1, 2, 3], dtype=torch.int32)
    negative = torch.tensor([0, -1, 1, 2, 3], dtype=torch.int32)
    repeated = torch.tensor([1, 1, 0, 2, 3], dtype=torch.int32)
    meta = torch.empty(5, 3, device="meta")
    img = torch.randn(2, 3, 8, 8)
    from dynkernels import models
    from dynkernels.models import adashare, arnet, convnet_aig, d2nn, fbs, lcnet, msdnet, skipnet, spottune

    R = Row
    return [
        # ------------------------------------------------------------------ ops
        R("compact", "gate not a tensor", lambda: dk.compact([1.0, 0.0]), TypeError, 'compact: gate must be a torch.Tensor'),
        R("compact", "gate of rank 3", lambda: dk.compact(torch.zeros(2, 2, 2)), ValueError, 'compact: gate must be [N] or [B, N]'),
        R("compact", "gate of an integer dtype", lambda: dk.compact(torch.zeros(3, dtype=torch.int32)), TypeError, 'compact: gate must be a floating or bool tensor'),
        R("compact", "threshold not a number", lambda: dk.compact(torch.ones(3), "0.5"), TypeError, 'compact: threshold must be a real number'),
        R("compact", "bad backend name", lambda: dk.compact(torch.ones(3), backend="cudnn"), ValueError, "compact: backend must be one of ('auto', 'cuda', 'cpu', 'triton', 'torch')"),
        R("compact", "backend 'cuda' on CPU tensors", lambda: dk.compact(torch.ones(3), backend="cuda"), ValueError, "compact: backend='cuda' needs CUDA tensors"),
        R("route", "choice of rank 3", lambda: dk.route(torch.zeros(2, 2, 2, dtype=torch.int64), 2), ValueError, 'route: choice must be [N] or [R, N]'),
        R("route", "choice of a floating dtype", lambda: dk.route(torch.zeros(3), 2), TypeError, 'route: choice must be an integer tensor (uint8, int8, int16, int32, int64)'),
        R("route", "num_branches zero", lambda: dk.route(torch.zeros(3, dtype=torch.int64), 0), ValueError, 'route: num_branches must be an int in [1, 2^31 - 2]'),
        R("route", "num_branches not an int", lambda: dk.route(torch.zeros(3, dtype=torch.int64), 2.0), ValueError, 'route: num_branches must be an int in [1, 2^31 - 2]'),
        R("route", "choice out of range", lambda: dk.route(torch.tensor([0, 2, 1]), 2), IndexError, 'route: choice[1] = 2 is out of range for 2 branches'),
        R("route", "negative choice", lambda: dk.route(torch.tensor([0, -1, 1]), 2), IndexError, 'route: choice[1] = -1 is out of range for 2 branches'),
        R("route", "bad backend name", lambda: dk.route(torch.tensor([0, 1]), 2, backend="cudnn"), ValueError, "route: backend must be one of ('auto', 'cuda', 'cpu', 'triton', 'torch')"),
        R("gather_rows", "x not a tensor", lambda: dk.gather_rows(x.tolist(), idx, count), TypeError, 'gather_rows: x must be a torch.Tensor'),
        R("gather_rows", "x 0-d", lambda: dk.gather_rows(torch.tensor(1.0), idx, count), ValueError, 'gather_rows: x must have at least one dimension (the rows)'),
        R("gather_rows", "idx of rank 2", lambda: dk.gather_rows(x, idx.view(1, 5), count), ValueError, 'gather_rows: idx must be a 1-D tensor'),
        R("gather_rows", "idx int64", lambda: dk.gather_rows(x, i64, count), TypeError, 'gather_rows: idx must be int32 (as dynkernels.compact returns)'),
        R("gather_rows", "count float", lambda: dk.gather_rows(x, idx, count.float()), TypeError, 'gather_rows: count must be an int32 tensor with one element'),
        R("gather_rows", "count with two elements", lambda: dk.gather_rows(x, idx, torch.tensor([1, 2], dtype=torch.int32)), TypeError, 'gather_rows: count must be an int32 tensor with one element'),
        R("gather_rows", "idx out of range", lambda: dk.gather_rows(x, out_of_range, count), IndexError, 'gather_rows: idx[1] = 5 is out of range for x with 5 rows'),
        R("gather_rows", "negative idx", lambda: dk.gather_rows(x, negative, count), IndexError, 'gather_rows: idx[1] = -1 is out of range for x with 5 rows'),
        R("gather_rows", "idx out of range (C++ kernel)", lambda: dk.gather_rows(x, out_of_range, count, backend="cpu"), IndexError, 'gather_rows: idx[1] = 5 is out of range for x with 5 rows'),
        R("gather_rows", "negative capacity", lambda: dk.gather_rows(x, idx, count, -1), ValueError, 'gather_rows: capacity must be a non-negative int'),
        R("gather_rows", "capacity not an int", lambda: dk.gather_rows(x, idx, count, 2.5), ValueError, 'gather_rows: capacity must be a non-negative int'),
        R("gather_rows", "idx on another device", lambda: dk.gather_rows(meta, idx, count), ValueError, 'gather_rows: idx is on cpu but x is on meta; they must be on one device'),
        R("gather_rows", "bad backend name", lambda: dk.gather_rows(x, idx, count, backend="cudnn"), ValueError, "gather_rows: backend must be one of ('auto', 'cuda', 'cpu', 'triton', 'torch')"),
        R("scatter_add_rows", "base of an integer dtype", lambda: dk.scatter_add_rows(x.int(), x.int(), idx, count), TypeError, 'scatter_add_rows: base must be a floating tensor (float16, bfloat16, float32, float64)'),
        R("scatter_add_rows", "y of another row shape", lambda: dk.scatter_add_rows(x, torch.randn(3, 4), idx, count), ValueError, "scatter_add_rows: y must be [capacity, 3] like base's rows"),
        R("scatter_add_rows", "y of another dtype", lambda: dk.scatter_add_rows(x, x.double(), idx, count), TypeError, "scatter_add_rows: y must have base's dtype torch.float32"),
        R("scatter_add_rows", "y on another device", lambda: dk.scatter_add_rows(x, meta, idx, count), ValueError, 'scatter_add_rows: y is on meta but base is on cpu; they must be on one device'),
        R("scatter_add_rows", "idx out of range", lambda: dk.scatter_add_rows(x, x, out_of_range, count), IndexError, 'scatter_add_rows: idx[1] = 5 is out of range for base with 5 rows'),
        R("scatter_add_rows", "idx repeats a row", lambda: dk.scatter_add_rows(x, x, repeated, count), RuntimeError, 'scatter_add_rows: idx repeats row 1 among its first count entries; rows must be distinct'),
        R("scatter_add_rows", "scale of another length", lambda: dk.scatter_add_rows(x, x, idx, count, torch.rand(4)), ValueError, 'scatter_add_rows: scale has 4 entries but base has 5 rows; they must match'),
        R("scatter_add_rows", "scale of rank 2", lambda: dk.scatter_add_rows(x, x, idx, count, torch.rand(5, 1)), ValueError, 'scatter_add_rows: scale must be a 1-D tensor [N]'),
        R("scatter_add_rows", "scale of an integer dtype", lambda: dk.scatter_add_rows(x, x, idx, count, torch.ones(5, dtype=torch.int32)), TypeError, 'scatter_add_rows: scale must be a floating tensor (float16, bfloat16, float32, float64)'),
        R("scatter_rows", "base 0-d", lambda: dk.scatter_rows(torch.tensor(1.0), x, idx, count), ValueError, 'scatter_rows: base must have at least one dimension (the rows)'),
        R("scatter_rows", "idx not of base's length", lambda: dk.scatter_rows(torch.randn(4, 3), x, idx, count), ValueError, 'scatter_rows: idx has 5 entries but base has 4 rows; they must match'),
        R("scatter_rows", "idx not a permutation", lambda: dk.scatter_rows(x, x, repeated, count), ValueError, "scatter_rows: idx lists row 1 more than once; idx must be a permutation of base's 5 rows"),
        R("scatter_rows", "idx out of range", lambda: dk.scatter_rows(x, x, out_of_range, count), IndexError, 'scatter_rows: idx[1] = 5 is out of range for base with 5 rows'),
        R("scatter_rows", "y of another dtype", lambda: dk.scatter_rows(x, x.double(), idx, count), TypeError, "scatter_rows: y must have base's dtype torch.float32"),
        R("scatter_rows_", "base not contiguous", lambda: dk.scatter_rows_(x.t().contiguous().t(), x, idx, count), ValueError, 'scatter_rows_: base is written in place, so it must be contiguous (or channels_last)'),
        R("scatter_rows_", "idx repeats a row", lambda: dk.scatter_rows_(x.clone(), x, repeated, count), ValueError, 'scatter_rows_: the first count entries of idx list row 1 more than once; they must be distinct'),
        R("scatter_rows_", "idx out of range", lambda: dk.scatter_rows_(x[:3].clone(), x, idx, count), IndexError, 'scatter_rows_: idx[2] = 3 is out of range for base with 3 rows'),
        R("channel_sparse_conv2d", "x not a tensor", lambda: _conv(x=[1.0]), TypeError, 'channel_sparse_conv2d: x must be a torch.Tensor'),
        R("channel_sparse_conv2d", "x of rank 3", lambda: _conv(x=torch.randn(3, 6, 6)), ValueError, 'channel_sparse_conv2d: x must be [N, Cin, H, W]'),
        R("channel_sparse_conv2d", "x of an integer dtype", lambda: _conv(x=torch.ones(2, 3, 6, 6, dtype=torch.int64)), TypeError, 'channel_sparse_conv2d: x must be a floating tensor (float16, bfloat16, float32, float64)'),
        R("channel_sparse_conv2d", "weight of another dtype", lambda: _conv(weight=torch.randn(4, 3, 3, 3).double()), TypeError, "channel_sparse_conv2d: weight must have x's dtype torch.float32"),
        R("channel_sparse_conv2d", "weight of another Cin (groups)", lambda: _conv(weight=torch.randn(4, 1, 3, 3)), ValueError, 'channel_sparse_conv2d: weight has 1 input channels but x has 3 (groups > 1 is not supported)'),
        R("channel_sparse_conv2d", "weight on another device", lambda: _conv(weight=torch.empty(4, 3, 3, 3, device="meta")), ValueError, 'channel_sparse_conv2d: weight is on meta but x is on cpu; they must be on one device'),
        R("channel_sparse_conv2d", "bias of another length", lambda: _conv(bias=torch.randn(5)), ValueError, 'channel_sparse_conv2d: bias has 5 entries but weight has 4 output channels'),
        R("channel_sparse_conv2d", "out_gate of another shape", lambda: _conv(out_gate=torch.ones(2, 5)), ValueError, 'channel_sparse_conv2d: out_gate must be [N, Cout] = [2, 4]'),
        R("channel_sparse_conv2d", "out_gate of an integer dtype", lambda: _conv(out_gate=torch.ones(2, 4, dtype=torch.int32)), TypeError, 'channel_sparse_conv2d: out_gate must be a floating or bool tensor'),
        R("channel_sparse_conv2d", "in_gate of another shape", lambda: _conv(in_gate=torch.ones(3, 3)), ValueError, 'channel_sparse_conv2d: in_gate must be [N, Cin] = [2, 3]'),
        R("channel_sparse_conv2d", "stride zero", lambda: _conv(stride=0), ValueError, 'channel_sparse_conv2d: stride must be an int or a pair of ints >= 1'),
        R("channel_sparse_conv2d", "negative padding", lambda: _conv(padding=-1), ValueError, 'channel_sparse_conv2d: padding must be an int or a pair of ints >= 0'),
        R("channel_sparse_conv2d", "dilation of three values", lambda: _conv(dilation=(1, 1, 1)), ValueError, 'channel_sparse_conv2d: dilation must be an int or a pair of ints >= 1'),
        R("channel_sparse_conv2d", "kernel larger than the padded input", lambda: _conv(weight=torch.randn(4, 3, 9, 9), padding=0), ValueError, 'channel_sparse_conv2d: the kernel (9x9, dilation (1, 1)) is larger than the padded input'),
        R("channel_sparse_conv2d", "shift of another length", lambda: _conv(shift=torch.randn(5)), ValueError, 'channel_sparse_conv2d: shift has 5 entries but weight has 4 output channels'),
        R("channel_sparse_conv2d", "density out of [0, 1]", lambda: _conv(density=1.5), ValueError, 'channel_sparse_conv2d: density must be None or a number in [0, 1]'),
        R("channel_sparse_conv2d", "NaN density", lambda: _conv(density=float("nan")), ValueError, "channel_sparse_conv2d: density must be None or a number in [0, 1]"),
        R("channel_sparse_conv2d", "config below -1", lambda: _conv(config=-2), ValueError, "channel_sparse_conv2d: config must be -1 (the CUDA kernel's own choice) or a tile configuration id >= 0"),
        R("channel_sparse_conv2d", "bad backend name", lambda: _conv(backend="cudnn"), ValueError, "channel_sparse_conv2d: backend must be one of ('auto', 'cuda', 'cpu', 'triton', 'torch')"),
        R("channel_sparse_conv2d", "backend 'cuda' on CPU tensors", lambda: _conv(backend="cuda"), ValueError, "channel_sparse_conv2d: backend='cuda' needs CUDA tensors"),
        # ------------------------------------------------------------------ modules
        R("GatedConv2d", "bad backend name", lambda: dnn.GatedConv2d(3, 4, 3, backend="cudnn"), ValueError, "GatedConv2d: backend must be one of ('auto', 'cuda', 'cpu', 'triton', 'torch')"),
        R("GatedConv2d", "density out of [0, 1]", lambda: dnn.GatedConv2d(3, 4, 3, density=2), ValueError, 'GatedConv2d: density must be None or a number in [0, 1]'),
        R("GatedConv2d", "groups > 1 in the gated forward", lambda: dnn.GatedConv2d(4, 4, 3, groups=2)(torch.randn(1, 4, 5, 5), torch.ones(1, 4)), ValueError, 'GatedConv2d: the gated forward needs groups=1, this module has groups=2'),
        R("GatedConv2d", "padding_mode other than 'zeros'", lambda: dnn.GatedConv2d(3, 4, 3, padding=1, padding_mode="reflect")(img, torch.ones(2, 4)), ValueError, "GatedConv2d: the gated forward needs padding_mode='zeros', this module has 'reflect'"),
        R("GatedConv2d", "padding='same' with an even kernel", lambda: dnn.GatedConv2d(3, 4, 2, padding="same")(img, torch.ones(2, 4)), ValueError, "GatedConv2d: padding='same' with an even kernel extent pads asymmetrically"),
        R("GatedConv2d", "in_gate without gate", lambda: dnn.GatedConv2d(3, 4, 3)(img, None, torch.ones(2, 3)), ValueError, 'GatedConv2d: in_gate was given without gate (the output gate [N, Cout])'),
        R("GatedConv2d", "gate of another shape", lambda: dnn.GatedConv2d(3, 4, 3)(img, torch.ones(2, 5)), ValueError, 'channel_sparse_conv2d: out_gate must be [N, Cout] = [2, 4]'),
        R("GatedConv2d.from_conv", "conv not an nn.Conv2d", lambda: dnn.GatedConv2d.from_conv(nn.Linear(3, 4)), TypeError, 'GatedConv2d.from_conv: conv must be an nn.Conv2d'),
        R("convert", "bad backend name", lambda: dnn.convert(nn.Conv2d(3, 4, 3), backend="cudnn"), ValueError, "convert: backend must be one of ('auto', 'cuda', 'cpu', 'triton', 'torch')"),
        R("FBSConv2d", "density zero", lambda: dnn.FBSConv2d(3, 4, 3, density=0), ValueError, 'FBSConv2d: density must be in (0, 1]'),
        R("FBSConv2d", "bad execution string", lambda: dnn.FBSConv2d(3, 4, 3, execution="fast"), ValueError, "FBSConv2d: execution must be one of ('masked', 'sparse')"),
        R("FBSConv2d", "bad backend name", lambda: dnn.FBSConv2d(3, 4, 3, backend="cudnn"), ValueError, "FBSConv2d: backend must be one of ('auto', 'cuda', 'cpu', 'triton', 'torch')"),
        R("FBSConv2d", "x with another channel count", lambda: dnn.FBSConv2d(4, 4, 3)(img), ValueError, 'FBSConv2d: x must be [N, 4, H, W]'),
        R("FBSConv2d", "in_gate of another shape", lambda: dnn.FBSConv2d(3, 4, 3)(img, torch.ones(2, 4)), ValueError, 'FBSConv2d: in_gate must be [N, Cin] = [2, 3]'),
        R("fbs_convert", "density out of (0, 1]", lambda: dnn.fbs_convert(_bn_block(), 1.5), ValueError, 'fbs_convert: density must be in (0, 1]'),
        R("fbs_convert", "bad execution string", lambda: dnn.fbs_convert(_bn_block(), 0.5, execution="fast"), ValueError, "fbs_convert: execution must be one of ('masked', 'sparse')"),
        R("fbs_convert", "model without Conv2d + BatchNorm2d", lambda: dnn.fbs_convert(nn.Conv2d(3, 3, 3), 0.5), ValueError, 'fbs_convert: the model has no Conv2d followed by a BatchNorm2d over its outputs'),
        R("fbs_convert", "model not an nn.Module", lambda: dnn.fbs_convert("resnet", 0.5), TypeError, 'fbs_convert: model must be an nn.Module'),
        R("SkipBlock", "block not an nn.Module", lambda: dnn.SkipBlock(lambda t: t), TypeError, 'SkipBlock: block must be an nn.Module'),
        R("SkipBlock", "bad execution string", lambda: dnn.SkipBlock(nn.Identity(), execution="fast"), ValueError, "SkipBlock: execution must be one of ('masked', 'sparse')"),
        R("SkipBlock", "bad backend name", lambda: dnn.SkipBlock(nn.Identity(), backend="cudnn"), ValueError, "SkipBlock: backend must be one of ('auto', 'cuda', 'cpu', 'triton', 'torch')"),
        R("SkipBlock", "negative capacity", lambda: dnn.SkipBlock(nn.Identity(), capacity=-1), ValueError, 'SkipBlock: capacity must be a non-negative int'),
        R("SkipBlock", "bucket zero", lambda: dnn.SkipBlock(nn.Identity(), bucket=0), ValueError, 'SkipBlock: bucket must be a positive int step'),
        R("SkipBlock", "bucket sizes not increasing", lambda: dnn.SkipBlock(nn.Identity(), bucket=[4, 2]), ValueError, 'SkipBlock: bucket must be a strictly increasing list of positive ints'),
        R("SkipBlock", "both capacity and bucket", lambda: dnn.SkipBlock(nn.Identity(), capacity=2, bucket=4), ValueError, 'SkipBlock: give capacity (one fixed size, no host sync) or bucket'),
        R("SkipBlock", "cuda_graphs not a bool or GraphPool", lambda: dnn.SkipBlock(nn.Identity(), cuda_graphs="yes"), TypeError, 'SkipBlock: cuda_graphs must be a bool or a GraphPool'),
        R("SkipBlock", "inplace not a bool", lambda: dnn.SkipBlock(nn.Identity(), inplace=1), TypeError, 'SkipBlock: inplace must be a bool, got 1'),
        R("SkipBlock", "gate of rank 2", lambda: _skip_forward(img, torch.ones(2, 1)), ValueError, 'SkipBlock: gate must be [N] = [2] (one entry per sample)'),
        R("SkipBlock", "gate of another length", lambda: _skip_forward(img, torch.ones(3)), ValueError, 'SkipBlock: gate has 3 entries but x has 2 samples; they must match'),
        R("SkipBlock", "gate of an integer dtype", lambda: _skip_forward(img, torch.ones(2, dtype=torch.int64)), TypeError, 'SkipBlock: gate must be a floating or bool tensor'),
        R("SkipBlock", "gate on another device", lambda: _skip_forward(img, torch.ones(2, device="meta")), ValueError, 'SkipBlock: gate is on meta but x is on cpu; they must be on one device'),
        R("SkipBlock", "capacity above the batch size", lambda: _skip_forward(img, torch.ones(2), capacity=3), ValueError, 'SkipBlock: capacity must be at most the batch size 2'),
        R("SkipBlock", "capacity below the kept count", lambda: _skip_forward(img, torch.ones(2), capacity=1), ValueError, 'SkipBlock: capacity=1 but a block keeps 2 samples; capacity must be at least'),
        R("SkipBlock", "block changes the shape, shortcut does not", lambda: dnn.SkipBlock(nn.Conv2d(3, 4, 3, padding=1))(img, torch.tensor([1.0, 0.0])), ValueError, 'SkipBlock: the block maps a sample to shape (4, 8, 8) but the shortcut (identity) gives (3, 8, 8)'),
        R("SkipBlock", "bucket padding with BatchNorm in training", lambda: dnn.SkipBlock(_bn_block(3), bucket=2)(img, torch.tensor([1.0, 0.0])), RuntimeError, 'SkipBlock: a bucket or a fixed capacity pads the compact batch with zero rows'),
        R("SkipBlock", "cuda_graphs on CPU tensors", lambda: _no_grad(dnn.SkipBlock(nn.Identity(), cuda_graphs=True).eval(), img, torch.tensor([1.0, 0.0])), ValueError, 'SkipBlock: cuda_graphs needs CUDA tensors'),
        R("SkipBlock", "cuda_graphs in training mode", lambda: dnn.SkipBlock(nn.Identity(), cuda_graphs=True)(img, torch.tensor([1.0, 0.0])), RuntimeError, "SkipBlock: cuda_graphs is for inference, but the module is in training mode"),
        R("SkipPlan", "policy of rank 1", lambda: dnn.SkipPlan(torch.ones(4)), ValueError, 'SkipPlan: policy must be [N, B] (samples x blocks)'),
        R("SkipPlan", "policy of an integer dtype", lambda: dnn.SkipPlan(torch.ones(4, 2, dtype=torch.int32)), TypeError, 'SkipPlan: policy must be a floating or bool tensor'),
        R("SkipPlan", "capacity above the batch size", lambda: dnn.SkipPlan(torch.ones(4, 2), capacity=5), ValueError, 'SkipPlan: capacity must be at most the batch size 4'),
        R("SkipPlan", "capacity below a block's kept count", lambda: dnn.SkipPlan(torch.ones(4, 2), capacity=3), ValueError, 'SkipPlan: capacity=3 but a block keeps 4 samples; capacity must be at least'),
        R("SkipPlan", "bad backend name", lambda: dnn.SkipPlan(torch.ones(4, 2), backend="cudnn"), ValueError, "SkipPlan: backend must be one of ('auto', 'cuda', 'cpu', 'triton', 'torch')"),
        R("SkipSequential", "no blocks", lambda: dnn.SkipSequential([]), TypeError, 'SkipSequential: blocks must be a non-empty sequence of SkipBlock modules'),
        R("SkipSequential", "plain and scaled blocks mixed", lambda: dnn.SkipSequential([dnn.SkipBlock(nn.Identity()), dnn.SkipBlock(nn.Identity(), scaled=True)]), ValueError, 'SkipSequential: all blocks must share one formula (all scaled or all plain)'),
        R("SkipSequential", "policy with another column count", lambda: dnn.SkipSequential([dnn.SkipBlock(nn.Identity())])(img, torch.ones(2, 2)), ValueError, 'SkipSequential: policy has 2 columns but there are 1 blocks'),
        R("SkipSequential", "bad execution string", lambda: setattr(dnn.SkipSequential([dnn.SkipBlock(nn.Identity())]), "execution", "fast"), ValueError, "SkipSequential: execution must be one of ('masked', 'sparse')"),
        R("RouteBlock", "no branches", lambda: dnn.RouteBlock([]), TypeError, 'RouteBlock: branches must be a non-empty sequence of nn.Module'),
        R("RouteBlock", "bad execution string", lambda: dnn.RouteBlock([nn.Identity()], execution="fast"), ValueError, "RouteBlock: execution must be one of ('masked', 'sparse')"),
        R("RouteBlock", "bad bucket", lambda: dnn.RouteBlock([nn.Identity()], bucket=-8), ValueError, 'RouteBlock: bucket must be a positive int step'),
        R("RouteBlock", "choice of a floating dtype", lambda: _route_forward(img, torch.zeros(2)), TypeError, 'RouteBlock: choice must be an integer tensor (uint8, int8, int16, int32, int64)'),
        R("RouteBlock", "choice of another length", lambda: _route_forward(img, torch.zeros(3, dtype=torch.int64)), ValueError, 'RouteBlock: choice has 3 entries but x has 2 samples; they must match'),
        R("RouteBlock", "choice out of range", lambda: _route_forward(img, torch.tensor([0, 2])), IndexError, 'RouteBlock: choice[1] = 2 is out of range for 2 branches'),
        R("RouteBlock", "branch returns another row count", lambda: _route_forward(img, torch.tensor([0, 1]), [nn.Identity(), nn.Flatten(0)]), ValueError, 'RouteBlock: branch 1 must return a tensor of 1 rows (one per input row)'),
        R("RouteBlock", "bucket padding with BatchNorm in training", lambda: _route_forward(img, torch.tensor([0, 1]), [_bn_block(3), nn.Identity()], bucket=4), RuntimeError, "RouteBlock: bucket=4 pads compact batches with zero rows"),
        R("RoutePlan", "num_branches zero", lambda: dnn.RoutePlan(torch.zeros(3, dtype=torch.int64), 0), ValueError, 'RoutePlan: num_branches must be an int in [1, 2^31 - 2]'),
        R("RoutePlan", "choices of rank 3", lambda: dnn.RoutePlan(torch.zeros(3, 2, 1, dtype=torch.int64), 2), ValueError, 'RoutePlan: choices must be [N] or [N, B] (samples x blocks)'),
        R("RoutePlan", "choice out of range", lambda: dnn.RoutePlan(torch.tensor([[0, 3]]), 2), IndexError, 'RoutePlan: choices[0, 1] = 3 is out of range for 2 branches'),
        R("EarlyExit", "exits and stages of other counts", lambda: _early_exit(exits=1), ValueError, 'EarlyExit: one exit per stage'),
        R("EarlyExit", "no stages", lambda: dnn.EarlyExit([], [], 0.5), TypeError, "EarlyExit: stages and exits must be non-empty sequences of nn.Module"),
        R("EarlyExit", "threshold above 1", lambda: _early_exit(threshold=1.5), ValueError, 'EarlyExit: threshold[0] must be a number in [0, 1] (a confidence)'),
        R("EarlyExit", "NaN threshold", lambda: _early_exit(threshold=float("nan")), ValueError, 'EarlyExit: threshold[0] must be a number in [0, 1] (a confidence)'),
        R("EarlyExit", "threshold list of another length", lambda: _early_exit(threshold=[0.5, 0.5, 0.5]), ValueError, 'EarlyExit: threshold needs 1 values (one per exit but the last)'),
        R("EarlyExit", "controllers of another count", lambda: _early_exit(controllers=[nn.Identity(), nn.Identity()]), ValueError, 'EarlyExit: controllers must be 1 modules (one per exit but the last)'),
        R("EarlyExit", "bad execution string", lambda: _early_exit(execution="fast"), ValueError, "EarlyExit: execution must be one of ('masked', 'sparse')"),
        R("EarlyExit", "exit returns no logits", lambda: dnn.EarlyExit([nn.Identity()] * 2, [nn.Identity()] * 2, 0.5)(img), ValueError, 'EarlyExit: exit 0 must return logits [2, C]'),
        # ------------------------------------------------------------------ models, one per family
        R("models.resnet32_cifar (BlockDrop)", "bad execution string", lambda: models.resnet32_cifar(execution="fast"), ValueError, "BlockDropResNet: execution must be one of ('masked', 'sparse')"),
        R("models.BlockDropResNet.forward", "x not [N, 3, H, W]", lambda: models.resnet32_cifar()(torch.randn(2, 1, 8, 8)), ValueError, 'BlockDropResNet: x must be [N, 3, H, W]'),
        R("models.BlockDropResNet.forward", "policy with another block count", lambda: models.resnet32_cifar()(img, torch.ones(2, 3)), ValueError, 'BlockDropResNet: policy must be [N, num_blocks] = [2, 15]'),
        R("models.BlockDrop.forward", "bad mode", lambda: models.BlockDrop(models.policy_net_cifar(15), models.resnet32_cifar())(torch.randn(1, 3, 32, 32), mode="fast"), ValueError, "BlockDrop: mode must be one of ('sample', 'threshold')"),
        R("models.lcnet_resnet18_cifar (LC-Net)", "width not positive", lambda: lcnet.lcnet_resnet18_cifar(width=0), ValueError, 'lcnet_resnet18_cifar: width must be a positive number'),
        R("models.LCNetResNet.forward", "x not [N, 3, H, W]", lambda: lcnet.lcnet_resnet18_cifar(width=0.125)(torch.randn(2, 8, 8)), ValueError, 'LCNetResNet: x must be a [N, 3, H, W] tensor'),
        R("models.LCNetResNet.forward", "x of an integer dtype", lambda: lcnet.lcnet_resnet18_cifar(width=0.125)(torch.ones(2, 3, 8, 8, dtype=torch.int64)), TypeError, "LCNetResNet: x must be a floating tensor"),
        R("models.fbs_cifarnet (FBS)", "density zero", lambda: fbs.fbs_cifarnet(density=0), ValueError, 'FBSCifarNet: density must be in (0, 1]'),
        R("models.FBSNet.forward", "x not [N, 3, H, W]", lambda: fbs.fbs_cifarnet(width=0.125)(torch.randn(2, 1, 8, 8)), ValueError, 'FBSCifarNet: x must be a [N, 3, H, W] tensor'),
        R("models.skipnet.resnet38_cifar (SkipNet)", "bad gate name", lambda: skipnet.resnet38_cifar(gate="ffgate9"), ValueError, "SkipNet: gate must be one of ('ffgate1', 'ffgate2', 'rnn')"),
        R("models.skipnet.resnet38_cifar (SkipNet)", "bad gating string", lambda: skipnet.resnet38_cifar(gating="medium"), ValueError, "SkipNet: gating must be one of ('hard', 'soft', 'sample')"),
        R("models.skipnet.resnet38_cifar (SkipNet)", "density not a number", lambda: skipnet.resnet38_cifar(density="half"), TypeError, "SkipNet.calibrate: density must be a number in [0, 1]"),
        R("models.convnet_aig.resnet110_cifar (ConvNet-AIG)", "bad gumbel_noise string", lambda: convnet_aig.resnet110_cifar(gumbel_noise="often"), ValueError, "ConvNetAIG: gumbel_noise must be one of ('train', 'always')"),
        R("models.adashare.resnet18 (AdaShare)", "no tasks", lambda: adashare.resnet18(tasks_num_class=[]), ValueError, 'AdaShare: tasks_num_class must be a non-empty list of positive ints'),
        R("models.spottune (SpotTune)", "bad execution string", lambda: spottune.spottune(execution="fast"), ValueError, "SpotTuneResNet: execution must be one of ('masked', 'sparse')"),
        R("models.SpotTune.forward", "x not [N, 3, H, W]", lambda: spottune.spottune()(torch.randn(2, 1, 8, 8)), ValueError, "SpotTuneResNet: x must be a [N, 3, H, W] tensor"),
        R("models.arnet.ARNet (AR-Net)", "reso_list of another length", lambda: arnet.ARNet(reso_list=(224, 112)), ValueError, "ARNet: reso_list needs 4 resolutions (3 backbones, then the policy's)"),
        R("models.d2nn.HighLowCapacityD2NN (D2NN)", "bad execution string", lambda: d2nn.HighLowCapacityD2NN(execution="fast"), ValueError, "HighLowCapacityD2NN: execution must be one of ('masked', 'sparse')"),
        R("models.msdnet.msdnet_cifar (MSDNet)", "threshold above 1", lambda: msdnet.msdnet_cifar(threshold=2.0), ValueError, 'MSDNet: threshold[0] must be a number in [0, 1] (a confidence)'),
        R("models.MSDNet.forward", "x not [N, 3, H, W]", lambda: msdnet.msdnet_cifar()(torch.randn(2, 1, 32, 32)), ValueError, "MSDNet: x must be a [N, 3, H, W] tensor"),
    ]


HEADER = """# Bad input: what each entry point raises

Every public entry point checks its arguments before any kernel runs and raises an error
that names the entry point and the bad argument and says what was expected. The table lists,
per entry point and kind of bad input, the exception and how its message starts.
`python_tests/test_bad_input.py` runs one call per row (and checks this file is the rendering of
its table, `python_tests/bad_input_table.py`; `python python_tests/bad_input_table.py` rewrites it).

Index values (idx in range, distinct, a permutation; route's choices) are read on the host only
where that costs no device synchronisation: on CPU tensors, or on CUDA tensors with
`DYNKERNELS_CHECK_INDICES=1`. Unchecked on a GPU, the CUDA and Triton kernels never read or
write out of bounds: out-of-range entries give zero rows (gather_rows) or are skipped (the
merges), and route lists such rows after the last branch (the modules' host read of the
branch sizes then raises the IndexError anyway).

Not errors, by contract (`dynkernels.reference`, tested in `python_tests/test_properties.py`):
a NaN gate entry (or threshold) is inactive (`NaN > t` is false), an inf one active; a negative
or zero gate entry is inactive (in a scaled SkipBlock, any non-zero scale is active); count is
clamped to [0, the rows there are]; entries of idx past count are never read; capacity above
or below count gives zero rows or drops the rows past capacity.

Limits of one backend, not in the table because they need a GPU: the hand-written CUDA conv
has no float64 path (`backend="cuda"` with float64 x raises `TypeError: channel_sparse_conv2d:
backend='cuda' supports float32, float16 and bfloat16 x`; `"auto"` runs the reference there),
at most 65535 samples, and index limits below 2^31 (`ValueError`; all checked before the kernel
runs, in `_check_cuda_kernel_args` of `dynkernels/ops/channel_sparse_conv2d.py`); bfloat16 through Triton is tested on a GPU
only (the interpreter mishandles bf16 arithmetic).
"""


def render() -> str:
    lines = [HEADER, "| entry point | bad input | raises | message starts with |", "| --- | --- | --- | --- |"]
    for r in rows():
        msg = r.message.replace("|", "\\|")
        lines.append(f"| `{r.entry}` | {r.bad} | `{r.exc.__name__}` | `{msg}` |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    os.makedirs(os.path.dirname(DOC), exist_ok=True)
    with open(DOC, "w") as f:
        f.write(render())
    print(f"wrote {DOC}", file=sys.stderr)
