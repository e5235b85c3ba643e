"""Stock diffusers pipelines built from tiny configs with random weights (offline, fast).

Each builder returns ``(pipe, call)``: the pipeline and the keyword arguments of one cheap call
(prompts or embeddings, steps, guidance). Text encoders and tokenizers are real transformers
classes with a small in-memory vocabulary, so the ``prompt`` path runs as a user's would.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    DiTPipeline,
    DiTTransformer2DModel,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtAlphaPipeline,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    PNDMScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

WORDS = ["a", "red", "blue", "green", "circle", "square", "on", "background", "small", "large"]
PROMPTS = ["a red circle on a blue background", "a small green square", "a large blue circle"]


def clip_tokenizer(max_length: int = 32) -> CLIPTokenizer:
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for word in WORDS:
        vocab[word + "</w>"] = len(vocab)
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    tok = CLIPTokenizer(vocab=vocab, merges=[])
    tok.model_max_length = max_length
    return tok


def clip_text_encoder(hidden: int = 16, seed: int = 0, projection: int | None = None) -> CLIPTextModel:
    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=128, hidden_size=hidden, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=1,
                            pad_token_id=1, projection_dim=projection or hidden)
    if projection is not None:
        from transformers import CLIPTextModelWithProjection

        return CLIPTextModelWithProjection(config).eval()
    return CLIPTextModel(config).eval()


def t5_tokenizer() -> T5Tokenizer:
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in WORDS]
    vocab += [(ch, -5.0) for ch in "abcdefghijklmnopqrstuvwxyz"]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def t5_encoder(hidden: int = 16, seed: int = 0) -> T5EncoderModel:
    torch.manual_seed(seed)
    config = T5Config(vocab_size=64, d_model=hidden, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                      relative_attention_num_buckets=8, decoder_start_token_id=0)
    return T5EncoderModel(config).eval()


def vae(latent: int = 4, seed: int = 0, **extra) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(8,), in_channels=3, out_channels=3, latent_channels=latent,
                         down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                         norm_num_groups=4, sample_size=16, **extra).eval()


def _unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
                                norm_num_groups=4, attention_head_dim=4).eval()


def stable_diffusion(scheduler=None) -> tuple[StableDiffusionPipeline, dict]:
    """SD 1.x layout; the scheduler is PNDM (SD's default) unless given."""
    scheduler = scheduler or PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                           skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae(), text_encoder=clip_text_encoder(), tokenizer=clip_tokenizer(),
                                   unet=_unet(), scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe, {"prompt": PROMPTS[:2], "num_inference_steps": 6, "guidance_scale": 5.0, "height": 16,
                  "width": 16}


def sdxl() -> tuple[StableDiffusionXLPipeline, dict]:
    """SDXL layout: two text encoders, and pooled text embeddings and time ids in ``added_cond_kwargs``."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                norm_num_groups=4, attention_head_dim=4, addition_embed_type="text_time",
                                addition_time_embed_dim=4, projection_class_embeddings_input_dim=16 + 6 * 4).eval()
    pipe = StableDiffusionXLPipeline(vae=vae(), text_encoder=clip_text_encoder(), tokenizer=clip_tokenizer(),
                                     text_encoder_2=clip_text_encoder(seed=1, projection=16),
                                     tokenizer_2=clip_tokenizer(), unet=unet,
                                     scheduler=sd_scheduler("EulerDiscreteScheduler", timestep_spacing="leading"))
    pipe.set_progress_bar_config(disable=True)
    return pipe, {"prompt": PROMPTS[:2], "num_inference_steps": 8, "guidance_scale": 5.0, "height": 16, "width": 16}


def sd_scheduler(name: str, **extra):
    """A scheduler of SD's family by class name, on SD's betas."""
    import diffusers

    cls = getattr(diffusers, name)
    return cls(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, **extra)


def _pixart_transformer(seed: int = 0) -> PixArtTransformer2DModel:
    torch.manual_seed(seed)
    return PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                    num_layers=3, norm_num_groups=4, cross_attention_dim=16, caption_channels=16,
                                    sample_size=8, patch_size=2, norm_type="ada_norm_single",
                                    use_additional_conditions=False).eval()


def pixart(sigma: bool = False) -> tuple[DiffusionPipeline, dict]:
    cls = PixArtSigmaPipeline if sigma else PixArtAlphaPipeline
    scheduler = DDIMScheduler(beta_schedule="linear", prediction_type="epsilon")
    pipe = cls(tokenizer=t5_tokenizer(), text_encoder=t5_encoder(), vae=vae(), transformer=_pixart_transformer(),
               scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    call = {"prompt": PROMPTS[:2], "num_inference_steps": 6, "guidance_scale": 4.0, "height": 16, "width": 16,
            "max_sequence_length": 8, "clean_caption": False, "use_resolution_binning": False}
    return pipe, call


def sd3() -> tuple[StableDiffusion3Pipeline, dict]:
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=3,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                        caption_projection_dim=16, pooled_projection_dim=16, out_channels=4).eval()
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
                                    vae=vae(shift_factor=0.0), text_encoder=None, tokenizer=None,
                                    text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(5)
    call = {"prompt_embeds": torch.randn(2, 5, 16, generator=g),
            "pooled_prompt_embeds": torch.randn(2, 16, generator=g),
            "negative_prompt_embeds": torch.randn(2, 5, 16, generator=g),
            "negative_pooled_prompt_embeds": torch.randn(2, 16, generator=g),
            "num_inference_steps": 6, "guidance_scale": 4.0, "height": 16, "width": 16}
    return pipe, call


def flux() -> tuple[FluxPipeline, dict]:
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                         pooled_projection_dim=16, axes_dims_rope=(2, 2, 4)).eval()
    pipe = FluxPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
                        vae=vae(shift_factor=0.0), text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(5)
    call = {"prompt_embeds": torch.randn(2, 5, 16, generator=g),
            "pooled_prompt_embeds": torch.randn(2, 16, generator=g),
            "num_inference_steps": 6, "guidance_scale": 3.5, "height": 16, "width": 16}
    return pipe, call


def flow_with_text_encoders() -> dict[str, DiffusionPipeline]:
    """SD3 (static shift 3) and Flux (resolution-dependent shift) with tiny CLIP and T5 text encoders,
    for the command line's ``--pipeline FOLDER --prompts FILE`` (calls: height and width 16,
    ``max_sequence_length`` 16)."""
    sd3_pipe, _ = sd3()
    sd3_pipe = StableDiffusion3Pipeline(
        transformer=sd3_pipe.transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=sd3_pipe.vae, text_encoder=clip_text_encoder(hidden=8, projection=8), tokenizer=clip_tokenizer(),
        text_encoder_2=clip_text_encoder(hidden=8, seed=1, projection=8), tokenizer_2=clip_tokenizer(),
        text_encoder_3=t5_encoder(), tokenizer_3=t5_tokenizer())
    flux_pipe, _ = flux()
    flux_pipe = FluxPipeline(
        transformer=flux_pipe.transformer, vae=flux_pipe.vae, text_encoder=clip_text_encoder(),
        tokenizer=clip_tokenizer(), text_encoder_2=t5_encoder(), tokenizer_2=t5_tokenizer(),
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15))
    return {"sd3": sd3_pipe, "flux": flux_pipe}


def dit() -> tuple[DiTPipeline, dict]:
    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                        num_layers=3, sample_size=8, patch_size=2, norm_num_groups=4,
                                        num_embeds_ada_norm=1000).eval()  # DiTPipeline's null class is 1000
    pipe = DiTPipeline(transformer=transformer, vae=vae(), scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe, {"class_labels": [1, 3], "num_inference_steps": 6, "guidance_scale": 4.0}


class MyPipeline(DiffusionPipeline):
    """A user's own pipeline: the denoiser sits under a name of its own (``backbone``), and guidance
    runs the two branches as separate calls (as FluxPipeline's true CFG does)."""

    def __init__(self, backbone: DiTTransformer2DModel, scheduler: DDIMScheduler):
        super().__init__()
        self.register_modules(backbone=backbone, scheduler=scheduler)

    @torch.no_grad()
    def __call__(self, class_labels, num_inference_steps: int = 10, guidance_scale: float = 1.0,
                 generator=None, output_type: str = "pt"):
        labels = torch.as_tensor(class_labels)
        null = torch.full_like(labels, self.backbone.config.num_embeds_ada_norm)
        size, channels = self.backbone.config.sample_size, self.backbone.config.in_channels
        x = randn_tensor((len(labels), channels, size, size), generator=generator)
        self.scheduler.set_timesteps(num_inference_steps)
        for t in self.scheduler.timesteps:
            out = self.backbone(x, timestep=t.expand(len(labels)), class_labels=labels).sample
            if guidance_scale > 1:
                uncond = self.backbone(x, timestep=t.expand(len(labels)), class_labels=null).sample
                out = uncond + guidance_scale * (out - uncond)
            x = self.scheduler.step(out, t, x).prev_sample
        return ImagePipelineOutput(images=(x / 2 + 0.5).clamp(0, 1))


def my_pipeline() -> tuple[MyPipeline, dict]:
    torch.manual_seed(0)
    backbone = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=3, out_channels=3,
                                     num_layers=3, sample_size=8, patch_size=2, norm_num_groups=4,
                                     num_embeds_ada_norm=10).eval()
    pipe = MyPipeline(backbone, DDIMScheduler())
    return pipe, {"class_labels": [2, 7], "num_inference_steps": 6, "guidance_scale": 2.0}


def sd_with(name: str, **extra):
    return lambda: stable_diffusion(sd_scheduler(name, **extra))


# name -> (builder, extra call arguments)
CASES = {
    "sd-pndm": (stable_diffusion, {}),
    "sd-ddim-eta": (sd_with("DDIMScheduler"), {"eta": 1.0}),
    "sd-euler-ancestral": (sd_with("EulerAncestralDiscreteScheduler"), {}),
    "sd-dpm-multistep": (sd_with("DPMSolverMultistepScheduler"), {}),
    "sd-heun": (sd_with("HeunDiscreteScheduler"), {}),
    "pixart-alpha": (pixart, {}),
    "pixart-sigma": (lambda: pixart(sigma=True), {}),
    "sd3": (sd3, {}),
    "flux": (flux, {}),
    "dit": (dit, {}),
    "user-pipeline": (my_pipeline, {}),
}


def build(name: str) -> tuple[DiffusionPipeline, dict]:
    """The pipeline of case ``name`` and its call (with the case's extra arguments)."""
    make, extra = CASES[name]
    pipe, call = make()
    return pipe, {**call, **extra}
