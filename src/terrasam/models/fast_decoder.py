"""A step-by-step forward of the SAM-family two-way transformer and mask head, for B prompts
against one image, sharing per-image work across the prompts.

The same arithmetic as transformers' SamTwoWayTransformer / Sam2TwoWayTransformer and the
mask decoders' upscaling, regrouped:

* while the image side is the same for every prompt (first block, no mask prompt), its key,
  value and query projections are computed once per image and broadcast;
* attention between a few tokens and the N image positions is re-associated when that is
  cheaper: ``softmax((W_q x + b) . k) = softmax(x . (W_q^T k) + b . k)`` projects the few
  tokens instead of the N positions, and ``out_proj(A @ V) = A @ (V @ W_out^T) + b``;
* the transposed 2x2 convolutions of the mask head are plain matrix products on a
  channels-last layout, and only the requested prompts and masks are upscaled.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

_UPSCALE_CHUNK = 8  # prompts per mask-head chunk: bounds the (b, 4h, 4w, C/8) buffers


def _out_proj(attn):
    return attn.out_proj if hasattr(attn, "out_proj") else attn.o_proj


def _heads(x: torch.Tensor, h: int) -> torch.Tensor:
    """(B, L, D) -> (B, H, L, D / H)."""
    return x.unflatten(-1, (h, -1)).transpose(1, 2)


@dataclass
class ImageSide:
    """Per-image tensors of the first two-way block: image + dense prompt (flattened to
    (1, N, C)), the positional encoding and the first block's projections of the image."""

    keys: torch.Tensor  # (1 or B, N, C)
    pe: torch.Tensor  # (1, N, C)
    kpe: torch.Tensor  # keys + pe
    t2i: tuple[torch.Tensor, torch.Tensor] | None  # first block's token->image K, V (H, N, dh)
    i2t_q: torch.Tensor | None  # first block's image->token Q, scaled (H, N, dh)


def image_side(transformer, image: torch.Tensor, pe: torch.Tensor) -> ImageSide:
    """Flatten (b, C, h, w) image features (+ dense prompt) and their (1, C, h, w)
    positional encoding; with b == 1 precompute the first block's projections of the image."""
    keys = image.flatten(2).transpose(1, 2).contiguous()
    pe = pe.flatten(2).transpose(1, 2).contiguous()
    kpe = keys + pe
    t2i = i2t_q = None
    if keys.shape[0] == 1:
        first = transformer.layers[0]
        a = first.cross_attn_token_to_image
        h = a.num_attention_heads
        t2i = (_heads(a.k_proj(kpe), h)[0].contiguous(), _heads(a.v_proj(keys), h)[0].contiguous())
        a = first.cross_attn_image_to_token
        i2t_q = (_heads(a.q_proj(kpe), a.num_attention_heads)[0] * a.scaling).contiguous()
    return ImageSide(keys, pe, kpe, t2i, i2t_q)


class SideCache:
    """ImageSide per embedding object, dropped when the embedding is garbage-collected
    (kept off Embedding.extra so that the embedding's contents stay what embed() made)."""

    def __init__(self):
        self._items: dict[int, tuple[weakref.ref, object]] = {}

    def get(self, owner, make):
        key = id(owner)
        hit = self._items.get(key)
        if hit is not None and hit[0]() is owner:
            return hit[1]
        value = make()
        self._items[key] = (weakref.ref(owner), value)
        weakref.finalize(owner, self._items.pop, key, None)
        return value


def _token_to_image(attn, q_in, kpe, keys, pre=None):
    """Tokens (B, T, C) attending to image positions (b, N, C): (B, T, C)."""
    h, scaling = attn.num_attention_heads, attn.scaling
    q = _heads(attn.q_proj(q_in), h) * scaling  # (B, H, T, dh)
    b, _, t, dh = q.shape
    if pre is not None:  # shared image: projections of the image were computed once
        k, v = pre  # (H, N, dh)
        qh = q.transpose(0, 1).reshape(h, b * t, dh)
        a = torch.bmm(qh, k.transpose(1, 2)).softmax(-1)  # (H, BT, N)
        o = torch.bmm(a, v).view(h, b, t, dh).permute(1, 2, 0, 3)
        return _out_proj(attn)(o.reshape(b, t, h * dh))
    if kpe.shape[0] != b:
        kpe, keys = kpe.expand(b, -1, -1), keys.expand(b, -1, -1)
    c = keys.shape[-1]
    if h * t < attn.k_proj.out_features:
        # project the tokens back instead of the N positions forward
        wk = attn.k_proj.weight.view(h, dh, c)
        qt = torch.einsum("bhtd,hdc->bhtc", q, wk).reshape(b, h * t, c)
        bias = torch.einsum("bhtd,hd->bht", q, attn.k_proj.bias.view(h, dh)).reshape(b, h * t, 1)
        a = torch.baddbmm(bias, qt, kpe.transpose(1, 2)).softmax(-1)  # (B, HT, N)
        ctx = torch.bmm(a, keys).view(b, h, t, c)  # rows of a sum to one: bias passes through
        wv = attn.v_proj.weight.view(h, dh, c)
        o = torch.einsum("bhtc,hdc->bthd", ctx, wv) + attn.v_proj.bias.view(h, dh)
        return _out_proj(attn)(o.reshape(b, t, h * dh))
    k = _heads(attn.k_proj(kpe), h)
    v = _heads(attn.v_proj(keys), h)
    o = (q @ k.transpose(2, 3)).softmax(-1) @ v
    return _out_proj(attn)(o.transpose(1, 2).reshape(b, t, h * dh))


def _image_to_token(attn, kpe, k_in, v_in, pre_q=None):
    """Image positions (b, N, C) attending to tokens (B, T, C): (B, N, C)."""
    h, scaling = attn.num_attention_heads, attn.scaling
    k = _heads(attn.k_proj(k_in), h)  # (B, H, T, dh)
    v = _heads(attn.v_proj(v_in), h)
    b, _, t, dh = k.shape
    out = _out_proj(attn)
    c = out.out_features
    # out_proj(A @ V) = A @ (V @ W_out^T) + b_out, summed over heads
    u = torch.einsum("bhtd,chd->bhtc", v, out.weight.view(c, h, dh)).reshape(b, h * t, c)
    n = kpe.shape[1]
    if pre_q is not None:  # shared image: its query projection was computed once
        kh = k.permute(1, 3, 0, 2).reshape(h, dh, b * t)
        s = torch.bmm(pre_q, kh).view(h, n, b, t).softmax(-1)
        a = s.permute(2, 1, 0, 3).reshape(b, n, h * t)
    else:
        if kpe.shape[0] != b:
            kpe = kpe.expand(b, -1, -1)
        wq = attn.q_proj.weight.view(h, dh, -1)
        ks = k * scaling
        kt = torch.einsum("bhtd,hdc->bhtc", ks, wq).reshape(b, h * t, -1)
        bias = torch.einsum("bhtd,hd->bht", ks, attn.q_proj.bias.view(h, dh)).reshape(b, 1, h * t)
        s = torch.baddbmm(bias, kpe, kt.transpose(1, 2))  # (B, N, HT)
        a = s.view(b, n, h, t).softmax(-1).view(b, n, h * t)
    return torch.baddbmm(out.bias, a, u)


def two_way(transformer, tokens: torch.Tensor, side: ImageSide):
    """The two-way transformer for tokens (B, T, C) against one image side: returns
    (queries (B, T, C), keys (B, N, C)), equal to the transformers module's output."""
    qpe = tokens
    queries = tokens
    keys, kpe = side.keys, side.kpe
    for i, layer in enumerate(transformer.layers):
        shared = i == 0 and side.t2i is not None
        if layer.skip_first_layer_pe:
            queries = layer.self_attn(query=queries[:, None], key=queries[:, None],
                                      value=queries[:, None])[0][:, 0]
        else:
            q = (queries + qpe)[:, None]
            queries = queries + layer.self_attn(query=q, key=q, value=queries[:, None])[0][:, 0]
        queries = layer.layer_norm1(queries)
        out = _token_to_image(layer.cross_attn_token_to_image, queries + qpe, kpe, keys,
                              side.t2i if shared else None)
        queries = layer.layer_norm2(queries + out)
        queries = layer.layer_norm3(queries + layer.mlp(queries))
        upd = _image_to_token(layer.cross_attn_image_to_token, kpe, queries + qpe, queries,
                              side.i2t_q if shared else None)
        keys = layer.layer_norm4(upd.add_(keys))
        kpe = keys + side.pe
    out = _token_to_image(transformer.final_attn_token_to_image, queries + qpe, kpe, keys)
    queries = transformer.layer_norm_final_attn(queries + out)
    return queries, keys


# ---------------------------------------------------------------------------------------------
# Mask head


def _convt_matrix(conv) -> torch.Tensor:
    """A 2x2 stride-2 ConvTranspose2d as a (Cin, 2 * 2 * Cout) matrix, outputs (a, b, Cout)."""
    w = conv.weight  # (Cin, Cout, 2, 2)
    return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1).contiguous()


@dataclass
class MaskHead:
    """The mask head's weights in the layout of upscale(); optional high-res skip features
    (SAM 2) already in that layout."""

    w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor
    norm: torch.nn.Module
    act: torch.nn.Module
    s1: torch.Tensor | None = None  # (1, h, w, 2, 2, C1)
    s0: torch.Tensor | None = None  # (1, h, w, 2, 2, 2, 2, C2)


def mask_head(dec, feat_s0=None, feat_s1=None) -> MaskHead:
    """The upscaling weights of a SAM-family mask decoder; feat_s0 (1, C2, 4h, 4w) and
    feat_s1 (1, C1, 2h, 2w) are SAM 2's high-resolution features."""
    s0 = s1 = None
    if feat_s1 is not None:
        _, c1, hh, ww = feat_s1.shape
        s1 = feat_s1.view(1, c1, hh // 2, 2, ww // 2, 2).permute(0, 2, 4, 3, 5, 1).contiguous()
        s1 = s1 + dec.upscale_conv1.bias
        _, c2, hh, ww = feat_s0.shape
        s0 = feat_s0.view(1, c2, hh // 4, 2, 2, ww // 4, 2, 2).permute(0, 2, 5, 3, 6, 4, 7, 1)
        s0 = s0.contiguous() + dec.upscale_conv2.bias
    return MaskHead(_convt_matrix(dec.upscale_conv1), dec.upscale_conv1.bias,
                    _convt_matrix(dec.upscale_conv2), dec.upscale_conv2.bias,
                    dec.upscale_layer_norm, dec.activation, s1, s0)


def upscaled_embedding(head: MaskHead, keys: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """The decoder's upscaled embedding of keys (b, N, C), channels-last in the blocked order
    (b, h, w, 2, 2, 2, 2, C2): pixel (4i + 2a + c, 4j + 2b + d) is [., i, j, a, b, c, d, :]."""
    h, w = hw
    b = keys.shape[0]
    y = keys @ head.w1  # (b, N, 4 C1)
    y = y.view(b, h, w, 2, 2, -1)
    y = y + (head.s1 if head.s1 is not None else head.b1)
    norm = head.norm
    y = head.act(F.layer_norm(y, norm.normalized_shape, norm.weight, norm.bias, norm.eps))
    z = y.view(b, h * w * 4, -1) @ head.w2  # (b, 4hw, 4 C2)
    z = z.view(b, h, w, 2, 2, 2, 2, -1)
    if head.s0 is not None:
        z += head.s0
    else:
        z += head.b2
    return head.act(z)


def blocked_to_image(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """(b, h, w, 2, 2, 2, 2, K) blocked layout -> (b, K, 4h, 4w)."""
    h, w = hw
    b, k = x.shape[0], x.shape[-1]
    return x.permute(0, 7, 1, 3, 5, 2, 4, 6).reshape(b, k, 4 * h, 4 * w)


def mask_logits(head: MaskHead, keys: torch.Tensor, hyper: torch.Tensor,
                hw: tuple[int, int]) -> torch.Tensor:
    """Logits (b, M, 4h, 4w) of hypernetwork weights hyper (b, M, C2) on keys (b, N, C)."""
    outs = []
    for s in range(0, keys.shape[0], _UPSCALE_CHUNK):
        up = upscaled_embedding(head, keys[s:s + _UPSCALE_CHUNK], hw)
        hy = hyper[s:s + _UPSCALE_CHUNK]
        m = up.view(up.shape[0], -1, up.shape[-1]) @ hy.transpose(1, 2)  # (b, P, M)
        outs.append(blocked_to_image(m.view(*up.shape[:-1], -1), hw))
    return torch.cat(outs)
