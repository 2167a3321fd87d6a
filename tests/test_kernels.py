"""The packed matmul op: every backend against the dequantize-then-matmul reference."""

from __future__ import annotations

import pytest
import torch

from unibcq.errors import UnibcqError
from unibcq.formats.bcq import STORAGE_DTYPE, BCQTensor, num_groups
from unibcq.kernels import bcq_linear, bcq_linear_reference, bcq_matmul, choose_backend
from unibcq.kernels import cpu_bitplane


def random_bcq(out_features: int, in_features: int, bits: int, group_size: int, offset: bool, seed: int) -> BCQTensor:
    gen = torch.Generator().manual_seed(seed)
    groups = num_groups(in_features, group_size)
    planes = torch.randint(0, 256, (bits, out_features, -(-in_features // 8)), generator=gen, dtype=torch.uint8)
    if in_features % 8:  # padding bits are zero in real packed data
        planes[..., -1] &= (1 << (in_features % 8)) - 1
    alpha = (torch.rand(out_features, groups, bits, generator=gen) + 0.05).to(STORAGE_DTYPE)
    off = torch.randn(out_features, groups, generator=gen).to(STORAGE_DTYPE) if offset else None
    return BCQTensor(planes, alpha, off, (out_features, in_features), group_size)


SHAPES = [(40, 72), (24, 100), (96, 256), (33, 576)]


@pytest.mark.skipif(not cpu_bitplane.AVAILABLE, reason="numba missing")
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("group_size", [8, 24, 32, 64, 128, -1])
@pytest.mark.parametrize("offset", [True, False])
def test_bitplane_backend_matches_reference(bits, group_size, offset, monkeypatch):
    """Every bit count and input-row block the kernel specialises for, odd byte counts per group
    included, whichever rows per pass this CPU would choose."""
    for index, (out_features, in_features) in enumerate(SHAPES):
        if not cpu_bitplane.supports(in_features, group_size):
            continue
        weight = random_bcq(out_features, in_features, bits, group_size, offset, seed=index)
        for row_block in range(1, cpu_bitplane.BATCH_BLOCK + 1):
            monkeypatch.setattr(cpu_bitplane, "rows_per_pass", lambda bits, row_block=row_block: row_block)
            for batch in (1, 2, 3, 4, 5, 9, 16, 64):
                x = torch.randn(batch, in_features, generator=torch.Generator().manual_seed(batch))
                ref = bcq_linear_reference(x, weight)
                got = bcq_linear(x, weight, backend="bitplane")
                assert got.shape == ref.shape and got.dtype == ref.dtype
                torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


@pytest.mark.skipif(not cpu_bitplane.AVAILABLE, reason="numba missing")
def test_the_vector_unit_is_the_one_numba_compiles_for(monkeypatch):
    import numba

    try:
        for features, expected in (("+avx2,+avx512f", True), ("+avx2,-avx512f", False), ("", False)):
            monkeypatch.setattr(numba.config, "CPU_FEATURES", features)
            cpu_bitplane.has_avx512.cache_clear()
            assert cpu_bitplane.has_avx512() is expected
    finally:
        monkeypatch.undo()
        cpu_bitplane.has_avx512.cache_clear()


@pytest.mark.parametrize("avx512", [True, False])
def test_rows_per_pass_and_gemv_rows_follow_the_vector_unit(avx512, monkeypatch):
    """Without AVX-512 fewer accumulators fit in registers: fewer rows a pass, fewer rows to the GEMV."""
    monkeypatch.setattr(cpu_bitplane, "has_avx512", lambda: avx512)
    monkeypatch.delenv("UNIBCQ_BACKEND", raising=False)
    passes = [cpu_bitplane.rows_per_pass(bits) for bits in range(1, 9)]
    assert all(1 <= rows <= cpu_bitplane.BATCH_BLOCK for rows in passes)
    most = {bits: cpu_bitplane.gemv_max_rows(bits) for bits in (None, 2, 3, 4)}
    if avx512:
        assert passes == [cpu_bitplane.BATCH_BLOCK] * 8 and set(most.values()) == {4}
    else:
        assert passes[:4] == [4, 2, 1, 1] and most == {None: 1, 2: 3, 3: 2, 4: 1}
    if cpu_bitplane.AVAILABLE:
        for bits, rows in most.items():
            assert choose_backend(torch.randn(rows, 128), 128, 32, bits=bits) == "bitplane"
            assert choose_backend(torch.randn(rows + 1, 128), 128, 32, bits=bits) == "reference"


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_auto_and_reference_with_bias_and_leading_dims(backend):
    weight = random_bcq(48, 128, 3, 32, True, seed=9)
    bias = torch.randn(48)
    x = torch.randn(2, 5, 128)
    expected = bcq_linear_reference(x, weight, bias)
    torch.testing.assert_close(bcq_linear(x, weight, bias, backend=backend), expected, rtol=1e-4, atol=1e-4)


def test_backend_choice(monkeypatch):
    monkeypatch.delenv("UNIBCQ_BACKEND", raising=False)
    x1, x64 = torch.randn(1, 128), torch.randn(64, 128)
    gemv = "bitplane" if cpu_bitplane.AVAILABLE else "reference"
    assert choose_backend(x1, 128, 32) == gemv
    assert choose_backend(x64, 128, 32) == "reference"
    assert choose_backend(torch.randn(1, 120), 120, 20) == "reference"  # groups not byte-aligned
    assert choose_backend(x1.requires_grad_(), 128, 32) == "reference"
    monkeypatch.setenv("UNIBCQ_BACKEND", "reference")
    assert choose_backend(torch.randn(1, 128), 128, 32) == "reference"
    with pytest.raises(UnibcqError, match="unknown backend"):
        choose_backend(x64, 128, 32, "fastest")
    with pytest.raises(UnibcqError, match="byte-aligned"):
        choose_backend(torch.randn(1, 120), 120, 20, "bitplane")


def test_gradient_flows_to_the_input():
    weight = random_bcq(16, 64, 2, 32, True, seed=3)
    x = torch.randn(4, 64, requires_grad=True)
    bcq_linear(x, weight).pow(2).sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    bcq_linear_reference(x_ref, weight).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)


def test_forward_mode_tangents_are_the_dense_products():
    """Forward-mode AD (forward_ad, torch.func.jvp and jacfwd) gets the tangent v W^T: the
    custom op has no forward formula, and through it the tangent used to vanish silently."""
    from torch.autograd import forward_ad

    weight = random_bcq(16, 64, 3, 32, True, seed=5)
    dense = weight.dequantize()
    x, v = torch.randn(4, 64), torch.randn(4, 64)
    with forward_ad.dual_level():
        y = bcq_linear(forward_ad.make_dual(x, v), weight)
        tangent = forward_ad.unpack_dual(y).tangent
    assert tangent is not None
    torch.testing.assert_close(tangent, v @ dense.T, rtol=1e-5, atol=1e-5)
    output, tangent = torch.func.jvp(lambda inp: bcq_linear(inp, weight), (x,), (v,))
    torch.testing.assert_close(tangent, v @ dense.T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(output, bcq_linear(x, weight), rtol=1e-5, atol=1e-5)
    jacobian = torch.func.jacfwd(lambda inp: bcq_linear(inp, weight))(x[0])
    torch.testing.assert_close(jacobian, dense, rtol=1e-5, atol=1e-5)


def test_a_compiled_graph_backpropagates_through_the_op():
    """AOTAutograd traces the backward formula with fake tensors; the compiled dequantize
    behind it read their (missing) data pointers, so any compiled graph whose input needed a
    gradient failed."""
    weight = random_bcq(16, 64, 3, 32, True, seed=9)
    x = torch.randn(3, 64, requires_grad=True)
    torch.compile(lambda inp: bcq_linear(inp, weight).sum(), backend="aot_eager")(x).backward()
    torch.testing.assert_close(x.grad, weight.dequantize().sum(0).expand(3, -1), rtol=1e-5, atol=1e-5)


def test_op_is_registered_and_traceable():
    weight = random_bcq(16, 64, 2, 32, False, seed=4)
    x = torch.randn(2, 64)
    assert torch.ops.unibcq.bcq_matmul.default is not None
    torch.library.opcheck(bcq_matmul, (x, weight.planes, weight.alpha, None, 64, 32, "reference"))


def test_eager_calls_skip_the_op_and_compiled_graphs_keep_it(monkeypatch):
    """Plain eager inference calls the op's computation directly (same values); an input that
    needs a gradient, fake tensors and torch.compile still go through `unibcq::bcq_matmul`."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from unibcq.kernels import dispatch

    weight = random_bcq(16, 64, 3, 32, True, seed=6)
    x = torch.randn(2, 64)
    calls = []

    def spy(*args):
        calls.append(type(args[0]).__name__)
        return bcq_matmul(*args)

    monkeypatch.setattr(dispatch, "bcq_matmul", spy)
    with torch.no_grad():
        direct = bcq_linear(x, weight)
    with torch.inference_mode():
        assert torch.equal(bcq_linear(x, weight), direct)
    assert calls == []
    assert torch.equal(direct, bcq_matmul(x, weight.planes, weight.alpha, weight.offset, 64, 32))
    bcq_linear(x.clone().requires_grad_(), weight)
    assert calls == ["Tensor"]
    with FakeTensorMode() as mode:
        fake = bcq_linear(mode.from_tensor(x), random_bcq(16, 64, 3, 32, True, seed=6))
    assert fake.shape == (2, 16) and calls[1:] == ["FakeTensor"]
    monkeypatch.undo()
    graphs = []

    def capture(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    compiled = torch.compile(lambda t: bcq_linear(t, weight), backend=capture, fullgraph=True)
    torch.testing.assert_close(compiled(x), direct)
    targets = [node.target for graph in graphs for node in graph.graph.nodes]
    assert torch.ops.unibcq.bcq_matmul.default in targets


def test_scale_cache_follows_in_place_updates():
    weight = random_bcq(16, 64, 2, 32, True, seed=5)
    x = torch.randn(1, 64)
    before = bcq_linear(x, weight, backend="bitplane" if cpu_bitplane.AVAILABLE else "reference")
    with torch.no_grad():
        weight.alpha.mul_(2)
        weight.offset.mul_(2)
    after = bcq_linear(x, weight, backend="bitplane" if cpu_bitplane.AVAILABLE else "reference")
    torch.testing.assert_close(after, 2 * before, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not cpu_bitplane.AVAILABLE, reason="numba missing")
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [8, 24, 32, 128, -1])
@pytest.mark.parametrize("offset", [True, False])
def test_compiled_dequantize_equals_torch_dequantize(bits, group_size, offset):
    from unibcq.kernels import dequantize_weight

    for index, (out_features, in_features) in enumerate(SHAPES):
        weight = random_bcq(out_features, in_features, bits, group_size, offset, seed=index + bits)
        expected = weight.dequantize()
        got = dequantize_weight(weight)
        assert got.shape == expected.shape and got.dtype == torch.float32
        assert torch.equal(got, expected)  # same additions in the same order
        assert dequantize_weight(weight, torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.skipif(not cpu_bitplane.AVAILABLE, reason="numba missing")
def test_parallel_gemv_equals_reference(monkeypatch):
    monkeypatch.setattr(cpu_bitplane, "PARALLEL_MIN_BYTES", 0)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        weight = random_bcq(96, 256, 3, 64, True, seed=11)
        for batch in (1, 6):
            x = torch.randn(batch, 256)
            ref = bcq_linear_reference(x, weight)
            got = bcq_linear(x, weight, backend="bitplane")
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    finally:
        torch.set_num_threads(threads)


def test_bitplane_kernel_leaves_torch_thread_count_alone():
    threads = torch.get_num_threads()
    bcq_linear(torch.randn(1, 128), random_bcq(16, 128, 3, 32, True, seed=1), backend="bitplane")
    assert torch.get_num_threads() == threads


@pytest.mark.skipif(not cpu_bitplane.AVAILABLE, reason="numba missing")
def test_scale_cache_follows_replaced_data():
    weight = random_bcq(16, 64, 2, 32, True, seed=6)
    x = torch.randn(1, 64)
    before = bcq_linear(x, weight, backend="bitplane")
    weight.alpha.data = weight.alpha.data * 2  # new storage, same version counter
    weight.offset.data = weight.offset.data * 2
    torch.testing.assert_close(bcq_linear(x, weight, backend="bitplane"), 2 * before, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not cpu_bitplane.AVAILABLE, reason="numba missing")
def test_empty_products():
    weight = random_bcq(0, 64, 2, 32, True, seed=7)
    assert bcq_linear(torch.randn(2, 64), weight, backend="bitplane").shape == (2, 0)
    assert cpu_bitplane.dequantize(weight.planes, weight.alpha, weight.offset, 64, 32).shape == (0, 64)


@pytest.mark.skipif(not cpu_bitplane.AVAILABLE, reason="numba missing")
@pytest.mark.parametrize("batch", [1, 9])
def test_weights_made_under_inference_mode(batch):
    """Inference tensors have no version counter to stamp the scale cache with: a model loaded
    under `torch.inference_mode()` must still run, and follow in-place edits made there."""
    x = torch.randn(batch, 64)
    with torch.inference_mode():
        weight = random_bcq(16, 64, 2, 32, True, seed=8)
        assert weight.alpha.is_inference()
        before = bcq_linear(x, weight, backend="bitplane")
        torch.testing.assert_close(before, bcq_linear_reference(x, weight), rtol=1e-4, atol=1e-4)
        weight.alpha.mul_(2)
        weight.offset.mul_(2)
        torch.testing.assert_close(bcq_linear(x, weight, backend="bitplane"), 2 * before, rtol=1e-4, atol=1e-4)
