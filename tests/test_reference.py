"""The reference ops against PyTorch's own, in float64."""
import pytest
import torch
import torch.nn.functional as F

from engine import reference

SIZES = [(1, 1), (1, 7), (7, 7), (5, 129), (129, 129), (64, 300)]


@pytest.mark.parametrize("sq,sk", SIZES)
@pytest.mark.parametrize("causal", [True, False])
def test_attention_matches_sdpa(sq, sk, causal):
    B, H, D = 2, 3, 16
    q = torch.randn(B, H, sq, D, dtype=torch.float64)
    k, v = torch.randn(2, B, H, sk, D, dtype=torch.float64)
    # bottom-right aligned causal mask, built independently of the reference's own helper
    mask = torch.ones(sq, sk, dtype=torch.bool).tril(diagonal=sk - sq) if causal else None
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(reference.attention(q, k, v, causal=causal), expected, rtol=1e-12, atol=1e-12)


def test_attention_left_padding_hides_pad_keys():
    """kv_start: a real query's output doesn't change whatever the padding holds."""
    B, H, S, D = 2, 2, 9, 8
    q, k, v = torch.randn(3, B, H, S, D, dtype=torch.float64)
    kv_start = torch.tensor([0, 4])
    out = reference.attention(q, k, v, causal=True, kv_start=kv_start)
    k2, v2 = k.clone(), v.clone()
    k2[1, :, :4] = 100.0
    v2[1, :, :4] = -100.0
    out2 = reference.attention(q, k2, v2, causal=True, kv_start=kv_start)
    torch.testing.assert_close(out[:, :, 4:], out2[:, :, 4:])
    # and the real part of row 1 equals attention over the unpadded sequence
    alone = reference.attention(q[1:, :, 4:], k[1:, :, 4:], v[1:, :, 4:], causal=True)
    torch.testing.assert_close(out[1:, :, 4:], alone)
    assert torch.isfinite(out).all()


def test_attention_rejects_sk_below_sq():
    q = torch.randn(1, 1, 5, 4)
    with pytest.raises(ValueError, match="Sk >= Sq"):
        reference.attention(q, q[:, :, :3], q[:, :, :3])


@pytest.mark.parametrize("shape", [(1,), (7,), (3, 100), (2, 5, 768), (257, 1000)])
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_matches_torch(shape, affine):
    x = torch.randn(*shape, dtype=torch.float64) * 3 + 1
    n = shape[-1]
    w = torch.randn(n, dtype=torch.float64) if affine else None
    b = torch.randn(n, dtype=torch.float64) if affine else None
    torch.testing.assert_close(reference.layer_norm(x, w, b, 1e-5), F.layer_norm(x, (n,), w, b, 1e-5), rtol=1e-12, atol=1e-12)


def test_add_layer_norm_returns_sum_and_norm():
    x, r = torch.randn(2, 4, 33, dtype=torch.float64)
    w, b = torch.randn(2, 33, dtype=torch.float64)
    y, s = reference.add_layer_norm(x, r, w, b)
    torch.testing.assert_close(s, x + r)
    torch.testing.assert_close(y, F.layer_norm(x + r, (33,), w, b, 1e-5))

