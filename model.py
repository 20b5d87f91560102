"""
TarFlow (the forward model F: data -> noise) and BiFlow (a learned, non-causal reverse model
G ~ F^-1: noise -> data) in one file. No file I/O beyond state dicts and no distributed code:
train.py, sample.py and bench.py drive this.

    from model import PRESETS, TarFlow, ReverseModel, reverse_config_for
    flow = TarFlow(PRESETS['cpu'])                  # F in the papers
    z, logdet, traj = flow(x, y)                    # x (B, 3, H, W) noised, in [-1, 1]; z (B, N, d)
    loss = flow.nll(x, y).mean()                    # exact negative log-likelihood, nats per dim
    img = flow.sample(labels, guidance=1.0, denoise=True)  # exact inverse, then Tweedie denoising
    G = ReverseModel(reverse_config_for(flow.cfg))  # G ~ F^-1 by reverse_loss; G.decode(z, y, w)

Papers: TarFlow, "Normalizing Flows are Capable Generative Models" (Zhai et al., ICML 2025);
BiFlow, "Bidirectional Normalizing Flow: From Data to Noise and Back" (Lu et al., 2025).
"""
import contextlib
import math
import time
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

# -----------------------------------------------------------------------------
# Configs and presets


class TokenGeometry:
    """Image <-> token sizes, derived in one place for both configs:
    N tokens of d = C*P*P values (P = patch_size)."""

    @property
    def token_dim(self):
        return self.in_channels * self.patch_size ** 2

    @property
    def num_tokens(self):
        return (self.img_size // self.patch_size) ** 2


@dataclass
class FlowConfig(TokenGeometry):
    """The forward model. Names follow the paper's [P-Ch-T-K-sigma] table."""
    img_size: int = 16
    in_channels: int = 3
    patch_size: int = 2         # P
    channels: int = 128         # Ch: transformer width D
    num_blocks: int = 4         # T: autoregressive flows, alternating token order
    layers_per_block: int = 4   # K: causal transformer layers in each flow
    head_dim: int = 64
    num_classes: int = 10       # 0 = unconditional
    noise_std: float = 0.05     # sigma of the Gaussian training noise; Tweedie denoising needs it
    norm_clip: float = 0.0      # > 0: alpha, mu = clip*tanh(./clip), BiFlow's forward norm control;
                                # 0 = TarFlow exactly


@dataclass
class ReverseConfig(TokenGeometry):
    """The reverse model G of BiFlow.
    Geometry and classes are copied from the forward model it inverts."""
    img_size: int = 16
    in_channels: int = 3
    patch_size: int = 2
    num_classes: int = 10
    num_blocks: int = 4         # one layer group (and one alignment head) per forward flow block
    channels: int = 128
    layers_per_block: int = 2   # transformer layers in each group
    denoise_layers: int = 2     # extra block that maps noisy x to clean x (learned denoising)
    head_dim: int = 64
    # 'hidden' (BiFlow, Eq. 2) | 'distill' (hidden states forced to token space) | 'naive'
    align: str = 'hidden'
    # 'learned' (extra block, clean target) | 'score' (Tweedie with F at sampling) | 'none'
    denoise: str = 'learned'
    # reverse-side norm control: compare states after dividing by the target's RMS
    norm: bool = True
    # 'train': w is an input, one pass gives the guided sample (Eq. 5) | 'inference'
    guidance_mode: str = 'train'


def config_from_dict(cls, cfg_dict):
    """Rebuild a dataclass config from the plain dict stored in a checkpoint;
    unknown keys are an error."""
    names = {f.name for f in fields(cls)}
    unknown = set(cfg_dict) - names
    if unknown:
        raise ValueError(f'{cls.__name__}: unknown config keys {sorted(unknown)}')
    return cls(**cfg_dict)


# The seed's ImageNet 64 table [P-Ch-T-K-sigma] and the other reference runs, plus a preset that
# trains on a CPU. _IN: T = K = 8 in every paper run.
_IN = dict(num_blocks=8, layers_per_block=8, head_dim=64, num_classes=1000)
_LATENT = dict(img_size=32, in_channels=4, patch_size=2, num_blocks=8, head_dim=64,
               num_classes=1000, noise_std=0.3, norm_clip=4.0)
PRESETS = {
    # minutes on a laptop CPU; norm control on, as the two-stage BiFlow recipe
    'cpu': FlowConfig(img_size=16, patch_size=2, channels=96, num_blocks=4, layers_per_block=2,
                      head_dim=32, num_classes=10, noise_std=0.05, norm_clip=4.0),
    # 2-768-8-8, FID 2.90
    'imagenet64': FlowConfig(img_size=64, patch_size=2, channels=768, noise_std=0.05, **_IN),
    # FID 2.66
    'imagenet64-1024': FlowConfig(img_size=64, patch_size=2, channels=1024, noise_std=0.05, **_IN),
    # FID 3.99
    'imagenet64-p4': FlowConfig(img_size=64, patch_size=4, channels=1024, noise_std=0.05, **_IN),
    # 4-1024-8-8
    'imagenet128': FlowConfig(img_size=128, patch_size=4, channels=1024, noise_std=0.15, **_IN),
    'afhq256': FlowConfig(**{**_IN, 'num_classes': 3}, img_size=256, patch_size=8, channels=768,
                          noise_std=0.07),   # 8-768-8-8-0.07 (Apple's released weights)
    # BiFlow's setting: ImageNet 256 as SD-VAE latents (4 x 32 x 32, normalised per channel; see
    # vae.py), patch 2 -> 256 tokens of 16 values. Sizes hit the paper's parameter counts (README):
    # B = width 768 with T*K = 8*2 layers, XL = width 1152 with 8*5. Sigma 0.3 is STARFlow's latent
    # noise, norm control is BiFlow's stage-1 recipe (the paper gives neither value).
    'itarflow-b2': FlowConfig(**_LATENT, channels=768, layers_per_block=2),     # 121M (paper: 120M)
    'itarflow-xl2': FlowConfig(**_LATENT, channels=1152, layers_per_block=5),   # 650M (paper: 690M)
}
# Reverse models by the same names. The CPU one has its forward model's size (0.9M); the pixel ones
# follow BiFlow-B (width 768, 12 heads) with one 2-layer group per forward block plus a 2-layer
# denoiser (choices, see README). BiFlow-B/2 is DiT-B/2's 12 layers: one per forward block plus a
# 4-layer denoiser, 130M (paper: 133M); the latent forward presets name it as their reverse model.
REVERSE_PRESETS = {'cpu': dict(channels=96, layers_per_block=1, denoise_layers=1, head_dim=32),
                   'biflow-b2': dict(channels=768, layers_per_block=1, denoise_layers=4)}
REVERSE_PRESETS['itarflow-b2'] = REVERSE_PRESETS['itarflow-xl2'] = REVERSE_PRESETS['biflow-b2']
# The papers' names and parameter counts of the models these presets build, printed beside ours
# when a run starts.
PAPER_MODELS = {('forward', 'itarflow-b2'): ('iTARFlow-B/2', 120e6),
                ('forward', 'itarflow-xl2'): ('iTARFlow-XL/2', 690e6),
                **{('reverse', preset): ('BiFlow-B/2', 133e6)
                   for preset in ('biflow-b2', 'itarflow-b2', 'itarflow-xl2')}}
for _name in PRESETS:
    REVERSE_PRESETS.setdefault(_name, dict(channels=768, layers_per_block=2, denoise_layers=2))


def reverse_config_for(fcfg: FlowConfig, preset: str = 'cpu', **overrides) -> ReverseConfig:
    """A reverse config whose geometry matches the forward model fcfg."""
    kw = dict(REVERSE_PRESETS[preset])
    kw.update(img_size=fcfg.img_size, in_channels=fcfg.in_channels, patch_size=fcfg.patch_size,
              num_classes=fcfg.num_classes, num_blocks=fcfg.num_blocks)
    kw.update(overrides)
    return ReverseConfig(**kw)


# -----------------------------------------------------------------------------
# Transformer pieces, shared by both models


def patchify(x, patch):
    """(B, C, H, W) -> (B, N, C*patch*patch) in unfold order:
    channel-major inside a patch, raster order over patches."""
    return F.unfold(x, patch, stride=patch).transpose(1, 2)


def unpatchify(tokens, patch, size):
    """Inverse of patchify: (B, N, C*patch*patch) -> (B, C, H, W)."""
    return F.fold(tokens.transpose(1, 2), size, patch, stride=patch)


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in fp32 (also under bf16 autocast), returned in the input's dtype."""

    def forward(self, h):
        weight = None if self.weight is None else f32(self.weight)
        bias = None if self.bias is None else f32(self.bias)
        return F.layer_norm(f32(h), self.normalized_shape, weight, bias, self.eps).type_as(h)


def f32(tensor):
    """Upcast bf16/fp16 to fp32 for the flow's critical math; fp32 and float64 pass unchanged."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def modulate(h, shift, scale):
    """adaLN: h * (1 + scale) + shift, with (B, 1, D) modulation broadcast over tokens."""
    return h * (1 + scale) + shift


class Attention(nn.Module):
    """Pre-norm multi-head self-attention. Key names match Apple's ml-tarflow (norm, qkv, proj)."""

    def __init__(self, dim, head_dim):
        super().__init__()
        assert dim % head_dim == 0, f'width {dim} is not a multiple of head_dim {head_dim}'
        self.norm = LayerNorm32(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.num_heads, self.head_dim = dim // head_dim, head_dim

    def forward(self, h, causal=False, temp=None, mod=None):
        """h (B, N, D). temp (B,) scales the logits by 1/temp per sample
        (TarFlow's attention-temperature guidance).
        mod: adaLN (shift, scale) applied after the norm (the reverse model's conditioning)."""
        B, N, D = h.shape
        hn = self.norm(h)
        if mod is not None:
            hn = modulate(hn, *mod)
        qkv = self.qkv(hn).reshape(B, N, 3 * self.num_heads, self.head_dim).transpose(1, 2)
        q, k, v = qkv.chunk(3, dim=1)
        if temp is not None:
            q = q / temp.view(B, 1, 1, 1).to(q.dtype)
        # (B, H, N, hd); flash/efficient kernels on GPU
        o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.proj(o.transpose(1, 2).reshape(B, N, D))


class MLP(nn.Module):
    """Pre-norm MLP, ratio 4, exact GELU. Key names match ml-tarflow (norm, main.0, main.2)."""

    def __init__(self, dim, ratio=4):
        super().__init__()
        self.norm = LayerNorm32(dim)
        self.main = nn.Sequential(nn.Linear(dim, ratio * dim), nn.GELU(),
                                  nn.Linear(ratio * dim, dim))

    def forward(self, h, mod=None):
        hn = self.norm(h)
        return self.main(hn if mod is None else modulate(hn, *mod))


class AttentionBlock(nn.Module):
    """One transformer layer of a TarFlow block (causal, no conditioning inside)."""

    def __init__(self, dim, head_dim):
        super().__init__()
        self.attention = Attention(dim, head_dim)
        self.mlp = MLP(dim)

    def forward(self, h, temp=None):
        h = h + self.attention(h, causal=True, temp=temp)
        return h + self.mlp(h)


# -----------------------------------------------------------------------------
# The forward model: TarFlow


class _CachedLayer(NamedTuple):
    """One causal layer as the token-by-token inverse uses it: its modules,
    its preallocated KV cache k, v (S*B, H, N, hd) and views of it (k_at[i] writes position i,
    k_upto[i] reads positions 0..i)."""
    norm1: nn.Module
    qkv: nn.Module
    proj: nn.Module
    norm2: nn.Module
    fc1: nn.Module
    fc2: nn.Module
    heads: int
    head_dim: int
    k: torch.Tensor
    v: torch.Tensor
    k_at: tuple
    v_at: tuple
    k_upto: list
    v_upto: list


# The parallel inverse's default tolerance on the change per pass. On the CPU preset's trained F at
# w = 2, the images' largest difference from the sequential inverse's came out about equal to it
# (plain Jacobi in all 4 flows: 9.5e-4 at 1e-3, 2.9e-3 at 3e-3): half the 1e-3 target.
JACOBI_TOL = 5e-4


class InverseInfo(NamedTuple):
    """What one flow's parallel inverse did: passes (B,) per sample, summed over segments (a
    sequential flow counts its N-1 steps); fallbacks, the samples a non-finite pass sent to the
    sequential inverse; changes, the largest change over the batch in each pass, in order (the
    convergence picture)."""
    passes: torch.Tensor
    fallbacks: int
    changes: list


class MetaBlock(nn.Module):
    """One autoregressive affine flow: z_i = (x_i - mu(x_<i)) * exp(-alpha(x_<i)), z_0 = x_0,
    in its own token order."""

    def __init__(self, cfg: FlowConfig, flip: bool):
        super().__init__()
        D, d, N = cfg.channels, cfg.token_dim, cfg.num_tokens
        self.flip, self.clip = flip, cfg.norm_clip
        self.proj_in = nn.Linear(d, D)
        self.pos_embed = nn.Parameter(torch.randn(N, D) * 1e-2)
        if cfg.num_classes:
            self.class_embed = nn.Parameter(torch.randn(cfg.num_classes, 1, D) * 1e-2)
        self.attn_blocks = nn.ModuleList(AttentionBlock(D, cfg.head_dim)
                                         for _ in range(cfg.layers_per_block))
        self.proj_out = nn.Linear(D, 2 * d)
        # as TarFlow: each flow starts as a per-channel affine map (bias kept)
        self.proj_out.weight.data.zero_()

    def permute(self, x, dim=1):
        """Identity for even blocks, reversed token order for odd ones (its own inverse)."""
        return x.flip(dim) if self.flip else x

    def condition(self, y):
        """Class embedding added to every token: (B, 1, D).
        Label -1 (dropped) or y=None uses the mean embedding."""
        if not hasattr(self, 'class_embed'):
            return 0.
        null = self.class_embed.mean(0, keepdim=True)  # (1, 1, D)
        if y is None:
            return null
        return torch.where((y < 0).view(-1, 1, 1), null, self.class_embed[y.clamp(min=0)])

    def affine(self, h):
        """Split the output projection into (alpha, mu) in fp32,
        with the optional norm control clip*tanh(./clip)."""
        alpha, mu = f32(h).chunk(2, dim=-1)
        if self.clip > 0:
            alpha, mu = (self.clip * torch.tanh(alpha / self.clip),
                         self.clip * torch.tanh(mu / self.clip))
        return alpha, mu

    def params(self, xp, y=None, temp=None):
        """alpha, mu (B, N, d) for every token of xp (already in this block's order),
        in parallel."""
        # (B, N, D); pos moves with its patch
        h = self.proj_in(xp) + self.permute(self.pos_embed, dim=0) + self.condition(y)
        for layer in self.attn_blocks:
            h = layer(h, temp=temp)
        h = self.proj_out(h)                            # (B, N, 2d): output i predicts token i+1
        # shift: token i depends on tokens < i only
        h = torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], dim=1)
        return self.affine(h)

    def forward(self, x, y=None, temp=None):
        """x (B, N, d) in raster order -> z (B, N, d) in raster order and log|det dz/dx| (B,),
        all in parallel."""
        xp = self.permute(x)
        alpha, mu = self.params(xp, y, temp)
        z = (f32(xp) - mu) * torch.exp(-alpha)
        return self.permute(z), -alpha.sum(dim=(1, 2))

    @torch.no_grad()
    def reverse_reference(self, z, y=None, guidance=0.0, ramp=False, attn_temp=1.0):
        """The exact inverse as written down, and as Apple's ml-tarflow runs it: token i+1 of the
        permuted x is x_{i+1} = z_{i+1} * exp(alpha_i) + mu_i, with (alpha, mu) from the causal
        layers on tokens 0..i, each layer keeping its keys and values in Python lists
        re-concatenated at every token. With guidance the conditional and the unconditional stream
        (null label, attention temperature attn_temp) are two passes with their own caches, and
        alpha, mu are extrapolated by gscale: alpha + gscale (alpha - alpha_uncond), the same for
        mu, with gscale = w, or w (i+1)/(N-1) when ramped. z (B, N, d) -> x (B, N, d). `reverse` is
        the fast form of the same math."""
        B, N, _ = z.shape
        x = self.permute(z.float()).clone()
        pos = self.permute(self.pos_embed, dim=0)
        streams = [(self.condition(y), None)]
        if guidance:
            streams.append((self.condition(None), None if attn_temp == 1.0 else attn_temp))
        caches = [[([], []) for _ in self.attn_blocks] for _ in streams]
        for i in range(N - 1):
            outs = []
            for (cond, temp), cache in zip(streams, caches):
                h = self.proj_in(x[:, i:i + 1]) + pos[i:i + 1] + cond   # (B, 1, D)
                for layer, (ks, vs) in zip(self.attn_blocks, cache):
                    att = layer.attention
                    qkv = att.qkv(att.norm(h)).reshape(B, 1, 3 * att.num_heads, att.head_dim)
                    qkv = qkv.transpose(1, 2)
                    q, k, v = qkv.chunk(3, 1)   # (B, heads, 1, head_dim) each
                    q = q if temp is None else q / temp
                    ks.append(k)
                    vs.append(v)
                    # 1 query: no mask
                    o = F.scaled_dot_product_attention(q, torch.cat(ks, 2), torch.cat(vs, 2))
                    h = h + att.proj(o.transpose(1, 2).reshape(B, 1, -1))
                    h = h + layer.mlp(h)
                outs.append(self.affine(self.proj_out(h)))
            alpha, mu = outs[0]
            if guidance:
                gscale = guidance * (i + 1) / (N - 1) if ramp else guidance
                alpha = alpha + gscale * (alpha - outs[1][0])
                mu = mu + gscale * (mu - outs[1][1])
            x[:, i + 1:i + 2] = x[:, i + 1:i + 2] * torch.exp(alpha) + mu
        return self.permute(x)

    @torch.no_grad()
    def reverse(self, z, y=None, guidance=0.0, ramp=False, attn_temp=1.0, kv_dtype=None,
                static=False):
        """Exact inverse, token by token with a KV cache: reverse_reference's math, made fast (a
        test keeps the two equal). With guidance, the conditional and unconditional streams run as
        one batch of 2B. The step is latency-bound (one token, tiny matrices), so it calls the
        functional ops directly on weights looked up once, keeps activations 2-D, and reads a
        preallocated cache through views made once per block. kv_dtype: the cache's dtype (default
        z's, fp32); bfloat16 halves the cache (24 -> 12 GiB at imagenet64, batch 256 with CFG) and
        the attention reads, while alpha, mu and the recursion stay fp32. static: every token runs
        the same fixed-shape step (the whole cache, a mask row for positions <= i, the position as a
        tensor), the same math; on CUDA that step is captured once in a CUDA graph and replayed,
        which removes the ~100 kernel launches per token that bound the inverse at small batch."""
        B, N, _ = z.shape
        kv_dtype = kv_dtype or z.dtype
        D = self.proj_in.out_features
        guided = guidance != 0
        S = 2 if guided else 1
        if guided and y is not None:
            y = torch.cat([y, torch.full_like(y, -1)])
        # pos moves with patch
        pcs = (self.permute(self.pos_embed, dim=0) + self.condition(y)).expand(S * B, N, D)
        pcs = pcs.reshape(S, B, N, D)                   # position + class, per stream
        pc = pcs.unbind(2)                              # N x (S, B, D)
        qscale = None
        if guided and attn_temp != 1.0:
            qscale = (torch.tensor([1.0, 1 / attn_temp], device=z.device)
                      .repeat_interleave(B).view(S * B, 1, 1, 1))
        layers = []
        for layer in self.attn_blocks:
            att, mlp = layer.attention, layer.mlp
            # zeros, not empty: the static step reads the whole
            # cache, and masked garbage could be NaN (0 * NaN)
            k, v = (z.new_zeros(S * B, att.num_heads, N, att.head_dim, dtype=kv_dtype)
                    for _ in range(2))
            layers.append(_CachedLayer(att.norm, att.qkv, att.proj, mlp.norm, mlp.main[0],
                                       mlp.main[2], att.num_heads, att.head_dim, k, v,
                                       k.unbind(2), v.unbind(2),
                                       [k[:, :, :j + 1] for j in range(N)],
                                       [v[:, :, :j + 1] for j in range(N)]))
        clip = self.clip
        w_out, b_out = ((self.proj_out.weight / clip, self.proj_out.bias / clip) if clip > 0
                        else (self.proj_out.weight, self.proj_out.bias))
        # N x (B, d): token i is final once step i-1 has written it
        x = list(f32(self.permute(z)).unbind(1))
        step = self._static_step(layers, pcs, w_out, b_out, qscale, kv_dtype) if static else None
        for i in range(N - 1):
            out = (step(x[i], i) if step
                   else self._token_step(layers, x[i], pc[i], i, w_out, b_out, qscale, kv_dtype))
            if guided:
                # the ramp grows linearly over positions
                gscale = guidance * (i + 1) / (N - 1) if ramp else guidance
                oc, ou = out.chunk(2)
                out = torch.lerp(ou, oc, 1 + gscale)   # oc + gscale * (oc - ou), on alpha and mu
            alpha, mu = out.chunk(2, dim=-1)
            x[i + 1] = torch.addcmul(mu, x[i + 1], alpha.exp())
        return self.permute(torch.stack(x, 1))

    def _token_step(self, layers, xi, pci, i, w_out, b_out, qscale, kv_dtype, mask=None):
        """(alpha, mu) of token i+1 from token i xi (B, d) and its position + class pci (S, B, D):
        the causal layers on one token, writing its keys and values at position i. Sliced (i an
        int): attention reads the cache up to i. Static (i a 1-element tensor, mask (1, 1, 1, N)
        True up to i): it reads the whole cache through the mask, so every token runs on the same
        shapes. -> (S*B, 2d) in fp32."""
        D, clip = self.proj_in.out_features, self.clip
        h = (F.linear(xi, self.proj_in.weight, self.proj_in.bias) + pci).reshape(-1, D)   # (S*B, D)
        for layer in layers:
            hn = F.layer_norm(h, (D,), layer.norm1.weight, layer.norm1.bias, layer.norm1.eps)
            q, k, v = F.linear(hn, layer.qkv.weight, layer.qkv.bias).view(
                len(h), 3, layer.heads, layer.head_dim).unbind(1)   # each (S*B, H, hd)
            q = (q.unsqueeze(2) if qscale is None else q.unsqueeze(2) * qscale).to(kv_dtype)
            if mask is None:
                layer.k_at[i].copy_(k)
                layer.v_at[i].copy_(v)
                # token i attends to <= i
                att = F.scaled_dot_product_attention(q, layer.k_upto[i], layer.v_upto[i])
            else:
                layer.k.index_copy_(2, i, k.unsqueeze(2).to(kv_dtype))
                layer.v.index_copy_(2, i, v.unsqueeze(2).to(kv_dtype))
                # the same, by the mask
                att = F.scaled_dot_product_attention(q, layer.k, layer.v, attn_mask=mask)
            h = h + F.linear(att.to(h.dtype).view(len(h), D), layer.proj.weight, layer.proj.bias)
            u = F.layer_norm(h, (D,), layer.norm2.weight, layer.norm2.bias, layer.norm2.eps)
            ff = F.gelu(F.linear(u, layer.fc1.weight, layer.fc1.bias))
            h = h + F.linear(ff, layer.fc2.weight, layer.fc2.bias)
        out = f32(F.linear(h, w_out, b_out))                 # (S*B, 2d): alpha, mu of token i+1
        return out.tanh_().mul_(clip) if clip > 0 else out   # clip*tanh(./clip), 1/clip folded in

    def _static_step(self, layers, pcs, w_out, b_out, qscale, kv_dtype):
        """step(xi, i) -> (S*B, 2d): _token_step on fixed shapes, the position a device tensor. On
        CUDA the step is captured once in a CUDA graph (after a warm-up on a side stream, as graphs
        need) and replayed per token."""
        N, dev = pcs.shape[2], pcs.device
        pos = torch.zeros(1, dtype=torch.long, device=dev)   # the token's position, as a tensor
        arange = torch.arange(N, device=dev)

        def run(xi):
            mask = (arange <= pos).view(1, 1, 1, N)                     # attend to positions <= i
            return self._token_step(layers, xi, pcs.index_select(2, pos).squeeze(2), pos,
                                    w_out, b_out, qscale, kv_dtype, mask)
        if dev.type != 'cuda':
            return lambda xi, i: (pos.fill_(i), run(xi))[1]
        static_x = torch.zeros(pcs.shape[1], w_out.shape[0] // 2, device=dev)   # (B, d)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):   # warm-up: writes position 0, rewritten later
            for _ in range(2):
                run(static_x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = run(static_x)

        def replay(xi, i):
            static_x.copy_(xi)
            pos.fill_(i)
            graph.replay()
            # read by kernels queued before the next replay overwrites it (one stream)
            return static_out
        return replay

    # ----------------------------------------------------------------------------------------------
    # The parallel exact inverse: reverse()'s alpha, mu, solved as a fixed point by Jacobi passes

    @torch.no_grad()
    def reverse_parallel(self, z, y=None, guidance=0.0, ramp=False, attn_temp=1.0, segment=None,
                         tol=JACOBI_TOL, max_passes=None, init=None, cached=True, deadline=None):
        """Exact inverse as the fixed point x_j = mu_j(x_<j) + exp(alpha_j(x_<j)) * z_j of all
        tokens at once (GS-Jacobi, Liu & Qin 2025, arXiv 2505.12849): each pass computes alpha, mu
        of every unsolved token from the last iterate, with the guided alpha, mu, fp32 recursion and
        norm control of reverse(). Token 0 is exact from the start and one more token after each
        pass, so a segment of L tokens is exact after at most L passes.
        segment: tokens solved together (None: all, plain Jacobi); shorter segments run in order,
            each attending to the finished ones through a KV cache (Gauss-Seidel across, Jacobi
            inside); 1 is reverse() itself.
        tol: a sample stops updating in a segment once its largest change in a pass is <= tol
            (0: only at the fixed point or the cap).
        max_passes: cap per segment (at most its length; 0 returns the initial guess).
        init: a guess of the output (B, N, d) in raster order (None: z).
        cached: pass k starts at token k, reading the exact tokens before it from a KV cache (fewer
            FLOPs per pass, the same result); False: every pass covers its whole segment.
        deadline: a time.perf_counter() value past which a pass raises TimeoutError (the planner's
            cut-off for a strategy already slower than the best).
        A pass giving a sample non-finite values leaves it untouched, and that sample is redone by
        reverse() afterwards (InverseInfo.fallbacks). -> (x (B, N, d) raster order, InverseInfo)."""
        B, N, _ = z.shape
        s = N if segment is None else int(segment)
        if s < 1 or tol < 0 or (max_passes is not None and max_passes < 0):
            raise ValueError(f'reverse_parallel: segment {segment}, tol {tol}, max_passes '
                             f'{max_passes}: need segment >= 1, tol >= 0, max_passes >= 0')
        if s == 1 and max_passes != 0:   # one token per segment, one pass each: reverse() itself
            x = self.reverse(z, y, guidance, ramp, attn_temp)
            return x, InverseInfo(torch.full((B,), N - 1, dtype=torch.long), 0, [])
        zp = f32(self.permute(z))                       # (B, N, d) in this block's order
        x = zp.clone() if init is None else f32(self.permute(init)).clone()
        x[:, 0] = zp[:, 0]                              # token 0 passes unchanged: exact at once
        streams = self._streams(y, guidance, attn_temp, B, N)
        kv_size = (streams[2] * B, N)
        cache = [[None, None, kv_size] for _ in self.attn_blocks] if cached or s < N - 1 else None
        passes = torch.zeros(B, dtype=torch.long, device=z.device)
        bad = torch.zeros(B, dtype=torch.bool, device=z.device)
        changes = []
        self._segments(x, zp, s, tol, max_passes, streams, cache, guidance, ramp, passes, bad,
                       changes, cached, deadline)
        x = self.permute(x)
        idx = bad.nonzero().squeeze(1)
        if len(idx):                                    # reverse() for the samples a pass broke
            yb = None if y is None else y[idx]
            x[idx] = self.reverse(z[idx], yb, guidance, ramp, attn_temp).to(x.dtype)
        return x, InverseInfo(passes.cpu(), len(idx), [float(change) for change in changes])

    def _segments(self, x, zp, s, tol, max_passes, streams, cache, guidance, ramp, passes, bad,
                  changes, shrink, deadline=None):
        """Fixed segments [a, a+s) in order, Jacobi passes inside each until every sample's largest
        change is <= tol or the cap (at most the segment's length, after which it is exact). After
        `done` passes, a segment's next one starts at token a+done: tokens a..a+done-1 are exact by
        then, and their keys and values, computed from exact inputs, are in the cache
        (shrink False: every pass starts at a).
        Updates x, passes, bad, changes."""
        N = x.shape[1]
        for a in range(1, N, s):                        # tokens [a, b), from inputs [a-1, b-1)
            b = min(a + s, N)
            act = (~bad).nonzero().squeeze(1)           # samples still updating in this segment
            for done in range(b - a if max_passes is None else min(max_passes, b - a)):
                if len(act) == 0:
                    break
                lo = a + done if shrink else a          # the first token not yet exact
                step, act = self._update(x, zp, act, lo, b, streams, cache, guidance, ramp, passes,
                                         bad, changes)
                act = act[(step > tol).any(1)]
                if deadline is not None and time.perf_counter() > deadline:
                    raise TimeoutError('reverse_parallel: past its deadline')

    def _update(self, x, zp, act, a, b, streams, cache, guidance, ramp, passes, bad, changes):
        """One pass over tokens [a, b) of samples act, written into x where finite; a sample with a
        non-finite value is marked bad and left as it was. -> (change (Ba', L) per token of the
        finite samples, those samples)."""
        # new (Ba, L, d)
        new = self._jacobi_pass(x, zp, act, a - 1, b - a, streams, cache, guidance, ramp)
        ok = torch.isfinite(new).flatten(1).all(1)
        step = (new - x[act, a:b]).abs().amax(-1)       # (Ba, L) largest change of each token
        x[act[ok], a:b] = new[ok]
        passes[act] += 1
        bad[act[~ok]] = True
        changes.append(step[ok].max() if ok.any() else step.new_tensor(float('nan')))
        return step[ok], act[ok]

    def _streams(self, y, guidance, attn_temp, B, N):
        """The streams reverse() runs as one batch: position + class (S*B, N, D) and the attention
        temperature per row as the factor 1/temperature on the queries (S*B,) or None.
        Guided: S = 2, rows B.. are the null label with temperature attn_temp."""
        guided = guidance != 0
        S = 2 if guided else 1
        if guided and y is not None:
            y = torch.cat([y, torch.full_like(y, -1)])
        pcs = (self.permute(self.pos_embed, dim=0) + self.condition(y)).expand(S * B, N, -1)
        temp = None
        if guided and attn_temp != 1.0:
            temp = torch.tensor([1.0, 1 / attn_temp], device=self.pos_embed.device)
            temp = temp.repeat_interleave(B)
        return pcs, temp, S

    def _jacobi_pass(self, x, zp, act, p0, L, streams, cache, guidance, ramp):
        """One Jacobi pass of samples act (Ba,) over input positions p0..p0+L-1 of the iterate x
        (B, N, d): the causal layers on those tokens (attending to positions < p0 through cache),
        then the new tokens p0+1..p0+L = mu + exp(alpha) * z with the guided alpha, mu.
        -> (Ba, L, d) fp32."""
        pcs, temp, S = streams
        B, N = x.shape[:2]
        rows = act if S == 1 else torch.cat([act, act + B])               # (S*Ba,) both streams
        full = len(act) == B                            # every sample: slices instead of gathers
        xa = x[:, p0:p0 + L] if full else x[act, p0:p0 + L]                # (Ba, L, d)
        pc = pcs[:, p0:p0 + L] if full else pcs[rows, p0:p0 + L]
        h = self.proj_in(xa).repeat(S, 1, 1) + pc                          # (S*Ba, L, D)
        for layer_idx, layer in enumerate(self.attn_blocks):
            kv = None if cache is None else cache[layer_idx]
            row_temp = None if temp is None else temp[rows]
            h = h + self._window_attention(layer.attention, h, row_temp, kv, rows, p0, full)
            h = h + layer.mlp(h)
        alpha, mu = self.affine(self.proj_out(h))   # (S*Ba, L, d), tokens p0+1..p0+L, norm control
        if S == 2:
            gscale = guidance
            if ramp:                                    # w grows linearly with the token's position
                pos = torch.arange(p0 + 1, p0 + L + 1, device=x.device, dtype=alpha.dtype)
                gscale = guidance * pos.view(L, 1) / (N - 1)
            (ac, au), (mc, mu_u) = alpha.chunk(2), mu.chunk(2)
            # cond + gscale * (cond - uncond)
            alpha, mu = torch.lerp(au, ac, 1 + gscale), torch.lerp(mu_u, mc, 1 + gscale)
        zt = zp[:, p0 + 1:p0 + L + 1] if full else zp[act, p0 + 1:p0 + L + 1]   # (Ba, L, d)
        return torch.addcmul(mu, zt, alpha.exp())

    @staticmethod
    def _window_attention(att, h, temp, kv, rows, p0, full):
        """Causal self-attention of the tokens at positions p0..p0+L-1, h (R, L, D), over positions
        <= their own. kv None: the window starts at 0 and nothing is kept.
        Else kv = [k, v, (S*B, N)]: caches (S*B, H, N, hd), made at the first call; the window's
        keys and values are written at p0.. of rows, and the attention reads positions < p0 from
        them (the finished segments)."""
        R, L, D = h.shape
        qkv = att.qkv(att.norm(h)).reshape(R, L, 3 * att.num_heads, att.head_dim)
        q, k, v = qkv.transpose(1, 2).chunk(3, dim=1)   # (R, H, L, hd) each
        if temp is not None:                            # temp holds 1/temperature
            q = q * temp.view(R, 1, 1, 1)
        if kv is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            if kv[0] is None:
                SB, N = kv[2]
                kv[0], kv[1] = (k.new_zeros(SB, att.num_heads, N, att.head_dim) for _ in range(2))
            k_cache, v_cache = kv[0], kv[1]
            if full:                                    # every row: slices, no gather
                k_cache[:, :, p0:p0 + L], v_cache[:, :, p0:p0 + L] = k, v
                keys, vals = k_cache[:, :, :p0 + L], v_cache[:, :, :p0 + L]
            else:
                k_cache[rows, :, p0:p0 + L], v_cache[rows, :, p0:p0 + L] = k, v
                keys, vals = k_cache[rows, :, :p0 + L], v_cache[rows, :, :p0 + L]
            # query i (position p0+i) sees keys j <= p0+i
            mask = torch.ones(L, p0 + L, dtype=torch.bool, device=h.device).tril(p0)
            keys, vals = keys.to(q.dtype), vals.to(q.dtype)
            o = F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask)
        return att.proj(o.transpose(1, 2).reshape(R, L, D))


# activations the denoising backward may keep per chunk: small chunks at paper scale
SCORE_BUDGET_BYTES = 8 * 2 ** 30


def score_activation_bytes(cfg: FlowConfig, checkpoint=True) -> int:
    """Bytes of activations TarFlow.score keeps for its backward, per image (fp32, frozen weights).
    Per token and causal layer: both LayerNorm inputs (2D), q, k, v (3D), the attention output (D),
    the GELU input (4D), the norms' mean and rstd (4) and the attention's log-sum-exp (one per
    head); per flow, two token-sized tensors (2d). It matches the saved tensors counted on the CPU
    (a test pins it). With checkpoint, one flow's worth plus each flow's input (T*d). The backward's
    own gradient buffers come on top: a few D-wide tensors per token, small next to K layers."""
    N, D, d, T, K = (cfg.num_tokens, cfg.channels, cfg.token_dim, cfg.num_blocks,
                     cfg.layers_per_block)
    flow = K * (10 * D + 4 + D // cfg.head_dim) + 2 * d          # floats per token kept by one flow
    return 4 * N * (flow + T * d if checkpoint else T * flow)


class TarFlow(nn.Module):
    """A stack of T autoregressive affine flows;
    block 0 is next to the data, block T-1 next to the noise."""

    def __init__(self, cfg: FlowConfig):
        super().__init__()
        assert cfg.img_size % cfg.patch_size == 0, 'img_size must be a multiple of patch_size'
        self.cfg = cfg
        self.blocks = nn.ModuleList(MetaBlock(cfg, flip=t % 2 == 1) for t in range(cfg.num_blocks))

    def forward(self, x, y=None, temp=None, checkpoint=False):
        """x (B, C, H, W) -> z (B, N, d), log|det| summed over dimensions (B,), trajectory
        [x^0, x^1, ..., z]. checkpoint: the backward recomputes each flow's activations, so it
        keeps one flow's instead of T (and the flows' inputs, which the trajectory holds anyway),
        for one more forward pass."""
        h = patchify(f32(x), self.cfg.patch_size)
        traj, logdet = [h], 0.
        for block in self.blocks:
            h, ld = (torch.utils.checkpoint.checkpoint(block, h, y, temp, use_reentrant=False)
                     if checkpoint and torch.is_grad_enabled() else block(h, y, temp))
            traj.append(h)
            logdet = logdet + ld
        return h, logdet, traj

    def nll(self, x, y=None):
        """Negative log-likelihood per dimension in nats, without the constant 0.5*log(2*pi): (B,).
        Equals TarFlow's loss 0.5*mean(z^2) - mean(logdet) when averaged over the batch."""
        z, logdet, _ = self(x, y)
        return self.nll_from(z, logdet)

    @staticmethod
    def nll_from(z, logdet):
        """nll() from the outputs of forward():
        (0.5*|z|^2 - log|det|) / dimensions, per sample (B,)."""
        return (0.5 * f32(z).pow(2).sum(dim=(1, 2)) - logdet) / z[0].numel()

    @staticmethod
    def bits_per_dim(nll):
        """Discrete bits/dim from nll(): add the Gaussian constant and log(128)
        for bins of width 2/256 in [-1, 1]."""
        return (nll + 0.5 * math.log(2 * math.pi) + math.log(128)) / math.log(2)

    @torch.no_grad()
    def reverse(self, z, y=None, guidance=0.0, ramp=False, attn_temp=1.0, kv_dtype=None,
                static=False):
        """z (B, N, d) -> the noisy image (B, C, H, W): invert block T-1 first
        (kv_dtype, static: MetaBlock.reverse)."""
        x = f32(z)
        for block in reversed(self.blocks):
            x = block.reverse(x, y, guidance, ramp, attn_temp, kv_dtype, static)
        return unpatchify(x, self.cfg.patch_size, self.cfg.img_size)

    @torch.no_grad()
    def reverse_parallel(self, z, y=None, guidance=0.0, ramp=False, attn_temp=1.0, segment=None,
                         tol=JACOBI_TOL, max_passes=None, init=None, cached=True):
        """z (B, N, d) -> (the noisy image (B, C, H, W), [InverseInfo of block t for t = 0..T-1]):
        block T-1 first, each by MetaBlock.reverse_parallel. segment: one length for every flow, or
        a sequence of T indexed by block (1: that flow sequential). init: None, or T guesses indexed
        by block (guess t of block t's output x^t, raster order; None entries start from the flow's
        input), e.g. reverse_guesses(G, ...)."""
        T = len(self.blocks)
        segs = list(segment) if isinstance(segment, (list, tuple)) else [segment] * T
        guesses = [None] * T if init is None else list(init)
        if len(segs) != T or len(guesses) != T:
            raise ValueError(f'reverse_parallel: {len(segs)} segment lengths and {len(guesses)} '
                             f'guesses for {T} flows; give one per flow')
        x, infos = f32(z), [None] * T
        for t in reversed(range(T)):
            x, infos[t] = self.blocks[t].reverse_parallel(x, y, guidance, ramp, attn_temp, segs[t],
                                                          tol, max_passes, guesses[t], cached)
        return unpatchify(x, self.cfg.patch_size, self.cfg.img_size), infos

    def score(self, x, y=None, checkpoint=True):
        """grad_x log p(x) in fp32 (autocast off): the gradient of the summed log-density, so no
        mean to undo. Only x needs grad (frozen weights keep no Linear inputs). checkpoint: each
        flow's forward runs again during backward, so the pass keeps one flow's activations instead
        of T (score_activation_bytes), for one more forward."""
        with torch.enable_grad(), torch.autocast(x.device.type, enabled=False):
            x = f32(x.detach()).requires_grad_(True)
            z, logdet, _ = self(x, y, checkpoint=checkpoint)
            logp = -0.5 * z.pow(2).sum() + logdet.sum()
            return torch.autograd.grad(logp, x)[0]

    def denoise(self, x, y=None, chunk=None, budget_bytes=SCORE_BUDGET_BYTES):
        """Tweedie / score-based denoising x + sigma^2 * grad log p(x), in chunks whose backward
        keeps at most budget_bytes of activations (a chunk of 64 at imagenet64 would keep ~120 GiB
        without checkpointing)."""
        chunk = chunk or max(1, budget_bytes // score_activation_bytes(self.cfg))
        s2 = self.cfg.noise_std ** 2
        ys = [None] * len(x.split(chunk)) if y is None else y.split(chunk)
        return torch.cat([f32(xc) + s2 * self.score(xc, yc) for xc, yc in zip(x.split(chunk), ys)])

    @torch.no_grad()
    def sample(self, y=None, n=None, guidance=0.0, ramp=False, attn_temp=1.0, denoise=True,
               generator=None, z=None, kv_dtype=None, static=False):
        """Draw z ~ N(0, I), invert exactly, optionally denoise.
        Class-conditional: pass labels y (B,)."""
        cfg = self.cfg
        if z is None:
            n = len(y) if y is not None else n
            # drawn where the generator lives (a CPU generator cannot fill a CUDA tensor),
            # then moved to the model
            z = torch.randn(n, cfg.num_tokens, cfg.token_dim, generator=generator,
                            device=None if generator is None else generator.device)
            z = z.to(next(self.parameters()).device)
        x = self.reverse(z, y, guidance, ramp, attn_temp, kv_dtype, static)
        return self.denoise(x, y) if denoise else x


# -----------------------------------------------------------------------------
# The parallel inverse's strategy: per flow, the fastest of sequential, Jacobi, segments, measured


@torch.no_grad()
def reverse_guesses(G: 'ReverseModel', z, y=None, guidance=0.0):
    """G's prediction of every flow's output, the initial guesses of TarFlow.reverse_parallel:
    [guess of x^t for t = 0..T-1] (raster order, None where G has no head for x^t). Head g is
    aligned with x^{T-1-g} (align_targets); without learned denoising G's output is the noisy x^0.
    """
    T = G.cfg.num_blocks
    train_w = G.cfg.guidance_mode == 'train'
    preds = G(z, y, torch.full((len(z),), float(guidance), device=z.device) if train_w else None,
              0.0 if train_w else guidance)
    guesses = [None] * T
    for g in range(len(G.heads)):
        guesses[T - 1 - g] = preds[g].float()
    if G.cfg.denoise != 'learned':
        guesses[0] = preds[-1].float()
    return guesses


def segment_candidates(N, shortest=8):
    """Segment lengths the planner tries: 1 (sequential) first, then N (plain Jacobi), N/2, N/4, ...
    down to `shortest` (shorter ones pay a pass's fixed cost for a few tokens)."""
    out, s = [1], N
    while s >= shortest:
        out.append(s)
        s //= 2
    return out


class FlowPlan(NamedTuple):
    """The planner's measurements of one flow: seconds and passes (mean, max over the batch) per
    segment length tried (1 = sequential), and the choice, the fastest. A strategy cut off at 1.5x
    the best time has passes None and the seconds it ran."""
    seconds: dict
    passes: dict
    choice: int


@torch.no_grad()
def plan_inverse(flow: TarFlow, z, y=None, guidance=0.0, ramp=False, attn_temp=1.0,
                 tol=JACOBI_TOL, max_passes=None, init=None, candidates=None, repeats=2):
    """Choose each flow's inverse on one batch by running every candidate segment length
    (segment_candidates) on it, `repeats` times (once, and cut off, past 1.5x the best), and keeping
    the fastest (least of its times): the passes a flow needs and the cost of a pass against a
    sequential step are both in that time, on this device at this batch. Flows are planned from T-1
    down, each on the exact (sequential) output of the one before.
    -> [FlowPlan of block t, t = 0..T-1]."""
    T, N = len(flow.blocks), flow.cfg.num_tokens
    candidates = [1] + [s for s in candidates or segment_candidates(N) if s != 1]   # 1 first
    guesses = [None] * T if init is None else init
    sync = torch.cuda.synchronize if z.is_cuda else (lambda: None)
    x, plans = f32(z), [None] * T
    for t in reversed(range(T)):
        seconds, passes = {}, {}
        for s in candidates:
            for r in range(repeats):
                if r and seconds[s] > 1.5 * min(seconds.values()):
                    break                               # a clear loser needs no second timing
                sync()
                t0 = time.perf_counter()
                best = min(seconds.values(), default=math.inf)
                try:                                    # cut off once slower than the best so far
                    out, info = flow.blocks[t].reverse_parallel(
                        x, y, guidance, ramp, attn_temp, s, tol, max_passes, guesses[t],
                        deadline=t0 + 1.5 * best if s != 1 and best < math.inf else None)
                    passes[s] = (info.passes.float().mean().item(), info.passes.max().item())
                except TimeoutError:
                    passes.setdefault(s, None)
                sync()
                seconds[s] = min(seconds.get(s, math.inf), time.perf_counter() - t0)
            if s == 1:
                exact = out
        plans[t] = FlowPlan(seconds, passes, min(seconds, key=seconds.get))
        x = exact
    return plans


class ParallelInverse:
    """TarFlow's exact inverse with a per-flow strategy: segment 'auto' plans it on the first batch
    (plan_inverse) and keeps it, else an int or one per flow. init 'G' starts each flow from a
    reverse model's prediction (reverse_guesses). Every batch's InverseInfo is kept, for
    passes_per_flow()."""

    def __init__(self, segment='auto', tol=JACOBI_TOL, max_passes=None, init='z', candidates=None):
        if init not in ('z', 'G'):
            raise ValueError(f"ParallelInverse: init {init!r}: 'z' or 'G'")
        self.segment, self.tol, self.max_passes, self.init = segment, tol, max_passes, init
        self.candidates, self.plan, self.infos = candidates, None, []

    def __call__(self, flow, z, y=None, guidance=0.0, ramp=False, attn_temp=1.0, G=None):
        """z (B, N, d) -> the noisy image (B, C, H, W).
        G: the reverse model, needed for init 'G'."""
        if self.init == 'G' and G is None:
            raise ValueError("ParallelInverse: init 'G' needs the reverse model G (a reverse ckpt)")
        guesses = reverse_guesses(G, z, y, guidance) if self.init == 'G' else None
        if self.segment == 'auto' and self.plan is None:
            self.plan = plan_inverse(flow, z, y, guidance, ramp, attn_temp, self.tol,
                                     self.max_passes, guesses, self.candidates)
        segs = [plan.choice for plan in self.plan] if self.segment == 'auto' else self.segment
        x, infos = flow.reverse_parallel(z, y, guidance, ramp, attn_temp, segs, self.tol,
                                         self.max_passes, guesses)
        self.infos.append(infos)
        return x

    def passes_per_flow(self):
        """[(mean, max) over every sample so far, fallbacks] per block t (t = 0..T-1)."""
        out = []
        for t in range(len(self.infos[0])):
            passes = torch.cat([infos[t].passes for infos in self.infos]).float()
            fallbacks = sum(infos[t].fallbacks for infos in self.infos)
            out.append((passes.mean().item(), int(passes.max().item()), fallbacks))
        return out


def load_ml_tarflow(state_dict, noise_std, norm_clip=0.0) -> TarFlow:
    """Build a TarFlow from a state dict saved by Apple's ml-tarflow, inferring the config from
    tensor shapes. noise_std has no default: the dicts do not record it and Apple's models use 0.05,
    0.07 or 0.15 (Tweedie needs it). The buffers 'var' (prior variance; all ones in the NVP models)
    and 'attn_mask' are not needed here."""
    sd = {key.removeprefix('module.'): value for key, value in state_dict.items()}
    for key in ('blocks.0.proj_in.weight', 'blocks.0.pos_embed', 'blocks.0.proj_out.weight'):
        if key not in sd:
            raise ValueError(f'not an ml-tarflow state dict: no key {key}')
        if sd[key].ndim != 2:
            raise ValueError(f'ml-tarflow state dict: {key} has shape {tuple(sd[key].shape)}, '
                             'expected a matrix')
    T = sum(1 for key in sd if key.endswith('.proj_in.weight'))
    K = sum(1 for key in sd
            if key.startswith('blocks.0.attn_blocks.') and key.endswith('.attention.qkv.weight'))
    D, d = sd['blocks.0.proj_in.weight'].shape
    N = sd['blocks.0.pos_embed'].shape[0]
    out = tuple(sd['blocks.0.proj_out.weight'].shape)
    # VP models predict mu only; anything else is a damaged (truncated, transposed) tensor
    if out == (d, D):
        raise ValueError('ml-tarflow VP models (nvp=False) are not supported: '
                         'proj_out has no log-scale rows')
    if out != (2 * d, D):
        raise ValueError(f'ml-tarflow state dict: blocks.0.proj_out.weight has shape {out}, '
                         f'expected {(2 * d, D)} (2 x token dim, width) from '
                         f'blocks.0.proj_in.weight {(D, d)}')
    if 'var' in sd and not torch.all(sd['var'] == 1):
        raise ValueError('ml-tarflow state dict has a learned prior variance (VP mode), '
                         'which is not supported')
    C = 3 if d % 3 == 0 else 1
    patch = math.isqrt(d // C)
    side = math.isqrt(N)
    ncls = sd['blocks.0.class_embed'].shape[0] if 'blocks.0.class_embed' in sd else 0
    if patch * patch * C != d or side * side != N or D % 64:
        raise ValueError(f'cannot infer an ml-tarflow config from token dim {d}, '
                         f'{N} tokens, width {D}')
    cfg = FlowConfig(img_size=side * patch, in_channels=C, patch_size=patch, channels=D,
                     num_blocks=T, layers_per_block=K, head_dim=64, num_classes=ncls,
                     noise_std=noise_std, norm_clip=norm_clip)
    model = TarFlow(cfg)
    try:
        model.load_state_dict({key: value for key, value in sd.items()
                               if key != 'var' and not key.endswith('attn_mask')}, strict=True)
    except RuntimeError as e:
        # other damaged tensors: PyTorch's message lists each one with both shapes
        raise ValueError('ml-tarflow state dict: tensors do not fit the config '
                         f'inferred from blocks.0 ({e})') from None
    return model


# -----------------------------------------------------------------------------
# The reverse model: BiFlow


class ReverseBlock(nn.Module):
    """A bidirectional transformer layer conditioned through adaLN-zero on
    cond = class + guidance-scale embedding."""

    def __init__(self, dim, head_dim):
        super().__init__()
        self.attention = Attention(dim, head_dim)
        self.mlp = MLP(dim)
        self.ada = nn.Linear(dim, 6 * dim)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)  # zero gates: every layer starts as the identity

    def forward(self, h, cond):
        # each (B, 1, D)
        s1, k1, g1, s2, k2, g2 = self.ada(F.silu(cond)).unsqueeze(1).chunk(6, dim=-1)
        h = h + g1 * self.attention(h, mod=(s1, k1))
        return h + g2 * self.mlp(h, mod=(s2, k2))


class ReverseModel(nn.Module):
    """G: z tokens -> clean image tokens in one pass. Layer group g stands for the inverse of
    forward block T-1-g; its projection head phi_g maps the hidden state to token space, where it is
    aligned with the forward state x^{T-1-g} (hidden alignment, Eq. 2). With learned denoising an
    extra group then maps the noisy x^0 to the clean image."""

    def __init__(self, cfg: ReverseConfig):
        super().__init__()
        assert cfg.align in ('hidden', 'distill', 'naive'), f'align: {cfg.align}'
        assert cfg.denoise in ('learned', 'score', 'none'), f'denoise: {cfg.denoise}'
        assert cfg.guidance_mode in ('train', 'inference'), f'guidance_mode: {cfg.guidance_mode}'
        self.cfg = cfg
        D, d, N = cfg.channels, cfg.token_dim, cfg.num_tokens
        self.proj_in = nn.Linear(d, D)
        self.pos_embed = nn.Parameter(torch.randn(1, N, D) * 0.02)
        self.class_embed = nn.Embedding(cfg.num_classes + 1, D)  # the last row is the null class
        self.w_embed = nn.Sequential(nn.Linear(1, D), nn.SiLU(), nn.Linear(D, D))
        self.groups = nn.ModuleList(nn.ModuleList(ReverseBlock(D, cfg.head_dim)
                                                  for _ in range(cfg.layers_per_block))
                                    for _ in range(cfg.num_blocks))
        # Groups whose state has a target other than the final output:
        # all T with learned denoising (the last one targets the noisy x^0),
        # else T-1 (the last group's state becomes the output itself).
        self.num_aligned = cfg.num_blocks if cfg.denoise == 'learned' else cfg.num_blocks - 1
        n_heads = 0 if cfg.align == 'naive' else self.num_aligned
        self.heads = nn.ModuleList(nn.Linear(D, d) for _ in range(n_heads))
        # Hidden distillation pushes the state itself through token space:
        # phi_g, then back up to width D.
        self.reproj = nn.ModuleList(nn.Linear(d, D)
                                    for _ in range(n_heads if cfg.align == 'distill' else 0))
        self.denoiser = nn.ModuleList(
            ReverseBlock(D, cfg.head_dim)
            for _ in range(cfg.denoise_layers if cfg.denoise == 'learned' else 0))
        self.final_norm = LayerNorm32(D, elementwise_affine=False)
        self.final_ada = nn.Linear(D, 2 * D)
        self.final = nn.Linear(D, d)
        for lin in (self.final_ada, self.final):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def condition(self, y, w):
        """(B, D) conditioning vector from labels y (-1 or None: null class)
        and guidance scales w (B,)."""
        null = self.cfg.num_classes
        y = torch.full_like(w, null, dtype=torch.long) if y is None else torch.where(y < 0, null, y)
        return self.class_embed(y) + self.w_embed(w.float().view(-1, 1))

    def forward(self, z, y=None, w=None, inference_w=0.0):
        """z (B, N, d) -> predictions in token space: [phi_0(h), ..., phi_{A-1}(h), output]
        with A = num_aligned (fewer for 'naive'), prediction g aligned with forward state x^{T-1-g}.
        inference_w > 0: inference-time CFG (Eq. 4), the conditional and null streams run as one
        batch and are combined after every layer group."""
        B = z.shape[0]
        w = torch.zeros(B, device=z.device) if w is None else w.to(z.device).float().expand(B)
        cond = self.condition(y, w)
        h = self.proj_in(z) + self.pos_embed                        # (B, N, D)
        if inference_w:
            h = torch.cat([h, h])
            cond = torch.cat([cond, self.condition(None, torch.zeros_like(w))])

        def guide(h):
            if not inference_w:
                return h
            hc, hu = h.chunk(2)
            hg = (1 + inference_w) * hc - inference_w * hu
            return torch.cat([hg, hg])

        preds = []
        for g, group in enumerate(self.groups):
            for layer in group:
                h = layer(h, cond)
            h = guide(h)
            if g < len(self.heads):
                pred = self.heads[g](h)                     # (B, N, d): compared with x^{T-1-g}
                preds.append(pred[:B])
                if self.reproj:
                    h = self.reproj[g](pred) + self.pos_embed
        for layer in self.denoiser:
            h = layer(h, cond)
        h = guide(h)
        shift, scale = self.final_ada(F.silu(cond)).unsqueeze(1).chunk(2, dim=-1)
        preds.append(self.final(modulate(self.final_norm(h), shift, scale))[:B])
        return preds

    def decode(self, z, y=None, w=None, inference_w=0.0, flow=None):
        """One pass from z (B, N, d) to an image (B, C, H, W);
        score denoising needs the forward model."""
        cfg = self.cfg
        x = unpatchify(self(z, y, w, inference_w)[-1].float(), cfg.patch_size, cfg.img_size)
        if cfg.denoise == 'score':
            if flow is None:
                raise ValueError("this reverse model was trained with denoise='score': pass flow")
            x = flow.denoise(x, y)
        return x


@torch.no_grad()
def inpaint(G: ReverseModel, flow: TarFlow, x, redraw, y, noise, w=0.0, eps=None):
    """Training-free inpainting (Eq. 6): z' = M * F(x_m) + (1 - M) * noise, decoded in one pass.
    x (B, C, H, W), redraw (B, 1, H, W) True where pixels are to be regenerated; a token is kept
    only if none of its pixels is. -> (x', z')

    x_m is the masked image: F must never see the pixels to be redrawn, because after the first
    token-order flip every z token depends on every pixel, so encoding the full x would leak the
    hidden content into the kept tokens. The hole is filled with the per-channel mean of that
    image's known pixels, not a constant: in the flipped order kept tokens sit after the hole and
    are conditioned on it, and a fill of the image's own colour is closer to a plausible completion
    than mid-grey (far off for a dark or saturated image), so their z stay closer to typical. The
    mean reads known pixels only (0 if there are none), so x' and z' do not depend on the hidden
    ones at all."""
    fc = flow.cfg
    eps = torch.randn_like(x) if eps is None else eps
    known = ~redraw.expand_as(x)
    count = known.sum((2, 3), keepdim=True).clamp(min=1)
    fill = torch.where(known, x, 0.).sum((2, 3), keepdim=True) / count
    z, _, _ = flow(torch.where(known, x, fill) + fc.noise_std * eps, y)
    keep = ~patchify(redraw.float(), fc.patch_size).bool().any(-1, keepdim=True)   # (B, N, 1)
    z = torch.where(keep, z, noise)
    return G.decode(z, y, torch.full((len(z),), float(w), device=z.device), flow=flow), z


@torch.no_grad()
def edit(G: ReverseModel, flow: TarFlow, x, y_src, y_dst, w=0.0, eps=None):
    """Class editing: encode x with its class y_src, decode the same noise with class y_dst."""
    eps = torch.randn_like(x) if eps is None else eps
    z, _, _ = flow(x + flow.cfg.noise_std * eps, y_src)
    return G.decode(z, y_dst, torch.full((len(z),), float(w), device=z.device), flow=flow)


def forward_loss(flow: TarFlow, x, y, eps, noise='gaussian', checkpoint=False):
    """The stage-1 loss on a clean batch x (B, C, H, W) in [-1, 1] (multiples of 1/127.5 from
    uint8), labels y and standard normal eps of x's shape. noise='gaussian': x + sigma*eps, the
    noisy data TarFlow learns so that it can sample and denoise; 'uniform': dequantisation x + u/128
    with u = Phi(eps) ~ U(0, 1) inside the pixel's bin of width 2/256 (the same stream, so the
    switch changes nothing else), whose NLL bounds the discrete one (bits/dim).
    checkpoint: recompute each flow in the backward (TarFlow.forward), for models whose
    activations do not fit.
    -> (loss, nll (B,) in nats/dim without the 0.5*log(2*pi) constant, trajectory)."""
    if noise == 'gaussian':
        xn = x + getattr(flow, 'module', flow).cfg.noise_std * eps   # DDP wraps the model
    else:  # bin k of [0, 256) holds [k, k+1); its pixel value k/127.5 - 1 becomes (k + u)/128 - 1
        xn = ((x + 1) * 127.5 + 0.5 * (1 + torch.erf(eps / math.sqrt(2)))) / 128 - 1
    z, logdet, traj = flow(xn, y, checkpoint=checkpoint)
    nll = TarFlow.nll_from(z, logdet)
    return nll.mean(), nll, traj


def align_targets(G: ReverseModel, traj, clean):
    """The forward states G's predictions are compared with: x^{T-1}, ...,
    then the clean (learned denoising) or noisy x^0 for the output.
    traj = [x^0 (noisy), x^1, ..., x^T = z] in token space."""
    T = len(traj) - 1
    targets = [traj[T - 1 - g] for g in range(len(G.heads))]
    return targets + [clean if G.cfg.denoise == 'learned' else traj[0]]


def state_distance(pred, target, normalize):
    """Per-sample MSE (B,); with norm control both states are divided by the target's RMS first."""
    dist = (pred.float() - target.float()).pow(2).mean(dim=(1, 2))
    return dist / (target.float().pow(2).mean(dim=(1, 2)) + 1e-6) if normalize else dist


def adaptive(dist, c=0.01, p=1.0):
    """BiFlow's adaptive weighting sg((dist + c)^-p) * dist, per sample:
    every term contributes about equally."""
    return dist / (dist.detach() + c) ** p


def noisy_x0_index(G: ReverseModel) -> int:
    """Which of G's predictions stands for the noisy x^0, the state F's first block reads: the last
    head with learned denoising, else the output. Naive distillation with learned denoising has no
    such prediction."""
    if G.cfg.denoise != 'learned':
        return len(G.heads)
    if len(G.heads) < G.num_aligned:
        raise ValueError("the cycle term needs G's prediction of the noisy x^0, which naive "
                         "distillation with learned denoising does not make")
    return len(G.heads) - 1


def cycle_loss(G: ReverseModel, flow: TarFlow, z, y, preds=None, fp32=True):
    """Cycle consistency on prior noise: ||F(G(z)) - z||^2 per sample (B,), for z (B, N, d) drawn
    from N(0, I) and labels y (-1 = null class), at guidance w = 0 (the only scale at which F's
    inverse is G's target). G's prediction of the noisy x^0 goes through the frozen F in one
    parallel pass, so the gradient reaches G through F's Jacobian; F must be frozen (requires_grad
    False), or this raises. It is zero exactly when that prediction is F^-1(z), F being a bijection.
    preds: G's predictions for z if already computed (one batched pass with the data). fp32: F's
    pass with autocast off, as for the targets. With norm control, divided by |z|^2."""
    raw = getattr(G, 'module', G)
    if any(param.requires_grad for param in flow.parameters()):
        raise ValueError('cycle_loss: F must be frozen (requires_grad_(False)), so that only G '
                         'gets a gradient')
    if preds is None:
        preds = G(z, y, torch.zeros(len(z), device=z.device))
    fc = flow.cfg
    x0 = unpatchify(preds[noisy_x0_index(raw)].float(), fc.patch_size, fc.img_size)
    with torch.autocast(z.device.type, enabled=False) if fp32 else contextlib.nullcontext():
        zc, _, _ = flow(x0, y)
    return state_distance(zc, z, raw.cfg.norm)


def reverse_loss(G: ReverseModel, flow: TarFlow, x, y, w, eps, perceptual=None, weights=None,
                 c=0.01, p=1.0, generator=None, fp32_targets=True, perceptual_every=1,
                 cycle=0.0, prior=None):
    """The stage-2 loss on a clean batch x (B, C, H, W) with labels y (-1 = dropped), guidance
    scales w (B,) and noise eps. F is frozen: its whole trajectory comes from one parallel forward
    pass, in fp32 even inside a bf16 autocast unless fp32_targets=False (bf16 moves the states by
    0.2-0.5%: the targets would be that far from F's own).
    generator: a CPU generator for the perceptual crop boxes (train.py seeds it per step and rank).
    perceptual_every: the perceptual terms see every perceptual_every-th row only, from row 0
    (through the VAE decoder they cost several times G's step).
    cycle > 0: add cycle * the adaptively weighted cycle_loss on prior = (z, y_z), prior noise z
    (k, N, d) and its labels, which G sees in the same pass as the data (one batch of B + k rows);
    the data terms are unchanged.
    Returns (loss, per-term means)."""
    fc = flow.cfg
    # G may be wrapped in DDP: call G (gradients sync), read the config from raw
    raw = getattr(G, 'module', G)
    fp32 = (torch.autocast(x.device.type, enabled=False) if fp32_targets
            else contextlib.nullcontext())
    with torch.no_grad(), fp32:
        _, _, traj = flow(x + fc.noise_std * eps, y)
    clean = patchify(x.float(), fc.patch_size)
    if cycle > 0:   # data and prior rows in one pass of G (DDP allows one forward per backward)
        zp, yp = prior
        wp = torch.zeros(len(zp), dtype=w.dtype, device=w.device)   # the cycle holds at w = 0 only
        both = G(torch.cat([traj[-1], zp]), torch.cat([y, yp]), torch.cat([w, wp]))
        preds, prior_preds = [pred[:len(x)] for pred in both], [pred[len(x):] for pred in both]
    else:
        preds = G(traj[-1], y, w)
    if raw.cfg.guidance_mode == 'train':
        # Eq. 5: the guided prediction, recombined with the null-class prediction, must equal the
        # conditional state, i.e. G(z|y,w) = (1+w) x^i - w G(z|null) as classifier-free guidance
        # would give. Always run (at w = 0 it is the identity): skipping it when no w > 0 would read
        # w on the host, a sync on every step.
        with torch.no_grad():
            uncond = raw(traj[-1], torch.full_like(y, -1), torch.zeros_like(w))
        wv = w.view(-1, 1, 1).float()
        preds = [(pc + wv * pu) / (1 + wv) for pc, pu in zip(preds, uncond)]
    targets = align_targets(raw, traj, clean)
    terms = {f'align{len(traj) - 2 - g}': state_distance(pr, target, raw.cfg.norm)
             for g, (pr, target) in enumerate(zip(preds[:-1], targets[:-1]))}
    terms['out'] = state_distance(preds[-1], targets[-1], raw.cfg.norm)
    loss = sum(adaptive(dist, c, p).mean() for dist in terms.values())
    if cycle > 0:
        terms['cycle'] = cycle_loss(raw, flow, *prior, prior_preds, fp32_targets)
        loss = loss + cycle * adaptive(terms['cycle'], c, p).mean()
    if perceptual is not None:
        size = (fc.img_size, fc.img_size)
        img = unpatchify(preds[-1].float(), fc.patch_size, size[0])
        stride = perceptual_every
        dists = perceptual(img[::stride], x[::stride].float(), generator=generator)
        for name, dist in dists.items():
            terms[name] = dist
            loss = loss + (weights or {}).get(name, 1.0) * adaptive(dist, c, p).mean()
    return loss, {name: term.detach().mean() for name, term in terms.items()}
