"""Class-conditional sampling pipelines for the embedded models, shaped like diffusers pipelines.

``pipe(class_labels, num_inference_steps, guidance_scale, generator) -> images``. The denoiser sits
where diffusers pipelines keep it (``pipe.transformer`` for the DiT, ``pipe.unet`` with
``encoder_hidden_states`` for the U-Net), so tools written for diffusers find it.
"""

from __future__ import annotations

import numbers

import numpy as np
import torch
from diffusers import DiffusionPipeline, DiTTransformer2DModel, UNet2DConditionModel
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from diffaccel.calibration.workload import Workload
from diffaccel.errors import WorkloadError
from diffaccel.seeds import CALIBRATION_SEED, image_seed
from diffaccel.zoo.models import ClassTokenEmbedder

DEFAULT_GUIDANCE = 3.0


def shapes_workload(classes: list[int], num_steps: int = 50, guidance: float = DEFAULT_GUIDANCE, per_class: int = 2,
                    seed: int = 0, calibration: bool = True, batch_size: int = 64) -> Workload:
    """``per_class`` images of each class, in calls of at most ``batch_size`` images; noise from the
    calibration seed range unless ``calibration`` is False (then the evaluation seeds that
    ``diffaccel generate --seed`` uses)."""
    if not classes or per_class < 1:
        raise WorkloadError(f"the workload is empty: give classes and at least one image per class "
                            f"(got {list(classes)}, {per_class} per class)")
    base = CALIBRATION_SEED + seed if calibration else seed
    labels = [c for c in classes for _ in range(per_class)]
    seeds = [image_seed(base, c, j) for c in classes for j in range(per_class)]
    calls = [{"class_labels": labels[i:i + batch_size], "num_inference_steps": num_steps, "guidance_scale": guidance,
              "seed": seeds[i:i + batch_size]} for i in range(0, len(labels), batch_size)]
    text = (f"{'calibration' if calibration else 'evaluation'} seeds base {base}, classes {list(classes)}, "
            f"{per_class} per class, {num_steps} steps, guidance {guidance:g}")
    return Workload.from_calls(calls, description=text)


class ShapesPipeline(DiffusionPipeline):
    """Shared sampling loop; subclasses say how one denoiser call is made."""

    denoiser_name = ""

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self, self.denoiser_name)

    @property
    def num_classes(self) -> int:
        """Classes of the loaded model (its last label, ``num_classes``, is the null class)."""
        raise NotImplementedError

    def workload_calls(self, num_steps: int = 50, guidance: float = DEFAULT_GUIDANCE, per_class: int = 2,
                       seed: int = 0, calibration: bool = True, classes: list[int] | None = None,
                       batch_size: int = 64) -> Workload:
        """``per_class`` images of every class of this model (or of ``classes``): see ``shapes_workload``."""
        ids = list(range(self.num_classes)) if classes is None else list(classes)
        return shapes_workload(ids, num_steps, guidance, per_class, seed, calibration, batch_size)

    def denoise(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _check_inputs(self, class_labels, num_inference_steps, guidance_scale) -> torch.Tensor:
        labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
        if labels.numel() == 0:
            raise ValueError("class_labels is empty: give at least one class id")
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise ValueError(f"class ids must lie in [0, {self.num_classes}) for this model, got {labels.tolist()}")
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, numbers.Integral) \
                or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, numbers.Real) \
                or not np.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
        return labels

    @torch.no_grad()
    def __call__(
        self,
        class_labels,
        num_inference_steps: int = 50,
        guidance_scale: float = DEFAULT_GUIDANCE,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pt",
        return_dict: bool = True,
    ):
        """Sample one image per class label. ``guidance_scale`` <= 1 disables classifier-free
        guidance (one denoiser call per step instead of a doubled batch). Images come in [0, 1]."""
        labels = self._check_inputs(class_labels, num_inference_steps, guidance_scale)
        device = self._execution_device
        denoiser = self.denoiser
        size = denoiser.config.sample_size
        channels = denoiser.config.in_channels
        x = randn_tensor((len(labels), channels, size, size), generator=generator, device=device)
        x = x * self.scheduler.init_noise_sigma
        labels = labels.to(device)
        guided = guidance_scale > 1.0
        model_labels = torch.cat([torch.full_like(labels, self.num_classes), labels]) if guided else labels

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_in = torch.cat([x, x]) if guided else x
            model_in = self.scheduler.scale_model_input(model_in, t)
            out = self.denoise(model_in, t.expand(model_in.shape[0]), model_labels)
            if guided:
                uncond, cond = out.chunk(2)
                out = uncond + guidance_scale * (cond - uncond)
            x = self.scheduler.step(out, t, x).prev_sample

        images = (x / 2 + 0.5).clamp(0, 1)
        if output_type == "np":
            images = images.permute(0, 2, 3, 1).cpu().numpy()
        elif output_type == "pil":
            images = self.numpy_to_pil(images.permute(0, 2, 3, 1).cpu().numpy())
        elif output_type != "pt":
            raise ValueError(f"output_type must be pt, np or pil, got {output_type!r}")
        return ImagePipelineOutput(images=images) if return_dict else (images,)


class ShapesDiTPipeline(ShapesPipeline):
    denoiser_name = "transformer"

    def __init__(self, transformer: DiTTransformer2DModel, scheduler):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)

    @property
    def num_classes(self) -> int:
        return int(self.transformer.config.num_embeds_ada_norm)

    def denoise(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.transformer(x, timestep=t, class_labels=labels).sample


class ShapesUNetPipeline(ShapesPipeline):
    denoiser_name = "unet"

    def __init__(self, unet: UNet2DConditionModel, class_embedder: ClassTokenEmbedder, scheduler):
        super().__init__()
        self.register_modules(unet=unet, class_embedder=class_embedder, scheduler=scheduler)

    @property
    def num_classes(self) -> int:
        return int(self.class_embedder.config.num_classes)

    def denoise(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, encoder_hidden_states=self.class_embedder(labels)).sample


def sample(pipe: ShapesPipeline, labels: torch.Tensor, seeds: list[int], steps: int, guidance: float,
           batch_size: int = 64) -> torch.Tensor:
    """Images in [0, 1] for the given labels and per-image seeds, in batches of ``batch_size``."""
    out = []
    for start in range(0, len(labels), batch_size):
        gens = [torch.Generator().manual_seed(s) for s in seeds[start:start + batch_size]]
        out.append(pipe(labels[start:start + batch_size], num_inference_steps=steps,
                        guidance_scale=guidance, generator=gens).images)
    return torch.cat(out)
