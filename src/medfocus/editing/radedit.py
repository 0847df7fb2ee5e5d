"""RadEdit — the paper's counterfactual editor (Pérez-García et al., 2024), with our own sampler.

Components (loaded lazily on the first edit, or by :meth:`RadEditEditor.prepare`):

* UNet: ``microsoft/radedit`` (subfolder ``unet``), a latent-diffusion UNet trained on chest X-rays;
* VAE: ``stabilityai/sdxl-vae``;
* text encoder + tokenizer: ``microsoft/BiomedVLP-BioViL-T`` (CXR-BERT, ``trust_remote_code``),
  whose last hidden states condition the UNet's cross-attention;
* scheduler: DDIM, linear betas, epsilon prediction, ``trailing`` spacing (the repository's own
  ``scheduler/`` config is used when it has one).

Install with ``pip install 'medfocus[radedit]'`` (diffusers). Without diffusers, or without the
weights (no network, not in the Hugging Face cache, no ``weights_dir``), the first use raises one
:class:`~medfocus.errors.ModelError` that says which component is missing and how to provide it.
``weights_dir`` may hold local copies laid out as ``unet/``, ``vae/``, ``text_encoder/`` (the last
with its tokenizer files).

Algorithm (paper settings: 512 x 512 px, 200 DDIM steps, guidance 7.5, skip ratio 0.3):

1. letterbox the image to 512 x 512, encode it with the VAE: clean latents ``z0``;
2. *edit-friendly DDPM inversion* (eta = 1): draw ``x_t = sqrt(a_t) z0 + sqrt(1 - a_t) eps_t``
   independently for every step and solve for the noise maps ``n_t`` that make the stochastic DDIM
   step with the unconditional prediction go exactly from ``x_t`` to ``x_{t-1}``;
3. start at step ``skip_ratio * steps`` from the inverted latent and run the reverse process with the
   recorded noise maps, classifier-free guidance towards the prompt *only inside the edit mask*
   (``eps = eps_u + w * m_edit * (eps_c - eps_u)``), and after every step paste the inverted latents
   back inside the *keep mask*;
4. decode, undo the letterbox, and paste into the original image inside the edit mask with a
   feathered seam (pixels outside the mask are returned unchanged: the VAE round trip is not
   lossless, and the filter's background/foreground gates must only see the intended change).

Masks: the edit mask is the caller's mask (max-pooled to the latent grid, so every latent cell that
touches it may change); the keep mask is everything farther than ``keep_margin`` pixels from it
(plus the letterbox padding); the band in between is free to harmonise.

**Keep-mask fix.** The public RadEdit pipeline (``inversion_reverse_process_two_masks``) pastes back
``timestep_to_latents[:, idx + 1]`` after a reverse step, i.e. the inverted latent of the step it
came *from*: the kept region ends one step too noisy (at the last step it is the noisiest-but-one
latent instead of ``z0``). The ``+ 1`` avoids a NaN: at the last step the DDIM variance is 0 (final
alpha = 1), so the noise map ``(x_prev - mu) / sigma`` is 0/0. Here, after the step to level ``k``
we paste the inverted latent *of level k* (``z0`` itself after the last step), and for a step whose
sigma is 0 the inversion records the residual ``x_prev - mu`` instead of dividing by sigma, so no
NaN can arise and, without guidance, the reverse process reproduces ``z0`` exactly (tested). :meth:`RadEditEditor.edit_latents`
exposes the final latents so that tests check that the kept region equals ``z0`` exactly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medfocus.editing.base import Editor, composite, feather_alpha
from medfocus.errors import ConfigError, ModelError
from medfocus.types import Sample

UNET_ID = "microsoft/radedit"
VAE_ID = "stabilityai/sdxl-vae"
TEXT_ENCODER_ID = "microsoft/BiomedVLP-BioViL-T"

_INSTALL_HINT = "pip install 'medfocus[radedit]'"


@dataclass
class RadEditComponents:
    """The loaded models: ``unet``, ``vae``, ``text_encoder``, ``tokenizer``, ``scheduler``."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any


def _import_diffusers() -> Any:
    try:
        import diffusers  # noqa: PLC0415
    except ImportError as exc:
        raise ModelError(f"the radedit editor needs diffusers, which is not installed ({exc}); install it with: {_INSTALL_HINT}") from exc
    return diffusers


def load_radedit_components(*, unet_id: str = UNET_ID, vae_id: str = VAE_ID, text_encoder_id: str = TEXT_ENCODER_ID,
                            weights_dir: str | os.PathLike[str] | None = None, device: str | None = None,
                            dtype: Any = None) -> RadEditComponents:
    """Load RadEdit's UNet, VAE, text encoder/tokenizer and DDIM scheduler.

    Args:
        unet_id, vae_id, text_encoder_id: Hugging Face ids or local folders.
        weights_dir: folder with ``unet/``, ``vae/``, ``text_encoder/`` sub-folders; overrides the ids.
        device: ``"cuda"``, ``"cpu"``...; default CUDA when available.
        dtype: torch dtype of the UNet (default float16 on CUDA, float32 on CPU); the VAE and the
            text encoder stay in float32.
    Raises:
        ModelError: diffusers missing, or a component cannot be loaded (the message names it).
    """
    diffusers = _import_diffusers()
    import torch
    from transformers import AutoModel, AutoTokenizer

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        dtype = torch.float16 if dev.type == "cuda" else torch.float32
    if weights_dir is not None:
        root = Path(weights_dir)
        unet_src, unet_sub = str(root / "unet"), None
        vae_src, te_src = str(root / "vae"), str(root / "text_encoder")
        sched_src, sched_sub = str(root / "scheduler"), None
    else:
        unet_src, unet_sub = unet_id, "unet"
        vae_src, te_src = vae_id, text_encoder_id
        sched_src, sched_sub = unet_id, "scheduler"

    def _fail(what: str, src: str, exc: Exception) -> ModelError:
        return ModelError(
            f"radedit: cannot load the {what} from {src!r} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
            f"RadEdit needs {UNET_ID} (UNet), {VAE_ID} (VAE) and {TEXT_ENCODER_ID} (text encoder): download them into the "
            "Hugging Face cache on a machine with network access, or pass weights_dir (CLI: --radedit-dir) holding "
            "unet/, vae/ and text_encoder/ folders."
        )

    try:
        unet = diffusers.UNet2DConditionModel.from_pretrained(unet_src, subfolder=unet_sub, torch_dtype=dtype)
    except Exception as exc:  # noqa: BLE001 - any loading failure becomes one clear message
        raise _fail("UNet", unet_src, exc) from exc
    try:
        # The SDXL VAE overflows in float16 (NaN decodes); it is small, so it always runs in float32.
        vae = diffusers.AutoencoderKL.from_pretrained(vae_src, torch_dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001
        raise _fail("VAE", vae_src, exc) from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(te_src, model_max_length=128, trust_remote_code=True)
        text_encoder = AutoModel.from_pretrained(te_src, trust_remote_code=True)
    except Exception as exc:  # noqa: BLE001
        raise _fail("text encoder", te_src, exc) from exc
    try:
        scheduler = diffusers.DDIMScheduler.from_pretrained(sched_src, subfolder=sched_sub)
    except Exception:  # noqa: BLE001 - the repository may not ship a scheduler config
        scheduler = diffusers.DDIMScheduler(beta_schedule="linear", clip_sample=False, prediction_type="epsilon",
                                            timestep_spacing="trailing", steps_offset=1)
    unet.to(dev).eval()
    vae.to(dev).eval()
    text_encoder.to(dev).eval()
    return RadEditComponents(unet, vae, text_encoder, tokenizer, scheduler)


class RadEditEditor(Editor):
    """The paper's diffusion editor (see module docstring for the algorithm and the keep-mask fix).

    Args:
        steps: DDIM steps (paper: 200).
        guidance_scale: classifier-free guidance inside the edit mask (paper: 7.5).
        skip_ratio: fraction of the steps skipped at the start (paper: 0.3).
        image_size: model input side in pixels (paper: 512).
        keep_margin: pixels between the edit mask and the keep mask (free to harmonise).
        feather: width in pixels of the blend ramp inside the mask when pasting the result back.
        weights_dir, unet_id, vae_id, text_encoder_id, device, dtype: see :func:`load_radedit_components`.
        components: already-loaded :class:`RadEditComponents` (tests, or sharing one load).
        seed: seed of the inversion noise.
    """

    name = "radedit"

    def __init__(self, steps: int = 200, guidance_scale: float = 7.5, skip_ratio: float = 0.3, image_size: int = 512,
                 keep_margin: int = 16, feather: float = 4.0, weights_dir: str | os.PathLike[str] | None = None,
                 unet_id: str = UNET_ID, vae_id: str = VAE_ID, text_encoder_id: str = TEXT_ENCODER_ID,
                 device: str | None = None, dtype: Any = None, components: RadEditComponents | None = None,
                 seed: int = 0):
        if not 0.0 <= skip_ratio < 1.0:
            raise ConfigError(f"radedit skip_ratio must be in [0, 1), got {skip_ratio}")
        if steps < 1:
            raise ConfigError(f"radedit steps must be >= 1, got {steps}")
        self.steps = int(steps)
        self.guidance_scale = float(guidance_scale)
        self.skip_ratio = float(skip_ratio)
        self.image_size = int(image_size)
        self.keep_margin = int(keep_margin)
        self.feather = float(feather)
        self.weights_dir = weights_dir
        self.unet_id, self.vae_id, self.text_encoder_id = unet_id, vae_id, text_encoder_id
        self.device, self.dtype = device, dtype
        self._c = components
        self._given = components is not None
        self._weights_id: dict[str, str | None] | None = None
        self.seed = int(seed)

    def params(self) -> dict[str, Any]:
        return {"steps": self.steps, "guidance": self.guidance_scale, "skip": self.skip_ratio, "size": self.image_size,
                "keep_margin": self.keep_margin, "feather": self.feather,
                "weights": str(self.weights_dir) if self.weights_dir else [self.unet_id, self.vae_id, self.text_encoder_id]}

    @property
    def components(self) -> RadEditComponents:
        if self._c is None:
            self._c = load_radedit_components(unet_id=self.unet_id, vae_id=self.vae_id, text_encoder_id=self.text_encoder_id,
                                              weights_dir=self.weights_dir, device=self.device, dtype=self.dtype)
        return self._c

    def prepare(self) -> None:
        _ = self.components

    def sample_inputs(self, sample: Sample) -> dict[str, Any]:
        """``{"weights": weights_identity()}`` (the same for every sample): the edits are a function of the
        weights, which the settings (:attr:`cache_id`) only name, so retrained weights in the same folder
        must not be served old edits (:class:`~medfocus.editing.base.EditCache`)."""
        return {"weights": self.weights_identity()}

    def weights_identity(self) -> dict[str, str | None]:
        """Fingerprint of each component's weights, computed once per editor without loading them.

        From files, by :func:`medfocus.lvlm.loading.weights_fingerprint` (as for LVLM weights): a local
        component folder (``weights_dir/unet`` ...) by a SHA-1 over its ``config.json`` and weight files,
        the text encoder's also over its tokenizer files (:data:`~medfocus.lvlm.loading.TOKENIZER_FILES`)
        and code (``*.py``, run with ``trust_remote_code``), which change the text conditioning without
        touching the weights; a hub id by the revision of its cached snapshot (which pins every file;
        ``None`` when not cached: loading fails then). ``weights_dir/scheduler/scheduler_config.json``
        adds its SHA-256. Components passed in as ``components`` have no files: a SHA-1 over their
        parameters and buffers (names, dtypes, values), plus ``text_encoder_files``: the fingerprint of
        the text encoder's config and the tokenizer as they would be saved.
        """
        if self._weights_id is None:
            from medfocus.lvlm.loading import TOKENIZER_FILES, module_weights_digest, weights_fingerprint

            parts = ("unet", "vae", "text_encoder")
            te_files = (*TOKENIZER_FILES, "*.py")
            if self._given:
                self._weights_id = {c: module_weights_digest(getattr(self.components, c)) for c in parts}
                self._weights_id["text_encoder_files"] = self._saved_text_encoder_files_fingerprint()
            elif self.weights_dir is not None:
                from medfocus.io.fingerprint import file_sha256

                root = Path(self.weights_dir)
                self._weights_id = {c: weights_fingerprint(root, c, also=te_files if c == "text_encoder" else ())
                                    for c in parts}
                h = file_sha256(root / "scheduler" / "scheduler_config.json")
                self._weights_id["scheduler"] = None if h is None else h[1]
            else:
                self._weights_id = {"unet": weights_fingerprint(self.unet_id, "unet"),
                                    "vae": weights_fingerprint(self.vae_id),
                                    "text_encoder": weights_fingerprint(self.text_encoder_id, also=te_files)}
        return self._weights_id

    def _saved_text_encoder_files_fingerprint(self) -> str | None:
        """:func:`~medfocus.lvlm.loading.weights_fingerprint` of the given text encoder's config and
        tokenizer, saved to a temporary folder (both are written without the folder they came from)."""
        import tempfile

        from medfocus.lvlm.loading import TOKENIZER_FILES, weights_fingerprint

        c = self.components
        with tempfile.TemporaryDirectory(prefix="medfocus-radedit-") as tmp:
            c.text_encoder.config.save_pretrained(tmp)
            c.tokenizer.save_pretrained(tmp)
            return weights_fingerprint(tmp, also=TOKENIZER_FILES)

    # ---- building blocks --------------------------------------------------------------------------
    def _encode_text(self, prompts: list[str]) -> Any:
        import torch

        c = self.components
        tok = c.tokenizer(prompts, padding="max_length", truncation=True, max_length=c.tokenizer.model_max_length,
                          return_tensors="pt")
        dev = next(c.unet.parameters()).device
        with torch.no_grad():
            out = c.text_encoder(input_ids=tok["input_ids"].to(dev), attention_mask=tok["attention_mask"].to(dev))
        hidden = getattr(out, "last_hidden_state", None)
        if hidden is None:
            hidden = out[0]
        return hidden.to(next(c.unet.parameters()).dtype)

    def _vae_factor(self) -> int:
        return 2 ** (len(self.components.vae.config.block_out_channels) - 1)

    def _latent_masks(self, canvas_edit: np.ndarray, canvas_keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pixel masks on the canvas -> latent-grid masks: edit = any pixel of the cell in the edit
        mask; keep = every pixel of the cell in the keep mask (keep and edit never overlap)."""
        f = self._vae_factor()
        S = self.image_size
        g = S // f
        e = canvas_edit.reshape(g, f, g, f).any(axis=(1, 3))
        k = canvas_keep.reshape(g, f, g, f).all(axis=(1, 3)) & ~e
        return e, k

    def edit_latents(self, canvas: np.ndarray, canvas_edit: np.ndarray, canvas_keep: np.ndarray, prompt: str) -> dict[str, Any]:
        """Inversion + masked guided reverse process on a ``(S, S)`` uint8 canvas.

        Args:
            canvas: ``(S, S)`` uint8 image (S = ``image_size``).
            canvas_edit, canvas_keep: ``(S, S)`` bool pixel masks.
            prompt: the edit prompt.
        Returns:
            dict with ``z0`` (clean latents, ``(1, C, S/f, S/f)``), ``latents`` (final edited latents),
            ``edit``/``keep`` (latent-grid bool masks) and ``image`` (decoded ``(S, S)`` float32 in [0, 255]).
        """
        import torch

        c = self.components
        S = self.image_size
        f = self._vae_factor()
        if S % f or canvas.shape != (S, S):
            raise ConfigError(f"radedit canvas must be {S}x{S} with a side divisible by {f}, got {canvas.shape}")
        dev = next(c.unet.parameters()).device
        dtype = next(c.unet.parameters()).dtype
        gen = torch.Generator(device="cpu").manual_seed(self.seed)

        x = torch.from_numpy(canvas.astype(np.float32) / 127.5 - 1.0)[None, None].repeat(1, 3, 1, 1).to(dev, c.vae.dtype)
        sf = float(getattr(c.vae.config, "scaling_factor", 1.0))
        with torch.no_grad():
            z0 = c.vae.encode(x).latent_dist.mean.to(dtype) * sf
        e_np, k_np = self._latent_masks(canvas_edit, canvas_keep)
        m_edit = torch.from_numpy(e_np).to(dev, dtype)[None, None]
        m_keep = torch.from_numpy(k_np).to(dev, dtype)[None, None]

        sched = c.scheduler
        sched.set_timesteps(self.steps)
        ts = [int(t) for t in sched.timesteps]
        acp = sched.alphas_cumprod.to(torch.float64)
        final = float(sched.final_alpha_cumprod)
        abar = [float(acp[t]) for t in ts] + [final]  # abar[k]: level k (k = N is the clean end)
        N = len(ts)

        emb_u = self._encode_text([""])
        emb_c = self._encode_text([prompt])

        def eps_of(xt: Any, t: int, emb: Any) -> Any:
            with torch.no_grad():
                return c.unet(xt, t, encoder_hidden_states=emb).sample

        def step_mean(xt: Any, eps: Any, k: int) -> tuple[Any, float]:
            """Mean of the eta=1 DDIM step from level k to k+1 and its sigma."""
            a_t, a_p = abar[k], abar[k + 1]
            var = (1 - a_p) / (1 - a_t) * (1 - a_t / a_p)
            sigma = float(np.sqrt(max(var, 0.0)))
            x0_pred = (xt - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5
            mu = a_p ** 0.5 * x0_pred + max(1 - a_p - sigma ** 2, 0.0) ** 0.5 * eps
            return mu, sigma

        # edit-friendly inversion: independent noisy latents per level, then the noise maps
        xs = []
        for k in range(N):
            noise = torch.randn(z0.shape, generator=gen, dtype=torch.float32).to(dev, dtype)
            xs.append(abar[k] ** 0.5 * z0 + (1 - abar[k]) ** 0.5 * noise)
        xs.append(z0)
        start = int(self.skip_ratio * N)
        noise_maps: dict[int, Any] = {}
        for k in range(start, N):
            mu, sigma = step_mean(xs[k], eps_of(xs[k], ts[k], emb_u), k)
            # sigma == 0 (last step, final alpha 1): the step is deterministic and (x_prev - mu) / sigma
            # would be 0/0 (the public pipeline's NaN). Store the residual itself instead, so that the
            # unguided reverse process still reproduces z0 exactly.
            noise_maps[k] = (xs[k + 1] - mu) / sigma if sigma > 0 else xs[k + 1] - mu

        # guided reverse process, guidance inside the edit mask, kept latents pasted at the matching level
        xt = xs[start]
        emb_uc = torch.cat([emb_u, emb_c])
        for k in range(start, N):
            eu, ec = eps_of(torch.cat([xt, xt]), ts[k], emb_uc).chunk(2)  # one batched UNet call
            eps = eu + self.guidance_scale * m_edit * (ec - eu)
            mu, sigma = step_mean(xt, eps, k)
            xt = mu + (sigma * noise_maps[k] if sigma > 0 else noise_maps[k])
            xt = m_keep * xs[k + 1] + (1 - m_keep) * xt  # level k+1, NOT xs[k] (the public pipeline's bug)
        with torch.no_grad():
            dec = c.vae.decode((xt / sf).to(c.vae.dtype)).sample
        img = ((dec.float().mean(dim=1)[0].clamp(-1, 1) + 1) * 127.5).cpu().numpy()
        return {"z0": z0, "latents": xt, "edit": e_np, "keep": k_np, "image": img.astype(np.float32)}

    def _edit(self, image: np.ndarray, mask: np.ndarray, prompt: str, *, sample: Sample | None,
              kind: str | None) -> np.ndarray:
        from scipy.ndimage import binary_dilation

        from medfocus.io import Letterbox

        H, W = image.shape
        lb = Letterbox.fit((W, H), self.image_size)
        canvas = lb.apply(image, fill=0)
        canvas_edit = lb.map_to_canvas(mask.astype(np.float32)) > 0
        content = np.zeros_like(canvas_edit)
        content[lb.content_slice()] = True
        near = binary_dilation(canvas_edit, iterations=self.keep_margin) if self.keep_margin > 0 else canvas_edit
        canvas_keep = ~near | ~content  # letterbox padding is always kept
        out = self.edit_latents(canvas, canvas_edit & content, canvas_keep, prompt)
        edited = lb.map_to_original(out["image"])
        return composite(image, edited, feather_alpha(mask, self.feather))
