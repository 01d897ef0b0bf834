import math

import pytest
import torch
import torch.nn.functional as F

from meld_dali.config import ModelConfig
from meld_dali.data.base import zero_padding
from meld_dali.errors import UserError
from meld_dali.losses import FocalLoss, inverse_sqrt_weights
from meld_dali.model import STAGES, SlowFastMELD, masked_time_pool


def test_focal_is_cross_entropy_at_gamma_zero():
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(12, 7, generator=g), torch.randint(0, 7, (12,), generator=g)
    w = inverse_sqrt_weights([470, 150, 40, 111, 163, 22, 153])
    assert torch.allclose(FocalLoss(0.0)(logits, y), F.cross_entropy(logits, y))
    assert torch.allclose(FocalLoss(0.0, w)(logits, y), F.cross_entropy(logits, y, weight=w))


def test_focal_hand_value():
    logits = torch.tensor([[2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    p = math.exp(2) / (math.exp(2) + 6)
    expected = -((1 - p) ** 2) * math.log(p)
    assert FocalLoss(2.0)(logits, torch.tensor([0])).item() == pytest.approx(expected, rel=1e-6)


def test_class_weights_inverse_sqrt_mean_one():
    counts = [4710, 1205, 268, 683, 1743, 271, 1109]
    w = inverse_sqrt_weights(counts)
    assert w.mean().item() == pytest.approx(1.0, rel=1e-6)
    ratio = w[2] / w[0]
    assert ratio.item() == pytest.approx(math.sqrt(4710 / 268), rel=1e-5)
    assert torch.isfinite(inverse_sqrt_weights([5, 0, 1, 1, 1, 1, 1])).all()


def test_masked_pool_ignores_padded_steps():
    feat = torch.randn(2, 3, 6, 2, 2)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1] * 6], dtype=torch.bool)
    out = masked_time_pool(feat, mask)
    assert torch.allclose(out[0], feat[0, :, :3].mean(dim=(1, 2, 3)), atol=1e-6)
    assert torch.allclose(out[1], feat[1].mean(dim=(1, 2, 3)), atol=1e-6)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return SlowFastMELD(ModelConfig(hidden=[32, 16]))


@pytest.mark.slow
def test_the_mask_alone_tells_padding_from_real_frames(model):
    """Padded frames reach the model as zeros (the Batch contract: zero_padding, in
    ClipLoader.deliver). A clip of 3 real frames padded to 8 and a clip whose last 5 real
    frames are black hold the same pixels; only the mask tells them apart, so their
    predictions differ, and the padded clip's is the head over its valid steps alone
    (3 fast steps, 1 slow step at alpha 4). A model that pools over every step, on either
    pathway, fails this."""
    model.eval()
    g = torch.Generator().manual_seed(1)
    video = torch.randn(2, 3, 8, 32, 32, generator=g)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[0, 3:] = False
    noisy = video.clone()
    noisy[0, :, 3:] = torch.randn(3, 5, 32, 32, generator=g) * 10  # what a backend left
    x = zero_padding(noisy, mask)
    assert torch.equal(x[0, :, 3:], torch.zeros(3, 5, 32, 32))
    with torch.no_grad():
        padded = model(x, mask)
        black = model(x, torch.ones_like(mask))  # same pixels, every frame real
        assert padded.shape == (2, 7)
        assert torch.allclose(padded[1], black[1], atol=1e-5)  # clip 1 has no padding
        assert not torch.allclose(padded[0], black[0], atol=1e-3)  # the mask decided
        feats = [x[:, :, ::4], x]
        for block in model.blocks:
            feats = block(feats)
        slow, fast = (f[0].mean(dim=(2, 3)) for f in feats)  # [C, T'] per pathway
        assert slow.shape[1] == 2 and fast.shape[1] == 8
        pooled = torch.cat([slow[:, :1].mean(1), fast[:, :3].mean(1)])  # valid steps only
        want = model.head(pooled[None])[0]
        assert torch.allclose(padded[0], want, atol=1e-5), (padded[0], want)
        # ...and a change in a real frame does change the prediction
        noisy[0, :, 1] += 5
        assert not torch.allclose(padded[0], model(zero_padding(noisy, mask), mask)[0])


@pytest.mark.slow
def test_unfreezing_flips_exactly_the_stage(model):
    model.set_trainable(set())
    model.train()
    assert not any(p.requires_grad for p in model.blocks.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    assert not any(m.training for b in model.blocks for m in b.modules())  # frozen BN: eval
    model.set_trainable({"res5"})
    for name, block in zip(STAGES, model.blocks, strict=True):
        assert all(p.requires_grad == (name == "res5") for p in block.parameters())
        assert all(m.training == (name == "res5") for m in block.modules())
    model.set_trainable(set(STAGES))
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.slow
def test_pretrained_offline_keeps_random_init(model, tmp_path, caplog):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # a download that fails (no network here) keeps the random init and says so
    assert model.load_pretrained("http://127.0.0.1:9/k400.pyth") is False
    assert "random init" in caplog.text
    # a configured local file that is not there, or matches no tensor, is an error
    with pytest.raises(UserError, match="nope.pyth: cannot load it"):
        model.load_pretrained(str(tmp_path / "nope.pyth"))
    torch.save({"model_state": {"head.weight": torch.zeros(3)}}, tmp_path / "other.pyth")
    with pytest.raises(UserError, match="no tensor in it matches"):
        model.load_pretrained(str(tmp_path / "other.pyth"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    torch.save({"model_state": {k: v + 1 for k, v in before.items()
                                if k.startswith("blocks.4.") and v.is_floating_point()}},
               tmp_path / "k400.pyth")
    assert model.load_pretrained(str(tmp_path / "k400.pyth")) is True
    after = model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all(k.startswith("blocks.4.") for k in changed)
    model.load_state_dict(before)
