"""The model families: torchvision and timm ViT / DeiT through one adapter (ptq.models.families)."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer

from conftest import small_vit
from ptq.calib import calibrate
from ptq.models.families import UnsupportedModel, describe
from ptq.quant.nonlinear import Backend
from ptq.quant.vit import QuantSettings, QuantViT

ARCH = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0,
        "num_classes": 10}


def _perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random non-trivial parameters (timm's init leaves biases, LN affine and tokens at 0 / 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


MODELS = {
    "torchvision": lambda: small_vit(layers=2),
    "timm": lambda: _perturbed(VisionTransformer(**ARCH)),
    "timm-layerscale": lambda: _perturbed(VisionTransformer(**ARCH, init_values=0.3)),
    "timm-no-embed-class": lambda: _perturbed(VisionTransformer(**ARCH, no_embed_class=True)),
    "timm-distilled": lambda: _perturbed(VisionTransformerDistilled(**ARCH)),
}


@pytest.mark.parametrize("kind", list(MODELS))
def test_unquantized_graph_is_the_float_model(kind: str) -> None:
    torch.manual_seed(1)
    model = MODELS[kind]()
    q = QuantViT(model, QuantSettings(wbits=None, abits=None))
    q.set_mode("off")
    x = torch.randn(6, 3, 16, 16)
    with torch.no_grad():
        ref, out = model(x), q(x)
    assert ref.abs().max() > 0.1  # a real function, not all zeros
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_distilled_head_is_the_mean_of_both_heads() -> None:
    model = MODELS["timm-distilled"]()
    parts = describe(model)
    assert parts.family == "timm-distilled" and parts.head_tokens == 2 and parts.prefix.shape[1] == 2
    t = torch.randn(5, 2, 32)
    merged = t.reshape(5, -1) @ parts.head_w.t() + parts.head_b
    torch.testing.assert_close(merged, (model.head(t[:, 0]) + model.head_dist(t[:, 1])) / 2)


@pytest.mark.parametrize("kind", ["timm", "timm-distilled"])
def test_w8a8_ivit_stays_close_to_float(kind: str) -> None:
    torch.manual_seed(2)
    model = MODELS[kind]()
    q = QuantViT(model, QuantSettings(wbits=8, abits=8, backend=Backend("ivit")))
    x = torch.randn(64, 3, 16, 16)
    calibrate(q, [(x[:32], None), (x[32:], None)], torch.device("cpu"))
    with torch.no_grad():
        ref, out = model(x), q(x)
    cos = torch.nn.functional.cosine_similarity(ref.flatten(), out.flatten(), dim=0)
    assert cos > 0.98, cos


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"global_pool": "avg"}, "global_pool='avg'"),
    ({"reg_tokens": 2}, "register tokens"),
    ({"qk_norm": True}, "qk_norm"),
    ({"pre_norm": True}, "pre-norm"),
])
def test_unsupported_timm_features_are_refused_by_name(kwargs: dict, needle: str) -> None:
    with pytest.raises(UnsupportedModel, match=needle):
        QuantViT(VisionTransformer(**ARCH, **kwargs), QuantSettings())


def test_other_modules_are_refused() -> None:
    with pytest.raises(UnsupportedModel, match="not a supported model family"):
        QuantViT(torch.nn.Linear(3, 3), QuantSettings())


def test_embedded_deit_checkpoint_reaches_85_percent() -> None:
    from ptq.data.digits import digits_splits
    from ptq.models.tiny import evaluate_top1, load_tiny_digits

    model = load_tiny_digits(name="tiny_deit_digits")
    assert describe(model).family == "timm-distilled"
    assert evaluate_top1(model, digits_splits(image_size=24)["test"]) >= 85.0


def test_timm_eval_transform_is_the_models_own() -> None:
    from ptq.data.imagenet import eval_transform

    vit = [t for t in eval_transform("vit_base_patch16_224").transforms if type(t).__name__ == "Normalize"][0]
    deit = [t for t in eval_transform("deit_small_patch16_224").transforms if type(t).__name__ == "Normalize"][0]
    assert torch.allclose(torch.as_tensor(vit.mean), torch.tensor([0.5, 0.5, 0.5]))
    assert torch.allclose(torch.as_tensor(deit.mean), torch.tensor([0.485, 0.456, 0.406]))


def test_unsupported_model_name_exits_2_in_one_line(run_cli) -> None:
    res = run_cli("model.name=resnet50")
    assert res.returncode == 2
    err = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and "resnet50" in err[0] and "deit_small_patch16_224" in err[0] and "model=<name>" in err[0]


def test_checkpoint_of_another_model_exits_2_naming_the_model(run_cli, tmp_path: Path) -> None:
    ckpt = tmp_path / "vit_s.pth"
    torch.save(timm.create_model("vit_small_patch16_224", pretrained=False).state_dict(), ckpt)
    res = run_cli("model=deit_tiny_patch16_224", "data=imagenet", f"data.root={tmp_path}", f"model.weights_path={ckpt}")
    # data.root has no train/ val/: the weights are checked before the data, so the model's line comes first
    assert res.returncode == 2, res.stderr[-2000:]
    err = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and "does not match model=deit_tiny_patch16_224" in err[0] and "wrong shape" in err[0]


def test_deit_cli_run_exports_bit_exact(run_cli) -> None:
    res = run_cli("model=tiny_deit_digits", "wbits=4", "nonlinear=ivit", "export=true", "debug=quick")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "mismatches=0/256" in res.stderr + res.stdout
    assert res.stdout.strip().splitlines()[-1].startswith("tiny_deit_digits-W4A8-absmax-ivit")
