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
from dataclasses import dataclass, fields

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


def config_from_dict(cls, cfg_dict, name=None):
    """Rebuild a dataclass config from the plain dict stored in a checkpoint (as name: the errors
    say where); unknown and missing keys are an error."""
    name = name or cls.__name__
    if not isinstance(cfg_dict, dict):
        raise ValueError(f'{name}: not a config dict but {type(cfg_dict).__name__}')
    names = {f.name for f in fields(cls)}
    for what, keys in (('unknown', set(cfg_dict) - names), ('missing', names - set(cfg_dict))):
        if keys:
            raise ValueError(f'{name}: {what} config keys {sorted(keys)}')
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


def f32(tensor):
    """Upcast bf16/fp16 to fp32 for the flow's critical math; fp32 and float64 pass unchanged."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def modulate(h, shift, scale):
    """adaLN: h * (1 + scale) + shift, with (B, 1, D) modulation broadcast over tokens."""
    return h * (1 + scale) + shift


def guide(cond, uncond, w):
    """Classifier-free guidance: cond + w * (cond - uncond)."""
    return torch.lerp(uncond, cond, 1 + w)


def norm32(norm, h):
    """nn.LayerNorm `norm` computed in fp32 (also on bf16 activations), in h's dtype."""
    out = torch.layer_norm(f32(h), norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    return out if out.dtype == h.dtype else out.to(h.dtype)


class Attention(nn.Module):
    """Pre-norm multi-head self-attention. Key names match Apple's ml-tarflow (norm, qkv, proj)."""

    def __init__(self, dim, head_dim):
        super().__init__()
        assert dim % head_dim == 0, f'width {dim} is not a multiple of head_dim {head_dim}'
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.num_heads, self.head_dim = dim // head_dim, head_dim

    def forward(self, h, causal=False, temp=None, mod=None, cache=None, pos=0):
        """h (B, L, D) -> (B, L, D).
        temp (B,): the logits divided by temp per row (TarFlow's attention-temperature guidance).
        mod: adaLN (shift, scale) applied after the norm (the reverse model's conditioning).
        cache: the exact inverse's keys and values (2, B, H, N, hd): h is one token (B, D) at
        position pos, whose keys and values are written there, attending to positions <= pos."""
        B = len(h)
        hn = norm32(self.norm, h) if mod is None else modulate(norm32(self.norm, h), *mod)
        qkv = F.linear(hn, self.qkv.weight, self.qkv.bias)
        qkv = qkv.view(B, -1, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, kv = qkv.select(0, 0), qkv.narrow(0, 1, 2)         # (B, H, L, hd), (2, B, H, L, hd)
        if temp is not None:
            q = q / temp.view(B, 1, 1, 1).to(q.dtype)
        if cache is not None:
            cache.narrow(3, pos, 1).copy_(kv)
            kv, causal = cache.narrow(3, 0, pos + 1), False
            q = q if q.dtype == kv.dtype else q.to(kv.dtype)
        o = F.scaled_dot_product_attention(q, *kv.unbind(0), is_causal=causal)
        o = (o if cache is not None else o.transpose(1, 2)).reshape(h.shape)
        return F.linear(o if o.dtype == h.dtype else o.to(h.dtype), self.proj.weight,
                        self.proj.bias)


class MLP(nn.Module):
    """Pre-norm MLP, ratio 4, exact GELU. Key names match ml-tarflow (norm, main.0, main.2)."""

    def __init__(self, dim, ratio=4):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.main = nn.Sequential(nn.Linear(dim, ratio * dim), nn.GELU(),
                                  nn.Linear(ratio * dim, dim))

    def forward(self, h, mod=None):
        hn = norm32(self.norm, h) if mod is None else modulate(norm32(self.norm, h), *mod)
        fc1, _, fc2 = self.main
        return F.linear(F.gelu(F.linear(hn, fc1.weight, fc1.bias)), fc2.weight, fc2.bias)


class AttentionBlock(nn.Module):
    """One transformer layer of a TarFlow block: h + attention(h), then + mlp(h), causal, no
    conditioning inside (MetaBlock.next_params runs it)."""

    def __init__(self, dim, head_dim):
        super().__init__()
        self.attention = Attention(dim, head_dim)
        self.mlp = MLP(dim)


# -----------------------------------------------------------------------------
# The forward model: TarFlow


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
        return null if y is None else torch.where((y < 0).view(-1, 1, 1), null,
                                                  self.class_embed[y.clamp(min=0)])

    def next_params(self, x, pc, temp=None, w=0.0, caches=None, pos=0):
        """The causal layers on tokens x (B, L, d) at positions pos.., or one token (B, d), with
        their position + class embeddings pc (S, B, L, D) or (S, B, D) per stream (S = 2:
        conditional rows, then null-class rows): (alpha, mu) of the NEXT tokens, fp32, each
        (B, L, d) or (B, d), with the norm control clip*tanh(./clip) and, for S = 2, guidance w.
        caches: one KV cache per layer (the exact inverse)."""
        h = (F.linear(x, self.proj_in.weight, self.proj_in.bias) + pc).flatten(0, 1)
        # .forward, not __call__: the inverse calls this once per token, where hook checks cost
        for k, layer in enumerate(self.attn_blocks):
            cache = None if caches is None else caches[k]
            h = h + layer.attention.forward(h, True, temp, None, cache, pos)
            h = h + layer.mlp.forward(h)
        out = f32(F.linear(h, self.proj_out.weight, self.proj_out.bias))
        if self.clip > 0:
            out = self.clip * torch.tanh(out / self.clip)
        return (guide(*out.chunk(2), w) if len(pc) == 2 else out).chunk(2, dim=-1)

    def params(self, xp, y=None, temp=None):
        """alpha, mu (B, N, d) for every token of xp (already in this block's order),
        in parallel."""
        # (B, N, D); pos moves with its patch
        pc = (self.permute(self.pos_embed, dim=0) + self.condition(y)).expand(len(xp), -1, -1)
        alpha, mu = self.next_params(xp, pc[None], temp)    # one stream; output i predicts i+1
        # shift: token i depends on tokens < i only
        return [F.pad(t[:, :-1], (0, 0, 1, 0)) for t in (alpha, mu)]

    def forward(self, x, y=None, temp=None):
        """x (B, N, d) in raster order -> z (B, N, d) in raster order and log|det dz/dx| (B,),
        all in parallel."""
        xp = self.permute(x)
        alpha, mu = self.params(xp, y, temp)
        z = (f32(xp) - mu) * torch.exp(-alpha)
        return self.permute(z), -alpha.sum(dim=(1, 2))

    @torch.no_grad()
    def reverse(self, z, y=None, guidance=0.0, ramp=False, attn_temp=1.0, kv_dtype=None,
                jacobi=None):
        """Exact inverse z (B, N, d) -> x (B, N, d), raster order: x_{i+1} = z_{i+1} exp(alpha_i)
        + mu_i in this block's order, alpha, mu from tokens <= i. Guidance: the conditional and
        the null-class rows (attention temperature attn_temp) run as one batch of 2B, and alpha, mu
        are guided by w = guidance, or guidance (i+1)/(N-1) with the ramp. The recursion is fp32
        (also under bf16 autocast). jacobi=None: token by token with a KV cache (dtype kv_dtype,
        default z's). jacobi=tol: plain Jacobi passes, each computing every token from the last
        iterate in one parallel pass; token j is exact after j passes, so N-1 reach the sequential
        result, and a pass whose largest change is <= tol ends it early."""
        B, N, _ = z.shape
        S = 2 if guidance else 1                            # streams: conditional, null class
        y = torch.cat([y, torch.full_like(y, -1)]) if S == 2 and y is not None else y
        pc = self.permute(self.pos_embed, dim=0) + self.condition(y)
        pc = pc.expand(S * B, N, -1).reshape(S, B, N, -1)   # (S, B, N, D)
        temp = (torch.tensor([1.0] * B + [attn_temp] * B, dtype=pc.dtype, device=z.device)
                if S == 2 and attn_temp != 1.0 else None)   # (2B,)
        ws = [guidance * (i + 1) / (N - 1) if ramp else guidance for i in range(N - 1)]
        zp = f32(self.permute(z))
        if jacobi is None:
            caches = [zp.new_empty(2, S * B, lay.attention.num_heads, N, lay.attention.head_dim,
                                   dtype=kv_dtype or zp.dtype) for lay in self.attn_blocks]
            x, pcs = list(zp.unbind(1)), pc.unbind(2)       # N x (B, d), N x (S, B, D)
            for i in range(N - 1):
                alpha, mu = self.next_params(x[i], pcs[i], temp, ws[i], caches, i)
                x[i + 1] = torch.addcmul(mu, x[i + 1], alpha.exp())
            return self.permute(torch.stack(x, dim=1))
        x, w = zp.clone(), torch.tensor(ws, dtype=zp.dtype, device=z.device).view(-1, 1)
        for _ in range(N - 1):                              # tokens 1..N-1 from 0..N-2
            alpha, mu = self.next_params(x[:, :-1], pc[:, :, :-1], temp, w)
            new = torch.addcmul(mu, zp[:, 1:], alpha.exp())
            change = (new - x[:, 1:]).abs().max()
            x[:, 1:] = new
            if change <= jacobi:
                break
        return self.permute(x)


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

    def reverse(self, z, y=None, guidance=0.0, ramp=False, attn_temp=1.0, kv_dtype=None,
                jacobi=None):
        """z (B, N, d) -> the noisy image (B, C, H, W): invert block T-1 first
        (kv_dtype, jacobi: MetaBlock.reverse)."""
        # inference mode: no autograd bookkeeping on the inverse's many small per-token ops; the
        # result is cloned out of it, an ordinary tensor (denoising differentiates through it)
        with torch.inference_mode():
            x = f32(z)
            for block in reversed(self.blocks):
                x = block.reverse(x, y, guidance, ramp, attn_temp, kv_dtype, jacobi)
            x = unpatchify(x, self.cfg.patch_size, self.cfg.img_size)
        return x.clone()

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
               generator=None, z=None, kv_dtype=None, jacobi=None):
        """Draw z ~ N(0, I), invert exactly, optionally denoise.
        Class-conditional: pass labels y (B,)."""
        if z is None:
            # drawn where the generator lives (a CPU generator cannot fill a CUDA tensor),
            # then moved to the model
            z = torch.randn(n if y is None else len(y), self.cfg.num_tokens, self.cfg.token_dim,
                            generator=generator, device=generator and generator.device)
            z = z.to(next(self.parameters()).device)
        x = self.reverse(z, y, guidance, ramp, attn_temp, kv_dtype, jacobi)
        return self.denoise(x, y) if denoise else x


def load_ml_tarflow(state_dict, noise_std, norm_clip=0.0) -> TarFlow:
    """Build a TarFlow from a state dict saved by Apple's ml-tarflow, inferring the config from
    tensor shapes. noise_std has no default: the dicts do not record it and Apple's models use 0.05,
    0.07 or 0.15 (Tweedie needs it). The buffers 'var' (prior variance; all ones in the NVP models)
    and 'attn_mask' are not needed here."""
    sd = {key.removeprefix('module.'): value for key, value in state_dict.items()
          if not key.endswith('attn_mask')}
    if not torch.all(sd.pop('var', torch.ones(1)) == 1):
        raise ValueError('ml-tarflow state dict has a learned prior variance (VP mode), '
                         'which is not supported')
    for key in ('blocks.0.proj_in.weight', 'blocks.0.pos_embed', 'blocks.0.proj_out.weight'):
        if key not in sd:
            raise ValueError(f'not an ml-tarflow state dict: no key {key}')
        if sd[key].ndim != 2:
            raise ValueError(f'ml-tarflow state dict: {key} has shape {tuple(sd[key].shape)}, '
                             'expected a matrix')
    (D, d), N = sd['blocks.0.proj_in.weight'].shape, len(sd['blocks.0.pos_embed'])
    out = tuple(sd['blocks.0.proj_out.weight'].shape)
    # VP models predict mu only; anything else is a damaged (truncated, transposed) tensor
    if out == (d, D):
        raise ValueError('ml-tarflow VP models (nvp=False) are not supported: '
                         'proj_out has no log-scale rows')
    if out != (2 * d, D):
        raise ValueError(f'ml-tarflow state dict: blocks.0.proj_out.weight has shape {out}, '
                         f'expected {(2 * d, D)} (2 x token dim, width) from '
                         f'blocks.0.proj_in.weight {(D, d)}')
    C = 3 if d % 3 == 0 else 1
    patch, side = math.isqrt(d // C), math.isqrt(N)
    if patch * patch * C != d or side * side != N or D % 64:
        raise ValueError(f'cannot infer an ml-tarflow config from token dim {d}, '
                         f'{N} tokens, width {D}')
    model = TarFlow(FlowConfig(
        img_size=side * patch, in_channels=C, patch_size=patch, channels=D, head_dim=64,
        num_blocks=sum(key.endswith('.proj_in.weight') for key in sd),
        layers_per_block=sum(key.startswith('blocks.0.') and key.endswith('.qkv.weight')
                             for key in sd),
        num_classes=len(sd.get('blocks.0.class_embed', ())), noise_std=noise_std,
        norm_clip=norm_clip))
    try:
        model.load_state_dict(sd)
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
        self.final_norm = nn.LayerNorm(D, elementwise_affine=False)
        self.final_ada = nn.Linear(D, 2 * D)
        self.final = nn.Linear(D, d)
        for param in (*self.final_ada.parameters(), *self.final.parameters()):
            nn.init.zeros_(param)

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
        preds = []
        for g, group in enumerate(self.groups):
            for layer in group:
                h = layer(h, cond)
            h = torch.cat([guide(*h.chunk(2), inference_w)] * 2) if inference_w else h
            if g < len(self.heads):
                pred = self.heads[g](h)                     # (B, N, d): compared with x^{T-1-g}
                preds.append(pred[:B])
                if self.reproj:
                    h = self.reproj[g](pred) + self.pos_embed
        for layer in self.denoiser:
            h = layer(h, cond)
        h = guide(*h.chunk(2), inference_w) if inference_w else h
        shift, scale = self.final_ada(F.silu(cond[:B])).unsqueeze(1).chunk(2, dim=-1)
        preds.append(self.final(modulate(norm32(self.final_norm, h), shift, scale)))
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
    fill = torch.where(known, x, 0.).sum((2, 3), True) / known.sum((2, 3), True).clamp(min=1)
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


def reverse_loss(G: ReverseModel, flow: TarFlow, x, y, w, eps, perceptual=None, weights=None,
                 c=0.01, p=1.0, generator=None, fp32_targets=True, perceptual_every=1):
    """The stage-2 loss on a clean batch x (B, C, H, W) with labels y (-1 = dropped), guidance
    scales w (B,) and noise eps. F is frozen: its whole trajectory comes from one parallel forward
    pass, in fp32 even inside a bf16 autocast unless fp32_targets=False (bf16 moves the states by
    0.2-0.5%: the targets would be that far from F's own).
    generator: a CPU generator for the perceptual crop boxes (train.py seeds it per step and rank).
    perceptual_every: the perceptual terms see every perceptual_every-th row only, from row 0
    (through the VAE decoder they cost several times G's step).
    Returns (loss, per-term means)."""
    fc = flow.cfg
    # G may be wrapped in DDP: call G (gradients sync), read the config from raw
    raw = getattr(G, 'module', G)
    fp32 = (torch.autocast(x.device.type, enabled=False) if fp32_targets
            else contextlib.nullcontext())
    with torch.no_grad(), fp32:
        _, _, traj = flow(x + fc.noise_std * eps, y)
    clean = patchify(x.float(), fc.patch_size)
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
    if perceptual is not None:
        img = unpatchify(preds[-1].float(), fc.patch_size, fc.img_size)
        dists = perceptual(img[::perceptual_every], x[::perceptual_every].float(),
                           generator=generator)
        for name, dist in dists.items():
            terms[name] = dist
            loss = loss + (weights or {}).get(name, 1.0) * adaptive(dist, c, p).mean()
    return loss, {name: term.detach().mean() for name, term in terms.items()}
