"""ONNX export of QAT checkpoints: exact codes and scales in the graph, onnxruntime parity, val parity, errors."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, numpy_helper
from torch import nn

from qat_test_utils import assert_some_image_agrees
from ultralytics_qat.checkpoint import deploy_pickle_and_entry, load_qat_model
from ultralytics_qat.cli import main
from ultralytics_qat.errors import QATCheckpointError, QATError
from ultralytics_qat.export import (
    ActivationQuant,
    QATExportError,
    QDQConv2d,
    export,
    export_onnx,
    fold_model,
    fold_weight,
    weight_codes,
)
from ultralytics_qat.ops.reference import lsq_forward
from ultralytics_qat.quant import LSQQuantizer, QConv2d

IMGSZ = 128  # 336 anchors per image: enough boxes, still fast on CPU


# -- helpers -------------------------------------------------------------------------------------------------------
def _images(coco8: Path, imgsz: int = IMGSZ) -> torch.Tensor:
    """All 8 bundled COCO images, letterboxed as Ultralytics does, as one float batch in [0, 1]."""
    from ultralytics.data.augment import LetterBox

    ims = []
    for p in sorted((coco8.parent / "images").glob("*/*.jpg")):
        im = LetterBox((imgsz, imgsz), auto=False)(image=cv2.imread(str(p)))[..., ::-1].transpose(2, 0, 1)
        ims.append(torch.from_numpy(np.ascontiguousarray(im, dtype=np.float32) / 255))
    return torch.stack(ims)


def _make_checkpoint(path: Path, x: torch.Tensor, qat_cfg=None) -> Path:
    """A QAT checkpoint (same layout as a yolo-qat run's) of yolov8n with random weights and non-trivial BN.

    Untrained, but not degenerate: BN gammas have random signs and magnitudes (so the fold must negate codes), and
    BN statistics and activation scales come from real images, so every output depends on the input.
    """
    from ultralytics.nn.tasks import DetectionModel

    from ultralytics_qat.controller import QATController

    torch.manual_seed(0)
    model = DetectionModel("yolov8n.yaml", nc=80, verbose=False)
    model.names = {i: f"c{i}" for i in range(80)}
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = torch.where(torch.rand(n, generator=g) < 0.3, -1.0, 1.0) * (0.5 + torch.rand(n, generator=g))
            m.bias.data = 0.1 * torch.randn(n, generator=g)
    qat = QATController(qat_cfg)
    qat.prepare(model, verbose=False)
    qat.calibrate(model, [x], batches=1)
    for m in model.modules():  # running statistics of these images, so eval sees what calibration saw
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()
    pickled, entry = deploy_pickle_and_entry(model, qat.config.to_dict())
    torch.save({"model": pickled, "train_args": {"imgsz": x.shape[-1]}, "qat": entry}, path)
    return path


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _export_logged(*args, **kwargs) -> tuple[Path, str]:
    from ultralytics.utils import LOGGER

    cap = _Capture()
    LOGGER.addHandler(cap)
    try:
        f = export_onnx(*args, **kwargs)
    finally:
        LOGGER.removeHandler(cap)
    return f, "\n".join(cap.lines)


def _session(f: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(f), providers=["CPUExecutionProvider"])


def _run(sess: ort.InferenceSession, x: torch.Tensor) -> np.ndarray:
    return np.concatenate([sess.run(None, {"images": x[i : i + 1].numpy()})[0] for i in range(len(x))])


def _producer(proto) -> dict:
    return {o: n for n in proto.graph.node for o in n.output}


def _act_chain(proto, conv_node):
    """(Clip or None, QuantizeLinear, DequantizeLinear) feeding a Conv's data input, or None for a float input."""
    prod = _producer(proto)
    dq = prod.get(conv_node.input[0])
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    q = prod[dq.input[0]]
    assert q.op_type == "QuantizeLinear"
    clip = prod.get(q.input[0])
    return (clip if clip is not None and clip.op_type == "Clip" else None), q, dq


def _const(proto, name: str) -> np.ndarray:
    inits = {t.name: t for t in proto.graph.initializer}
    if name in inits:
        return numpy_helper.to_array(inits[name])
    node = _producer(proto)[name]
    assert node.op_type == "Constant"
    return numpy_helper.to_array(node.attribute[0].t)


# -- fixtures ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def batch(coco8) -> torch.Tensor:
    return _images(coco8)


@pytest.fixture(scope="module")
def live(tmp_path_factory, batch) -> dict:
    """A random-weight W4A4 QAT checkpoint, its ONNX export (default opset 21) and the printed summary."""
    d = tmp_path_factory.mktemp("export")
    ckpt = _make_checkpoint(d / "live.pt", batch)
    f, log = _export_logged(ckpt)
    return {"ckpt": ckpt, "onnx": f, "log": log, "proto": onnx.load(str(f))}


# -- unit: containers and the fold -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bits, qn, qp, container, zp, clip",
    [
        (8, 0, 255, "uint8", 0, False),  # unsigned 8-bit: saturation is the grid
        (8, -128, 127, "int8", 0, False),  # signed 8-bit
        (8, -20, 235, "uint8", 20, False),  # affine 8-bit: zero point, saturation is the grid
        (4, -8, 7, "int8", 0, True),  # signed 4-bit: INT8 container, clipped
        (4, 0, 15, "int8", 0, True),  # unsigned 4-bit: fits INT8 with zero point 0 (TensorRT's only format)
        (4, -3, 12, "int8", 0, True),  # affine 4-bit (SiLU outputs)
        (3, -1, 6, "int8", 0, True),
        (7, -10, 117, "int8", 0, True),
    ],
)
def test_activation_container(bits, qn, qp, container, zp, clip):
    a = ActivationQuant(0.1, qn, qp, bits)
    assert (a.container, a.zero_point, a.clip) == (container, zp, clip)
    lo, hi = (-128, 127) if container == "int8" else (0, 255)
    assert lo <= qn + zp and qp + zp <= hi  # the grid is inside the container


def _qconv(cin, cout, wbits, act: LSQQuantizer | None, k=3, narrow=True, seed=0) -> QConv2d:
    torch.manual_seed(seed)
    conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)
    wq = LSQQuantizer(wbits, "weight", cout, narrow_range=narrow, init="minmax")
    wq.init_weight(conv.weight)
    return QConv2d.from_conv(conv, wq, act).eval()


def _bn(c, neg_frac=0.5, seed=0) -> nn.BatchNorm2d:
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(c).eval()
    bn.weight.data = torch.where(torch.rand(c, generator=g) < neg_frac, -1.0, 1.0) * (0.2 + torch.rand(c, generator=g))
    bn.bias.data = torch.randn(c, generator=g)
    bn.running_mean.data = torch.randn(c, generator=g)
    bn.running_var.data = 0.1 + torch.rand(c, generator=g)
    return bn


@pytest.mark.parametrize("wbits", [3, 4, 8])
def test_fold_keeps_integer_codes(wbits):
    conv, bn = _qconv(8, 16, wbits, None), _bn(16)
    codes, s = weight_codes(conv)
    folded = fold_weight(conv, bn)
    f = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
    assert (f < 0).any() and (f > 0).any()
    assert torch.equal(folded.codes.float(), codes * torch.sign(f).view(-1, 1, 1, 1))  # codes only change sign
    torch.testing.assert_close(folded.scale, s * f.abs(), rtol=1e-6, atol=0)
    torch.testing.assert_close(folded.bias, (bn.bias - bn.running_mean * f).detach(), rtol=1e-6, atol=1e-6)
    assert folded.container_bits == (4 if wbits <= 4 else 8)
    x = torch.randn(2, 8, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(QDQConv2d(conv, folded, None)(x), bn(conv(x)), rtol=1e-4, atol=1e-4)


def test_fold_full_range_grid_with_negative_gamma():
    conv = _qconv(4, 6, 4, None, narrow=False)
    conv.weight.data[0, 0, 0, 0] = -100.0  # clamps to code -8 (qn of the full-range 4-bit grid)
    bn = _bn(6, neg_frac=0)
    bn.weight.data[0] = -1.0
    folded = fold_weight(conv, bn, "layer")
    assert folded.codes[0, 0, 0, 0] == 8 and folded.container_bits == 8  # +8 does not fit INT4: exact in INT8
    conv8 = _qconv(4, 6, 8, None, narrow=False)
    conv8.weight.data[0, 0, 0, 0] = -100.0
    with pytest.raises(QATExportError, match="narrow_range=true"):
        fold_weight(conv8, bn, "layer8")


@pytest.mark.parametrize("grid, lo, hi, bits", [("unsigned", 0.0, 3.0, 8), ("auto", -0.28, 4.0, 4),
                                                ("signed", -2.0, 2.0, 4), ("auto", -0.3, 2.5, 3),
                                                ("auto", -0.5, 6.0, 8), ("unsigned", 0.0, 1.7, 4)])
def test_activation_qdq_is_bitwise_the_fake_quantizer(tmp_path, grid, lo, hi, bits):
    """Clip -> QuantizeLinear -> DequantizeLinear in onnxruntime == the fake quantizer, including saturation and ties."""
    aq = LSQQuantizer(bits, "activation", 1, grid=grid)
    aq.init_activation(lo, hi)
    c = 4
    conv = _qconv(c, c, 8, aq, k=1)
    conv.weight.data = torch.eye(c).view(c, c, 1, 1)
    conv.weight_fake_quant.scale.data.fill_(2.0**-6)  # code 64 * 2^-6 == 1 exactly: the conv is the identity
    layer = QDQConv2d(conv, fold_weight(conv, None), ActivationQuant.from_quantizer(aq, "x")).eval()
    s = float(aq.scale.detach())
    steps = torch.arange(aq.qn - 6, aq.qp + 6, dtype=torch.float32)
    v = torch.cat([steps, steps + 0.5, steps - 0.5, steps + 0.49, steps + 0.51, torch.randn(200) * (aq.qp - aq.qn)])
    x = (v * s).float()
    x = torch.cat([x, torch.zeros((-x.numel()) % (c * 8))]).view(1, c, 8, -1)
    f = tmp_path / "act.onnx"
    torch.onnx.export(layer, x, str(f), opset_version=18, dynamo=False, input_names=["images"])
    ops = [n.op_type for n in onnx.load(str(f)).graph.node]
    assert ops.count("QuantizeLinear") == 1 and ops.count("Clip") == (1 if bits < 8 else 0)
    got = _session(f).run(None, {"images": x.numpy()})[0]
    want = lsq_forward(x, aq.scale.detach(), aq.qn, aq.qp).numpy()
    assert np.array_equal(got, want)
    assert want.min() == aq.qn * np.float32(s) and want.max() == aq.qp * np.float32(s)  # both grid ends reached


# -- the exported graph --------------------------------------------------------------------------------------------
def test_graph_holds_learned_codes_scales_and_zero_points(live):
    """Every quantized conv: codes == sign(f) * clamp(round(w/s)) computed here from the checkpoint, INT4 for
    <= 4 bits, scale s*|f| on axis 0, and its activation's scale, zero point and clip exactly as learned."""
    proto = live["proto"]
    model, _ = load_qat_model(live["ckpt"])
    modules = dict(model.named_modules())
    inits = {t.name: t for t in proto.graph.initializer}
    convs = {n.input[1]: n for n in proto.graph.node if n.op_type == "Conv"}
    prod = _producer(proto)
    seen_neg, seen_zp, seen_affine, n_q = False, False, False, 0
    for name, m in modules.items():
        if not isinstance(m, QConv2d):
            continue
        n_q += 1
        q = m.weight_fake_quant
        bn = modules[name.rsplit(".", 1)[0]].bn
        s = q.scale.detach().expand(m.out_channels)
        f = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
        ref = torch.clamp(torch.round(m.weight.detach() / s.view(-1, 1, 1, 1)), q.qn, q.qp)
        ref = ref * torch.sign(f).view(-1, 1, 1, 1)
        seen_neg |= bool((f < 0).any())
        t = inits[f"{name}.codes"]
        assert t.data_type == (TensorProto.INT4 if q.bits <= 4 else TensorProto.INT8), name
        assert np.array_equal(numpy_helper.to_array(t).astype(np.int8), ref.numpy().astype(np.int8)), name
        dq = next(n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == t.name)
        assert {a.name: a.i for a in dq.attribute} == {"axis": 0} and len(dq.input) == 2
        np.testing.assert_allclose(_const(proto, dq.input[1]), (s * f.abs()).numpy(), rtol=5e-7, atol=0)  # a few ulp
        conv = convs[dq.output[0]]  # the weight DQ feeds exactly this Conv ...
        chain = _act_chain(proto, conv)  # ... whose data input is the activation Q/DQ of the same layer
        a = m.input_fake_quant
        assert (chain is None) == (a is None), name
        clip, qnode, dqnode = chain
        scale = np.float32(a.scale.item())
        zp = _const(proto, qnode.input[2])
        signed = a.qn >= -128 and a.qp <= 127  # every grid below 8 bits: INT8 with zero point 0
        assert zp.dtype == (np.int8 if signed else np.uint8) and int(zp) == (0 if signed else -a.qn), name
        seen_zp |= int(zp) != 0  # 8-bit unsigned/affine grids (first and last layers) keep a UINT8 zero point
        seen_affine |= a.bits < 8 and a.qn < 0 and a.qn != -(2 ** (a.bits - 1))
        assert _const(proto, qnode.input[1]) == scale and list(dqnode.input) == [qnode.output[0], *qnode.input[1:]]
        assert (clip is None) == (a.bits == 8), name
        if clip is not None:
            assert _const(proto, clip.input[1]) == np.float32(a.qn) * scale
            assert _const(proto, clip.input[2]) == np.float32(a.qp) * scale
        assert prod[conv.input[0]] is dqnode
    assert n_q == 57 and seen_neg and seen_zp and seen_affine
    opset = {i.domain: i.version for i in proto.opset_import}
    assert opset[""] == 21 and proto.ir_version <= 10


def test_float_layers_metadata_and_printed_summary(live):
    proto, log = live["proto"], live["log"]
    inits = {t.name: t for t in proto.graph.initializer}
    head = ["model.22.cv2.0.2", "model.22.cv2.1.2", "model.22.cv2.2.2", "model.22.cv3.0.2", "model.22.cv3.1.2",
            "model.22.cv3.2.2", "model.22.dfl.conv"]
    for name in head:  # float initializers feeding a Conv directly
        assert inits[f"{name}.weight"].data_type == TensorProto.FLOAT
    assert f"left in float (7): {', '.join(head)}" in log
    assert "50 INT4, 7 INT8" in log and "smaller), opset 21" in log
    size = live["onnx"].stat().st_size
    assert f"{size / 1e6:.2f} MB vs" in log
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["task"] == "detect" and meta["stride"] == "32" and meta["imgsz"] == f"[{IMGSZ}, {IMGSZ}]"
    assert "79: 'c79'" in meta["names"]


def test_onnxruntime_matches_pytorch_layer_by_layer(live, batch):
    """Feed each folded PyTorch layer the exact tensor onnxruntime fed its Conv chain; outputs agree to float noise.

    With identical inputs the activation codes are identical (both divide by the same float32 scale), so what is
    left is summation order inside the conv: relative differences ~1e-6. A wrong zero point, scale, axis or code
    in any layer moves its output by at least one quantization step.
    """
    proto = onnx.ModelProto()
    proto.CopyFrom(live["proto"])
    model, _ = load_qat_model(live["ckpt"])
    fold_model(model)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QDQConv2d)}
    convs = {n.input[1]: n for n in proto.graph.node if n.op_type == "Conv"}
    dqs = {n.input[0]: n for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    taps = {}
    for name in layers:
        conv = convs[dqs[f"{name}.codes"].output[0]]
        chain = _act_chain(proto, conv)
        src = conv.input[0] if chain is None else (chain[0] or chain[1]).input[0]
        taps[name] = (src, conv.output[0])
    for name in {t for pair in taps.values() for t in pair}:
        proto.graph.output.append(onnx.helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    for i in (0, 5):  # two real images
        out = dict(zip(names, sess.run(None, {"images": batch[i : i + 1].numpy()})))
        for name, (src, dst) in taps.items():
            with torch.no_grad():
                want = layers[name](torch.from_numpy(out[src])).numpy()
            got = out[dst]
            err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-6)
            assert err < 1e-5, f"{name}: relative error {err:.2e}"


def test_onnxruntime_end_to_end_parity(live, batch):
    """Boxes and scores of onnxruntime vs the folded PyTorch model (and the unfolded QAT model) on 8 real images.

    Per layer the two agree to float noise (test above), but a summation-order difference can move one activation
    across a rounding boundary of a 4-bit grid: one step s, ~6% of the layer's range. In this random-weight network
    such flips cascade (measured: 0 flips up to model.15, then 742 of 49k codes differ at model.21), so in some
    images boxes move by up to several P5 strides. Which images cascade depends on the CPU and on torch's thread
    count (measured: 4.9% of anchors > 1 px on one x86-64 machine, 11% on another), so the bound that is kept is
    one a real export bug cannot pass: a wrong zero point, axis or scale anywhere moves every box of every image
    (mean error tens of pixels), so no image could agree everywhere; here most images do (8 of 8, or 2 of 8 for
    the int8 profile below, on this project's 2-core machine), and at least one must.
    """
    model, _ = load_qat_model(live["ckpt"])
    folded = copy.deepcopy(model)
    fold_model(folded)
    got = _run(_session(live["onnx"]), batch)
    with torch.no_grad():
        refs = {"folded": folded(batch)[0].numpy(), "qat": model(batch)[0].numpy()}
    assert got.shape == (8, 84, 336) and got[:, :4].std(0).mean() > 1  # outputs depend on the image
    for ref in refs.values():
        assert_some_image_agrees(got, ref)


def test_opset_18_stores_int8_containers_with_same_codes(live, batch, tmp_path):
    f = export_onnx(live["ckpt"], opset=18, file=tmp_path / "o18.onnx")
    p18, p21 = onnx.load(str(f)), live["proto"]
    i18 = {t.name: t for t in p18.graph.initializer}
    i21 = {t.name: t for t in p21.graph.initializer}
    codes = [k for k in i21 if k.endswith(".codes")]
    assert len(codes) == 57 and {i.version for i in p18.opset_import if i.domain == ""} == {18}
    for k in codes:
        assert i18[k].data_type == TensorProto.INT8
        assert np.array_equal(numpy_helper.to_array(i18[k]), numpy_helper.to_array(i21[k]).astype(np.int8))
    np.testing.assert_allclose(_run(_session(f), batch[:2]), _run(_session(live["onnx"]), batch[:2]), atol=1e-4)
    assert live["onnx"].stat().st_size < 0.75 * f.stat().st_size  # INT4 packs two codes per byte


def test_int4_falls_back_to_int8_when_onnxruntime_cannot_run_it(live, tmp_path, monkeypatch):
    import ultralytics_qat.export.onnx as onnx_export

    monkeypatch.setattr(onnx_export, "_runs", lambda f: False)
    f, log = _export_logged(live["ckpt"], file=tmp_path / "fallback.onnx")
    proto = onnx.load(str(f))
    codes = [t for t in proto.graph.initializer if t.name.endswith(".codes")]
    assert len(codes) == 57 and all(t.data_type == TensorProto.INT8 for t in codes)
    assert "INT8 containers" in log and "57 INT8" in log


def test_export_does_not_import_the_engine():
    import subprocess
    import sys

    code = ("import sys, ultralytics_qat.export, ultralytics_qat.export.onnx; "
            "assert not any(m.startswith('ultralytics_qat.engine') for m in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# -- options, printed summary, the INT8 profile, QONNX ----------------------------------------------------------
def test_one_size_line_and_a_parity_line(live):
    """Ultralytics' exporter logs the size of its intermediate graph (INT8 containers, opset 18): silenced, so the
    only size printed is the file's; the parity summary follows."""
    lines = live["log"].splitlines()
    sizes = [ln for ln in lines if " MB" in ln]
    assert len(sizes) == 1 and str(live["onnx"]) in sizes[0] and "opset 21" in sizes[0], sizes
    assert not any("export success" in ln or "no one-to-one head" in ln for ln in lines)
    parity = [ln for ln in lines if "parity vs the PyTorch QAT model on 4 coco8 images (onnxruntime)" in ln]
    assert len(parity) == 1 and "boxes max" in parity[0] and "scores max" in parity[0]


def test_dynamic_half_batch_and_simplify(live, batch, tmp_path):
    from ultralytics_qat.export.parity import compare

    ref = _run(_session(live["onnx"]), batch[:2])
    f = export(live["ckpt"], dynamic=True, quantize="fp16", file=tmp_path / "dyn.onnx", parity=False)
    proto = onnx.load(str(f))
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert [bool(d.dim_param) for d in dims] == [True, False, True, True]  # batch, height, width dynamic
    inits = {t.name: t for t in proto.graph.initializer}
    for name in ["model.22.cv2.0.2", "model.22.cv3.2.2", "model.22.dfl.conv"]:  # float layers: FP16 storage
        assert inits[f"{name}.weight_fp16"].data_type == TensorProto.FLOAT16 and f"{name}.weight" not in inits
    assert all(inits[f"{n}.codes"].data_type == TensorProto.INT4 for n in ["model.2.cv1.conv", "model.15.m.0.cv2.conv"])
    assert f.stat().st_size < live["onnx"].stat().st_size - 30_000  # ~19k float head weights, 2 bytes less each
    sess = _session(f)
    out = sess.run(None, {"images": batch[:2].numpy()})[0]  # batch 2 through the dynamic batch axis
    p = compare(out, ref)
    assert p.box_mean < 0.05 and p.score_max < 0.01  # only FP16 rounding of the head's last convs
    big = torch.nn.functional.interpolate(batch[:1], size=(160, 192))
    assert sess.run(None, {"images": big.numpy()})[0].shape == (1, 84, 5 * 6 + 10 * 12 + 20 * 24)

    f2 = export(live["ckpt"], batch=2, simplify=False, opset=18, file=tmp_path / "b2.onnx", parity=False)
    p2 = onnx.load(str(f2))
    assert [d.dim_value for d in p2.graph.input[0].type.tensor_type.shape.dim] == [2, 3, IMGSZ, IMGSZ]
    assert {p.key: p.value for p in p2.metadata_props}["batch"] == "2"
    np.testing.assert_allclose(_session(f2).run(None, {"images": batch[:2].numpy()})[0], ref, atol=1e-3)


def test_int8_profile_is_tensorrt_ready(live, batch, tmp_path):
    """quantize=int8: what TensorRT's Q/DQ parser fuses into INT8 convs (tensorrt_profile_problems); the codes are
    the trained ones in INT8, and only the 8-bit unsigned/affine inputs (first layer, last layers) are re-gridded."""
    from ultralytics_qat.export import tensorrt_profile_problems
    from ultralytics_qat.export.parity import compare

    default = tensorrt_profile_problems(live["proto"])  # the checker can fail: UINT8 zero points, INT4 weights
    assert any("UINT8" in p for p in default) and any("INT4" in p for p in default)
    f, log = _export_logged(live["ckpt"], int8=True, file=tmp_path / "trt.onnx")
    proto = onnx.load(str(f))
    assert tensorrt_profile_problems(proto) == []
    assert {i.version for i in proto.opset_import if i.domain == ""} == {18}
    inits = {t.name: t for t in proto.graph.initializer}
    ref = {t.name: t for t in live["proto"].graph.initializer}
    codes = [k for k in ref if k.endswith(".codes")]
    assert len(codes) == 57
    for k in codes:
        assert inits[k].data_type == TensorProto.INT8
        assert np.array_equal(numpy_helper.to_array(inits[k]), numpy_helper.to_array(ref[k]).astype(np.int8))
    assert "0 UINT8" in log and "7 8-bit unsigned/affine grids moved to symmetric INT8" in log
    q = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert len(q) >= 56 and all(_const(proto, n.input[2]).dtype == np.int8 for n in q)
    for name in ["model.22.cv2.0.2", "model.22.cv3.1.2", "model.22.dfl.conv"]:  # head outputs and DFL in float
        assert inits[f"{name}.weight"].data_type == TensorProto.FLOAT
    # the graph computes what the re-gridded PyTorch model computes (as the default export does, test above)
    model, _ = load_qat_model(live["ckpt"])
    report = fold_model(model, symmetric_int8=True)
    assert len(report.regridded) == 7
    with torch.no_grad():
        ref = model(batch)[0].numpy()
    # as in the end-to-end test: where an activation ties a rounding boundary within float error, the flip cascades
    # through this random-weight net in some images; a wrong grid would move every image
    assert_some_image_agrees(_run(_session(f), batch), ref)


@pytest.mark.parametrize("qn, qp", [(0, 255), (-20, 235), (-200, 55), (-128, 127), (-3, 12)])
def test_symmetric_int8_grid_covers_the_trained_range(qn, qp):
    a = ActivationQuant(0.01, qn, qp, 8 if qp - qn > 15 else 4)
    b = a.symmetric_int8()
    assert b.signed and b.zero_point == 0 and -128 <= b.qn <= 0 <= b.qp <= 127
    if a.signed:
        assert b == a  # already TensorRT's format: unchanged, exact
    else:
        assert b.scale <= 2 * a.scale * 255 / 254  # one bit coarser at most
        assert abs(b.qn * b.scale - qn * a.scale) <= b.scale / 2 and abs(b.qp * b.scale - qp * a.scale) <= b.scale / 2


def test_qonnx_matches_pytorch_in_qonnx_executor(live, batch, tmp_path):
    """format=qonnx: a Quant node per weight and activation with the trained bit width, scale and zero point, run by
    qonnx's own executor (node by node, Quant in numpy) on real coco8 images.

    Per layer, with the executor's own input fed to the folded PyTorch conv: relative error < 1e-5 (same fp32
    division by the same scale, round half to even in both, so identical codes; what is left is the conv's
    summation order). End to end against the unfolded QAT model: measured boxes <= 6e-5 px, scores <= 1.3e-7 on
    these images for one trained state, but boxes max 14 px (mean 0.17 px), scores 1.2e-3 for another: one activation
    crossing a rounding boundary cascades, so the bounds are on the median and the share of moved anchors.
    """
    from onnx import numpy_helper as nh

    from ultralytics_qat.export.parity import compare
    from ultralytics_qat.export.qonnx import QonnxRunner

    f = export(live["ckpt"], format="qonnx", file=tmp_path / "q.onnx", parity=False)
    proto = onnx.load(str(f))
    assert {i.domain: i.version for i in proto.opset_import}["qonnx.custom_op.general"] == 1
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in proto.graph.node)
    inits = {t.name: nh.to_array(t) for t in proto.graph.initializer}
    quants = {n.output[0]: n for n in proto.graph.node if n.op_type == "Quant"}
    qat, _ = load_qat_model(live["ckpt"])
    folded = copy.deepcopy(qat)
    fold_model(folded)
    layers = {n: m for n, m in folded.named_modules() if isinstance(m, QDQConv2d)}
    trained = {n: m for n, m in qat.named_modules() if isinstance(m, QConv2d)}
    convs = [n for n in proto.graph.node if n.op_type == "Conv" and n.input[1] in quants]
    assert len(convs) == 57
    runner = QonnxRunner(f)
    ctx = runner.run(batch[:1].numpy(), full=True)
    bits_seen = set()
    for conv in convs:
        wq = quants[conv.input[1]]
        name = wq.name.removesuffix(".weight_quant")
        m = trained[name]
        attrs = {a.name: a.i if a.type == onnx.AttributeProto.INT else a.s for a in wq.attribute}
        assert int(inits[wq.input[3]]) == m.weight_fake_quant.bits and attrs["signed"] == 1 and attrs["narrow"] == 1
        assert float(inits[wq.input[2]]) == 0 and inits[wq.input[1]].shape == (m.out_channels, 1, 1, 1)
        aq = quants[conv.input[0]]  # the activation Quant: bits, zero point and scale as trained
        a = m.input_fake_quant
        assert int(inits[aq.input[3]]) == a.bits and np.float32(inits[aq.input[1]]) == np.float32(a.scale.item())
        signed = {a.name: a.i for a in aq.attribute}["signed"]
        assert float(inits[aq.input[2]]) == (0 if signed else -a.qn)
        bits_seen |= {a.bits, m.weight_fake_quant.bits}
        with torch.no_grad():
            want = layers[name](torch.from_numpy(ctx[aq.input[0]])).numpy()
        got = ctx[conv.output[0]]
        err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-6)
        assert err < 1e-5, f"{name}: relative error {err:.2e}"
    assert bits_seen == {4, 8}
    x = batch[[0, 5]].numpy()
    with torch.no_grad():
        ref = qat(torch.from_numpy(x))[0].numpy()
    out = np.concatenate([runner(x[i : i + 1]) for i in range(2)])
    p = compare(out, ref)
    # an activation that lands on a rounding boundary in one runtime and not the other moves one grid step and
    # cascades through the (barely trained) net: a few anchors move, the rest stay exact
    box_err = np.abs(out[:, :4] - ref[:, :4])
    assert np.median(box_err) < 1e-3 and (box_err > 1e-2).mean() < 0.05 and p.score_max < 5e-3, p


# -- errors --------------------------------------------------------------------------------------------------------
def test_errors_are_one_line(tmp_path, live, monkeypatch, capsys):
    from ultralytics.nn.tasks import DetectionModel

    fp = tmp_path / "float.pt"
    torch.save({"model": DetectionModel("yolov8n.yaml", nc=80, verbose=False).half(), "train_args": {}}, fp)
    with pytest.raises(QATCheckpointError, match=r"float Ultralytics checkpoint.*'yolo export model="):
        export_onnx(fp)
    with pytest.raises(QATExportError, match="supported: onnx, openvino, qonnx.*format=onnx quantize=int8"):
        export(live["ckpt"], format="engine")
    with pytest.raises(QATExportError, match="opset=11"):
        export_onnx(live["ckpt"], opset=11)
    assert main(["export", f"model={fp}"]) == 2
    bad = [("format=tflite", "supported: onnx, openvino, qonnx"), ("quantize=w8a16", "use quantize=int8"),
           ("batch=0", "batch=0 must be a positive integer"), ("nms=True", "'nms' is not supported by yolo-qat export"),
           ("half=maybe", "half='maybe' must be True or False"), ("dynamic=3", "dynamic"),
           ("format=qonnx quantize=int8", "do not apply to format=qonnx")]
    for args, why in bad:
        assert main(["export", f"model={live['ckpt']}", *args.split()]) == 2, args
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 + len(bad) and "yolo export model=" in err[0]
    for line, (args, why) in zip(err[1:], bad):
        assert line.startswith("yolo-qat: error: ") and why in line, (args, line)

    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "onnxruntime" else real(n, *a))
    with pytest.raises(QATError, match=r'onnxruntime.*pip install "ultralytics-qat\[export\]"'):
        export_onnx(live["ckpt"])


# -- end to end: CLI, val ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_export_and_val_onnx(qat_run, coco8, tmp_path):
    from ultralytics import YOLO

    from ultralytics_qat.checkpoint import load_qat_yolo
    from ultralytics_qat.engine import QATDetectionValidator

    best = qat_run / "weights" / "best.pt"
    assert main(["export", f"model={best}", "workspace=4"]) == 2  # a yolo export key yolo-qat export does not take
    assert main(["export", f"model={best}", "format=onnx"]) == 0
    f = best.with_suffix(".onnx")
    meta = {p.key: p.value for p in onnx.load(str(f)).metadata_props}
    assert meta["imgsz"] == "[64, 64]"  # the training imgsz, as 'yolo export' picks it
    # rect=False: a static ONNX graph takes square 64x64 inputs only (Ultralytics forces rect=False for it), while
    # rect .pt val pads 64x64 images to 96x96 (stride 32, pad 0.5); like for like, the two must agree
    common = dict(data=str(coco8), imgsz=64, batch=1, rect=False, plots=False, project=str(tmp_path), verbose=False)
    assert main(["val", f"model={f}", *(f"{k}={v}" for k, v in common.items())]) == 0
    pt = load_qat_yolo(best).val(validator=QATDetectionValidator, **common).box.map
    ox = YOLO(str(f)).val(**common).box.map
    assert abs(pt - ox) <= 0.005  # this 2-epoch run from scratch scores ~0 mAP: the shapes test below has signal


@pytest.fixture(scope="module")
def shapes_qat(tmp_path_factory) -> dict:
    """FP pretrain + short W4A4 QAT on synthetic shapes (non-zero mAP): the trained checkpoint and its val args."""
    from ultralytics import YOLO

    from ultralytics_qat import QATDetectionTrainer
    from ultralytics_qat.checkpoint import load_qat_yolo
    from ultralytics_qat.data import make_shapes_dataset
    from ultralytics_qat.engine import QATDetectionValidator

    tmp_path = tmp_path_factory.mktemp("shapes_qat")
    data = make_shapes_dataset(tmp_path / "shapes", n_train=64, n_val=16, imgsz=64, seed=0)
    common = dict(imgsz=64, batch=16, nbs=16, workers=0, plots=False, seed=0, deterministic=True, val=False,
                  mosaic=0.0, warmup_epochs=0, project=str(tmp_path / "runs"), exist_ok=True)
    fp = YOLO("yolov8n.yaml")
    fp.train(data=str(data), epochs=60, name="fp", lr0=0.01, **common)
    q = YOLO(str(fp.trainer.save_dir / "weights" / "last.pt"))
    q.train(trainer=QATDetectionTrainer, data=str(data), epochs=3, name="qat", lr0=0.002, **common)
    best = q.trainer.save_dir / "weights" / "last.pt"
    vargs = dict(data=str(data), imgsz=64, batch=1, rect=False, plots=False, verbose=False, project=str(tmp_path / "val"))
    pt = load_qat_yolo(best).val(validator=QATDetectionValidator, **vargs).box.map
    return {"ckpt": best, "data": data, "vargs": vargs, "map": pt, "dir": tmp_path}


@pytest.mark.slow
def test_val_map_parity_after_qat_on_shapes(shapes_qat):
    """.pt vs .onnx val within 0.5 points of mAP50-95 on a trained model."""
    from ultralytics import YOLO

    f = export_onnx(shapes_qat["ckpt"], parity=False)
    pt = shapes_qat["map"]
    ox = YOLO(str(f)).val(**shapes_qat["vargs"]).box.map
    print(f"shapes W4A4 QAT mAP50-95: .pt {pt:.4f}, .onnx {ox:.4f}")
    assert pt > 0.002, f"QAT mAP50-95 {pt:.4f}: too small to compare"
    assert abs(pt - ox) <= 0.005, (pt, ox)  # measured: identical (0.0233 both); rect=False as in the test above


@pytest.mark.slow
def test_openvino_ir_keeps_convs_integer_and_map(shapes_qat, capsys, monkeypatch):
    """format=openvino through the CLI: an IR dir with metadata.yaml that YOLO() validates and predicts; OpenVINO's CPU
    plugin compiles every quantized conv as an INT8 convolution; mAP50-95 within 0.5 points of the .pt."""
    import yaml
    from ultralytics import YOLO

    from ultralytics_qat.export.openvino import OpenVINORunner

    ckpt = shapes_qat["ckpt"]
    assert main(["export", f"model={ckpt}", "format=openvino"]) == 0
    out = ckpt.with_name(f"{ckpt.stem}_openvino_model")
    assert f"QAT export: {out}" in capsys.readouterr().out
    xml = out / f"{ckpt.stem}.xml"
    meta = yaml.safe_load((out / "metadata.yaml").read_text())
    assert xml.is_file() and meta["imgsz"] == [64, 64] and meta["task"] == "detect" and len(meta["names"]) == 4
    precisions = OpenVINORunner(xml).conv_precisions()
    assert precisions["u8"] + precisions.get("i8", 0) == 57 and sum(precisions.values()) == 64, precisions
    import ultralytics.nn.backends.openvino as ov_backend

    # Ultralytics compiles at the plugin's default precision: on CPUs with bf16 units (AMX Xeons) the float head then
    # runs in bf16 (measured there: mAP50-95 0.038 vs .pt 0.060); its ARM64 branch asks for f32, as the parity line does
    monkeypatch.setattr(ov_backend, "ARM64", True)
    ov = YOLO(str(out)).val(**shapes_qat["vargs"]).box.map
    monkeypatch.undo()
    pt = shapes_qat["map"]
    print(f"shapes W4A4 QAT mAP50-95: .pt {pt:.4f}, OpenVINO IR {ov:.4f}")
    assert pt > 0.002 and abs(pt - ov) <= 0.005, (pt, ov)  # measured at f32: 0.0598 both (opencv 5.1, AMX Xeon)
    val_dir = shapes_qat["dir"] / "val"
    assert main(["val", f"model={out}", f"data={shapes_qat['data']}", "imgsz=64", "batch=1", "rect=False",
                 "plots=False", f"project={val_dir}"]) == 0
    im = next((Path(shapes_qat["data"]).parent / "images" / "val").glob("*.png"))
    r = YOLO(str(out))(str(im), imgsz=64, verbose=False)[0]
    assert r.boxes is not None and r.orig_shape == (64, 64)


def test_readme_onnxruntime_snippet_runs_on_an_export(live):
    """README's onnxruntime snippet reads the input size from the export (it hard-coded 640: 'Expected: 160')."""
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    snippet = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "ort.InferenceSession" in b)
    scope = {}
    exec(snippet.replace('"best.onnx"', repr(str(live["onnx"]))), scope)
    assert scope["out"].shape == (1, 84, 336) and (scope["h"], scope["w"]) == (IMGSZ, IMGSZ)
