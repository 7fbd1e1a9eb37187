"""The shared ViT: RoPE, keep/mask forward, layers, official DINOv3 state dicts."""
import math

import pytest
import torch

import common
from common import ViT, grid_coords, load_backbone, vit


def tiny_vit(depth=2, **kw):
    torch.manual_seed(0)
    return ViT(embed_dim=32, depth=depth, num_heads=2, n_registers=2, layerscale_init=None, **kw).eval()


def test_grid_coords_hand_values():
    c = grid_coords(2, 4)
    assert c.shape == (8, 2)
    assert torch.allclose(c[:, 0], torch.tensor([-0.5] * 4 + [0.5] * 4))
    assert torch.allclose(c[:4, 1], torch.tensor([-0.75, -0.25, 0.25, 0.75]))


def test_rope_formula_hand_entries():
    rope = common.RoPE(head_dim=8, base=100.0).eval()
    assert torch.allclose(rope.periods, torch.tensor([1.0, 10.0]))
    sin, cos = rope(torch.tensor([[0.25, -0.5]]))
    # layout (y f0, y f1, x f0, x f1) tiled twice; angle = 2 pi c / period
    expected = torch.tensor([2 * math.pi * 0.25, 2 * math.pi * 0.025, -math.pi, -math.pi / 10] * 2)
    assert torch.allclose(sin[0], expected.sin(), atol=1e-6)
    assert torch.allclose(cos[0], expected.cos(), atol=1e-6)
    # e0 is rotated by pi/2 into dimension 4 (NeoX pairing d <-> d + D/2)
    x = torch.zeros(1, 1, 2, 8)  # one prefix token, one patch token
    x[..., 0] = 1.0
    out = common.apply_rope(x, sin, cos, n_prefix=1)
    assert torch.allclose(out[0, 0, 0], x[0, 0, 0])  # prefix untouched
    assert out[0, 0, 1, 4].item() == pytest.approx(1.0, abs=1e-6)
    assert out[0, 0, 1, 0].item() == pytest.approx(0.0, abs=1e-6)


def test_rope_logits_depend_only_on_offset():
    rope = common.RoPE(head_dim=16).eval()
    torch.manual_seed(1)
    q, k = torch.randn(16), torch.randn(16)

    def logit(cq, ck):
        sq, cq_ = rope(torch.tensor([cq]))
        sk, ck_ = rope(torch.tensor([ck]))
        rq = q * cq_[0] + common.rotate_half(q) * sq[0]
        rk = k * ck_[0] + common.rotate_half(k) * sk[0]
        return (rq * rk).sum()

    a = logit([0.1, -0.3], [0.5, 0.2])
    b = logit([0.1 + 0.37, -0.3 - 0.21], [0.5 + 0.37, 0.2 - 0.21])
    c = logit([0.1, -0.3], [0.6, 0.2])
    assert torch.allclose(a, b, atol=1e-4)
    assert not torch.allclose(a, c, atol=1e-3)


def test_rope_rescale_only_in_training():
    rope = common.RoPE(head_dim=8, rescale=2.0)
    coords = grid_coords(2, 2)
    rope.eval()
    assert torch.equal(rope(coords)[0], rope(coords)[0])
    rope.train()
    torch.manual_seed(0)
    assert not torch.allclose(rope(coords)[0], rope(coords)[0])


def test_keep_depth0_matches_full_forward():
    m = tiny_vit(depth=0)
    x = torch.randn(2, 3, 64, 48)
    full = m(x)["patches"]
    keep = torch.tensor([[0, 3, 5], [11, 2, 7]])
    part = m(x, keep=keep)["patches"]
    assert part.shape == (2, 3, 32)
    assert torch.allclose(part, full.gather(1, keep[..., None].expand(-1, -1, 32)), atol=1e-6)


def test_keep_tokens_carry_their_coordinates():
    # attention is permutation-equivariant, so a permuted `keep` of all patches must give the
    # permuted outputs only if every token keeps its own grid coordinates
    m = tiny_vit(depth=2)
    x = torch.randn(1, 3, 48, 64)
    full = m(x)["patches"]
    perm = torch.randperm(12)[None]
    out = m(x, keep=perm)["patches"]
    assert torch.allclose(out, full[:, perm[0]], atol=1e-5)
    # wrong coordinates would change the result: a shifted image region is not the same
    sub = m(x, keep=perm[:, :6])["patches"]
    assert not torch.allclose(sub, full[:, perm[0, :6]], atol=1e-3)


def test_mask_replaces_exactly_masked_embeddings():
    m = tiny_vit(depth=0)
    with torch.no_grad():
        m.mask_token.normal_()
    x = torch.randn(1, 3, 32, 32)
    mask = torch.tensor([[True, False, False, True]])
    out = m(x, mask=mask)["patches"][0]
    plain = m(x)["patches"][0]
    mt = m.norm(m.mask_token)[0]
    assert torch.allclose(out[0], mt) and torch.allclose(out[3], mt)
    assert torch.allclose(out[1], plain[1]) and torch.allclose(out[2], plain[2])
    assert not torch.allclose(out[0], plain[0])


def test_intermediate_layers_and_non_square():
    m = tiny_vit(depth=3)
    out = m(torch.randn(2, 3, 32, 80), layers=[0, 2])
    assert out["grid"] == (2, 5)
    assert sorted(out["layers"]) == [0, 2]
    assert out["layers"][0].shape == (2, 1 + 2 + 10, 32)
    assert torch.allclose(out["layers"][2][:, 3:], out["patches"])
    assert not torch.allclose(out["layers"][0][:, 3:], out["patches"])
    assert out["cls"].shape == (2, 32) and out["registers"].shape == (2, 2, 32)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        m(torch.randn(1, 3, 30, 32))


def test_param_counts_match_official():
    assert sum(p.numel() for p in vit("vit_small").parameters()) == 21_601_152
    assert sum(p.numel() for p in vit("vit_base").parameters()) == 85_669_632
    assert len(vit("vit_small").state_dict()) == 188


def official_vits16_state_dict(dim=384, depth=12):
    """Key names and shapes of dinov3_vits16_pretrain_lvd1689m, written out from the release."""
    sd = {"cls_token": torch.randn(1, 1, dim), "storage_tokens": torch.randn(1, 4, dim),
          "mask_token": torch.zeros(1, dim), "patch_embed.proj.weight": torch.randn(dim, 3, 16, 16) * 0.02,
          "patch_embed.proj.bias": torch.zeros(dim),
          "rope_embed.periods": 100 ** (2 * torch.arange(16) / 32.0),
          "norm.weight": torch.ones(dim), "norm.bias": torch.zeros(dim)}
    bias_mask = torch.cat([torch.ones(dim), torch.zeros(dim), torch.ones(dim)])
    for i in range(depth):
        b = f"blocks.{i}."
        sd.update({b + "norm1.weight": torch.ones(dim), b + "norm1.bias": torch.zeros(dim),
                   b + "attn.qkv.weight": torch.randn(3 * dim, dim) * 0.02, b + "attn.qkv.bias": torch.zeros(3 * dim),
                   b + "attn.qkv.bias_mask": bias_mask.clone(),
                   b + "attn.proj.weight": torch.randn(dim, dim) * 0.02, b + "attn.proj.bias": torch.zeros(dim),
                   b + "ls1.gamma": torch.full((dim,), 1e-5), b + "norm2.weight": torch.ones(dim),
                   b + "norm2.bias": torch.zeros(dim), b + "mlp.fc1.weight": torch.randn(4 * dim, dim) * 0.02,
                   b + "mlp.fc1.bias": torch.zeros(4 * dim), b + "mlp.fc2.weight": torch.randn(dim, 4 * dim) * 0.02,
                   b + "mlp.fc2.bias": torch.zeros(dim), b + "ls2.gamma": torch.full((dim,), 1e-5)})
    return sd


def test_official_dinov3_state_dict_loads_strictly(tmp_path):
    sd = official_vits16_state_dict()
    assert len(sd) == 188
    path = tmp_path / "dinov3_vits16_pretrain_lvd1689m-08c60483.pth"
    torch.save(sd, path)
    m = load_backbone(str(path))
    assert m.arch["embed_dim"] == 384 and m.arch["num_heads"] == 6 and m.arch["n_registers"] == 4
    assert torch.equal(m.storage_tokens, sd["storage_tokens"])
    assert torch.equal(m.blocks[3].attn.qkv.weight, sd["blocks.3.attn.qkv.weight"])
    m.eval()
    out = m(torch.randn(1, 3, 32, 48))
    assert out["patches"].shape == (1, 6, 384)


def test_mismatched_and_corrupt_checkpoints_give_clear_errors(tmp_path):
    sd = official_vits16_state_dict()
    sd["blocks.5.mlp.fc1.weight"] = torch.randn(100, 384)
    bad = tmp_path / "bad.pth"
    torch.save(sd, bad)
    with pytest.raises(ValueError, match=r"bad\.pth.*blocks\.5\.mlp\.fc1\.weight"):
        load_backbone(str(bad))
    sd = official_vits16_state_dict()
    del sd["blocks.0.attn.qkv.bias_mask"]
    torch.save(sd, bad)
    with pytest.raises(ValueError, match=r"missing key 'blocks\.0\.attn\.qkv\.bias_mask'"):
        load_backbone(str(bad))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="junk.safetensors"):
        load_backbone(str(junk))
    trunc = tmp_path / "trunc.pth"
    torch.save(official_vits16_state_dict(), trunc)
    trunc.write_bytes(trunc.read_bytes()[:1000])
    with pytest.raises(ValueError, match="trunc.pth"):
        load_backbone(str(trunc))
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_backbone(str(tmp_path / "nope.pth"))


def test_backbone_safetensors_round_trip(tmp_path):
    m = tiny_vit(depth=2)
    common.save_backbone(m, tmp_path / "b.safetensors", recipe="test")
    m2 = load_backbone(str(tmp_path / "b.safetensors")).eval()
    x = torch.randn(1, 3, 32, 32)
    assert torch.allclose(m(x)["patches"], m2(x)["patches"])
    assert m2.n_registers == 2


def test_patch8_grid_rope_and_round_trip(tmp_path):
    """The teaching presets' patch 8: a 64 px crop is an 8 x 8 grid whose RoPE coordinates are
    the grid's own (normalised per grid, so a 224 px probe tile is 28 x 28 on the same (-1, 1)
    span), each token embeds exactly its 8 x 8 pixels, and the architecture survives export."""
    m = tiny_vit(depth=0, patch_size=8)
    x = torch.zeros(1, 3, 64, 64)
    x[0, :, 8:16, 16:24] = 1.0  # only patch (row 1, col 2) = token 1 * 8 + 2 = 10 differs
    out = m(x)
    assert out["grid"] == (8, 8) and out["patches"].shape == (1, 64, 32)
    tok = m.patch_embed(x)[0]
    base = m.patch_embed.proj.bias
    changed = [i for i in range(64) if not torch.allclose(tok[i], base, atol=1e-6)]
    assert changed == [10]
    c = grid_coords(8, 8)
    assert torch.allclose(c[0], torch.tensor([-0.875, -0.875])) and torch.allclose(c[10], torch.tensor([-0.625, -0.375]))
    assert m(torch.zeros(1, 3, 224, 224))["grid"] == (28, 28)
    with pytest.raises(ValueError, match="multiple of the patch size 8"):
        m(torch.zeros(1, 3, 60, 64))
    common.save_backbone(m, tmp_path / "b.safetensors")
    back = load_backbone(str(tmp_path / "b.safetensors"))
    assert back.patch_size == 8 and back.patch_embed.proj.weight.shape[-2:] == (8, 8)
    assert torch.allclose(back.eval()(x)["patches"], out["patches"], atol=1e-6)
