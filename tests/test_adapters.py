"""End-to-end checks of every adapter with the executor, on tiny randomly initialised diffusers models.

Each model is driven by a hand-written loop of ``STEPS`` forwards with decreasing timesteps, the
model output fed back as the next input (``x = x - 0.1 * out``) so that the steps differ.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from diffusers import (
    DiTTransformer2DModel,
    FluxTransformer2DModel,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)
from torch.utils.flop_counter import FlopCounterMode

from diffaccel import accelerate
from diffaccel.adapters import UnsupportedModelError, adapter_for, supported_classes
from diffaccel.methods import deepcache, faster_diffusion, first_block_cache, fora, taylorseer
from diffaccel.plan import Plan, PlanError

STEPS = 6
BATCH = 2


# -- tiny models ------------------------------------------------------------------------------------
@dataclass
class Case:
    name: str
    model: torch.nn.Module
    sample: torch.Tensor  # the first input
    timesteps: list[float]  # one per step, decreasing
    kwargs: dict  # the other (constant) model arguments
    sample_arg: str = "hidden_states"
    timestep_dtype: torch.dtype = torch.float32


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _dit() -> Case:
    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=3,
                                  sample_size=8, patch_size=2, norm_num_groups=4, num_embeds_ada_norm=10)
    return Case("dit", model.eval(), _randn(BATCH, 4, 8, 8, seed=1), [900, 750, 600, 450, 300, 150],
                {"class_labels": torch.tensor([1, 3])}, timestep_dtype=torch.long)


def _pixart() -> Case:
    torch.manual_seed(0)
    model = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                     num_layers=3, norm_num_groups=4, cross_attention_dim=16, sample_size=8,
                                     patch_size=2, caption_channels=12, use_additional_conditions=False)
    return Case("pixart", model.eval(), _randn(BATCH, 4, 8, 8, seed=1), [900, 750, 600, 450, 300, 150],
                {"encoder_hidden_states": _randn(BATCH, 5, 12, seed=2),
                 "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}},
                timestep_dtype=torch.long)


def _sd3() -> Case:
    torch.manual_seed(0)
    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=3,
                                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
                                  caption_projection_dim=16, pooled_projection_dim=10, pos_embed_max_size=8)
    return Case("sd3", model.eval(), _randn(BATCH, 4, 8, 8, seed=1), [1000.0, 800.0, 600.0, 400.0, 200.0, 50.0],
                {"encoder_hidden_states": _randn(BATCH, 5, 12, seed=2),
                 "pooled_projections": _randn(BATCH, 10, seed=3)})


def _flux() -> Case:
    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=2, num_single_layers=2,
                                   attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
                                   pooled_projection_dim=10, guidance_embeds=False, axes_dims_rope=(2, 2, 4))
    side, text = 4, 5
    img_ids = torch.zeros(side, side, 3)
    img_ids[..., 1] = torch.arange(side)[:, None]
    img_ids[..., 2] = torch.arange(side)[None, :]
    return Case("flux", model.eval(), _randn(BATCH, side * side, 8, seed=1), [1.0, 0.8, 0.6, 0.4, 0.2, 0.05],
                {"encoder_hidden_states": _randn(BATCH, text, 12, seed=2),
                 "pooled_projections": _randn(BATCH, 10, seed=3),
                 "img_ids": img_ids.reshape(-1, 3), "txt_ids": torch.zeros(text, 3)})


def _unet() -> Case:
    torch.manual_seed(0)
    model = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=4, cross_attention_dim=12, attention_head_dim=4)
    return Case("unet", model.eval(), _randn(BATCH, 4, 8, 8, seed=1), [900, 750, 600, 450, 300, 150],
                {"encoder_hidden_states": _randn(BATCH, 5, 12, seed=2)}, sample_arg="sample",
                timestep_dtype=torch.long)


BUILDERS: dict[str, Callable[[], Case]] = {"dit": _dit, "pixart": _pixart, "sd3": _sd3, "flux": _flux,
                                          "unet": _unet}
TRANSFORMERS = ["dit", "pixart", "sd3", "flux"]


@functools.cache
def get_case(name: str) -> Case:
    """One model per architecture for the whole module (the tests never change its weights)."""
    return BUILDERS[name]()


@pytest.fixture(params=list(BUILDERS))
def case(request) -> Case:
    return get_case(request.param)


def drive(case: Case, steps: int = STEPS, fail_at: int | None = None) -> list[torch.Tensor]:
    """The sampling loop: ``steps`` forwards with decreasing timesteps, each output fed back."""
    x = case.sample.clone()
    outs = []
    with torch.no_grad():
        for i in range(steps):
            if i == fail_at:
                raise RuntimeError("boom")
            t = torch.full((BATCH,), case.timesteps[i], dtype=case.timestep_dtype)
            out = case.model(**{case.sample_arg: x}, timestep=t, **case.kwargs, return_dict=False)[0]
            outs.append(out)
            x = x - 0.1 * out
    return outs


_baselines: dict[str, list[torch.Tensor]] = {}


def baseline(case: Case) -> list[torch.Tensor]:
    if case.name not in _baselines:
        _baselines[case.name] = drive(case)
    return _baselines[case.name]


def assert_untouched(case: Case) -> None:
    """No instance attribute left by the executor anywhere in the model, and outputs as before."""
    for name, module in case.model.named_modules():
        leftovers = {"forward", "_diffaccel_executor"} & set(vars(module))
        assert not leftovers, f"{case.name}: module {name or '<model>'} still has {leftovers}"
    for got, want in zip(drive(case), baseline(case), strict=True):
        assert torch.equal(got, want)


def reuse_plans(case: Case) -> dict[str, Plan]:
    """Plans that reuse (or forecast) work; the rule plans' threshold is high enough to always reuse
    after warm-up."""
    model = case.model
    plans = {"fora": fora(model, num_steps=STEPS, interval=3)}
    if case.name == "unet":
        plans["deepcache"] = deepcache(model, num_steps=STEPS, interval=3)
        plans["faster_diffusion"] = faster_diffusion(model, num_steps=STEPS, interval=2, warmup=1, parallel=False)
    else:
        plans["fora_component"] = fora(model, num_steps=STEPS, interval=3, granularity="component")
        plans["first_block_cache"] = first_block_cache(model, threshold=100.0, warmup=2)
        plans["dual_block_cache"] = first_block_cache(model, threshold=100.0, warmup=2, last_blocks=1)
    plans["taylorseer"] = taylorseer(model, num_steps=STEPS, interval=2, order=1, warmup=2)
    return plans


TRANSFORMER_METHODS = ["fora", "fora_component", "first_block_cache", "dual_block_cache", "taylorseer"]
UNET_METHODS = ["fora", "deepcache", "faster_diffusion", "taylorseer"]
REUSE_CASES = [(name, method) for name in TRANSFORMERS for method in TRANSFORMER_METHODS] \
    + [("unet", method) for method in UNET_METHODS]


# -- tests ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("granularity", ["block", "component"])
def test_all_compute_plan_is_bitwise_identical(case, granularity):
    if granularity not in adapter_for(case.model).granularities:
        pytest.skip(f"the {case.name} adapter has no {granularity} granularity")
    plan = fora(case.model, num_steps=STEPS, interval=1, granularity=granularity)
    assert plan.counts() == {"compute": STEPS * len(plan.units), "reuse": 0, "forecast": 0}
    with accelerate(case.model, plan) as run:
        outs = drive(case)
    for step, (got, want) in enumerate(zip(outs, baseline(case), strict=True)):
        assert torch.equal(got, want), f"{case.name}: step {step} differs under an all-compute plan"
    assert run.stats.forwards == STEPS
    assert run.stats.reused == run.stats.forecast == 0
    assert run.stats.macs == run.stats.full_macs > 0
    assert_untouched(case)


@pytest.mark.parametrize(("name", "method"), REUSE_CASES)
def test_reuse_plan_saves_work_and_counts_it(name, method):
    case = get_case(name)
    plan = reuse_plans(case)[method]
    with accelerate(case.model, plan) as run:
        outs = drive(case)
    stats = run.stats
    assert stats.forwards == STEPS
    if method == "taylorseer":
        assert stats.forecast > 0
    else:
        assert stats.reused > 0
    assert 0 < stats.macs < stats.full_macs
    base = baseline(case)
    assert torch.equal(outs[0], base[0])  # the first step always computes everything
    assert all(torch.isfinite(o).all() for o in outs)
    assert any(not torch.equal(o, b) for o, b in zip(outs, base, strict=True)), \
        f"{case.name}/{method}: reuse changed nothing"

    # The executor's MAC count agrees with torch's FLOP counter around the same accelerated loop (a
    # fresh context, so the executor measures its units again). Both sides use FlopCounterMode, which
    # on CPU counts no FLOPs for scaled_dot_product_attention: attention-score MACs are in neither.
    with accelerate(case.model, plan) as run2, FlopCounterMode(display=False) as counter:
        outs2 = drive(case)
    counted = counter.get_total_flops() // 2
    assert run2.stats.as_dict() == stats.as_dict()
    assert all(torch.equal(a, b) for a, b in zip(outs2, outs, strict=True))
    assert abs(run2.stats.macs - counted) <= 0.02 * counted, \
        f"{case.name}/{method}: executor says {run2.stats.macs} MACs, FlopCounterMode {counted}"
    assert_untouched(case)


def test_model_restored_after_exception(case):
    plan = fora(case.model, num_steps=STEPS, interval=3)
    with pytest.raises(RuntimeError, match="boom"), accelerate(case.model, plan):
        drive(case, fail_at=3)
    assert_untouched(case)
    # and a fresh context works normally afterwards
    with accelerate(case.model, plan) as run:
        drive(case)
    assert run.stats.reused > 0
    assert_untouched(case)


def test_plan_for_another_architecture_is_refused(case):
    other_name = "pixart" if case.name == "dit" else "dit"
    plan = fora(get_case(other_name).model, num_steps=STEPS, interval=3)
    with pytest.raises(PlanError, match=rf"made for the '{other_name}' adapter.*make a plan for it"), \
            accelerate(case.model, plan):
        pytest.fail("the context must not open")
    assert_untouched(case)


def test_plan_with_wrong_units_is_refused(case):
    plan = fora(case.model, num_steps=STEPS, interval=3)
    fewer = Plan.from_dict({**plan.model_dump(), "units": plan.units[:-1],
                            "schedule": [row[:-1] for row in plan.schedule]})
    with pytest.raises(PlanError, match="units do not match this model"), accelerate(case.model, fewer):
        pytest.fail("the context must not open")
    assert_untouched(case)


def test_plan_from_a_deeper_dit_is_refused():
    case = get_case("dit")
    torch.manual_seed(0)
    deeper = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=4,
                                   sample_size=8, patch_size=2, norm_num_groups=4, num_embeds_ada_norm=10)
    plan = fora(deeper, num_steps=STEPS, interval=3)
    with pytest.raises(PlanError, match=r"plan lists 4 units .* the model has 3"), accelerate(case.model, plan):
        pytest.fail("the context must not open")
    assert_untouched(case)


def test_plan_with_too_few_steps_is_refused_mid_run(case):
    plan = fora(case.model, num_steps=STEPS - 1, interval=3)
    with pytest.raises(PlanError, match=f"plan is for {STEPS - 1} steps"), accelerate(case.model, plan):
        drive(case)
    assert_untouched(case)


def test_unsupported_model_names_supported_classes():
    with pytest.raises(UnsupportedModelError) as info:
        adapter_for(torch.nn.Linear(2, 2))
    message = str(info.value)
    assert "Linear" in message
    for cls in ("DiTTransformer2DModel", "PixArtTransformer2DModel", "SD3Transformer2DModel",
                "FluxTransformer2DModel", "UNet2DConditionModel"):
        assert cls in message
        assert cls in supported_classes()


def test_runs_of_reused_blocks_are_summed_only_on_a_residual_chain():
    """Serving a run of reused blocks summed at its first block makes the others pass their input
    through: right for a chain, wrong where a block's output is read elsewhere (HunyuanDiT's long
    skips). An adapter without ``residual-chain`` serves each block on its own."""
    import dataclasses

    from diffaccel.runtime.executor import Executor

    case = get_case("dit")
    plan = fora(case.model, num_steps=STEPS, interval=3)
    chain = adapter_for(case.model)
    skips = dataclasses.replace(chain, capabilities=chain.capabilities - {"residual-chain"})
    outputs = {}
    for name, adapter, merge in (("merged", chain, True), ("skips", skips, True), ("per-unit", chain, False)):
        executor = Executor(case.model, plan, adapter=adapter, merge_runs=merge)
        executor.install()
        try:
            outputs[name] = drive(case)
        finally:
            executor.remove()
    assert all(torch.equal(a, b) for a, b in zip(outputs["skips"], outputs["per-unit"], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(outputs["merged"], outputs["per-unit"], strict=True))
    assert_untouched(case)


def test_an_adapter_naming_arguments_the_model_lacks_is_refused_before_anything_changes():
    import dataclasses

    from diffaccel.runtime.executor import Executor

    case = get_case("dit")
    plan = fora(case.model, num_steps=STEPS, interval=2)
    for field in ("sample_arg", "timestep_arg"):
        wrong = dataclasses.replace(adapter_for(case.model), **{field: "x"})
        with pytest.raises(UnsupportedModelError, match=f"{field} is 'x', which DiTTransformer2DModel.forward"):
            Executor(case.model, plan, adapter=wrong)  # had been a bare KeyError mid-run
    assert_untouched(case)


def test_skipped_layers_are_part_of_what_a_forward_costs():
    from diffaccel.eval.cost import condition_shapes

    embeds = torch.zeros(2, 5, 16)
    assert condition_shapes({"encoder_hidden_states": embeds, "skip_layers": [1, 2]}) != condition_shapes(
        {"encoder_hidden_states": embeds, "skip_layers": None})  # SD3's skip-layer guidance had been charged in full


def test_a_begin_index_the_pipeline_sets_is_not_guessed_again():
    """AuraFlow sets the begin index 0 and passes t / 1000, which can equal the schedule's last timestep:
    the run had been taken for an image-to-image call starting there."""
    from diffaccel.runtime.clock import StepClock

    clock = StepClock()
    clock.start([1000.0, 750.0, 500.0, 250.0, 1.0])
    clock.begin_told = True
    clock.find_begin(1.0)
    assert clock.expected_steps == 5
    clock.start([1000.0, 750.0, 500.0, 250.0, 1.0])
    clock.find_begin(500.0)  # no begin index told (DDIM's image-to-image): read off the timestep
    assert clock.expected_steps == 3


def test_two_denoisers_of_one_class_are_named_and_a_video_patch_size_is_spatial():
    """Wan 2.2 keeps ``transformer`` and ``transformer_2``: the plan ran on the first alone, the second
    unaccelerated and uncounted while ``mac_ratio`` read 1.74. A tuple ``patch_size`` (Wan's (1, 2, 2))
    failed a solver plan with int()'s TypeError."""
    from types import SimpleNamespace

    from diffaccel.adapters.registry import denoiser_name, find_adapter

    first, second = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    pipe = SimpleNamespace(components={"transformer": first, "transformer_2": second, "vae": torch.nn.Conv2d(1, 1, 1)})
    with pytest.raises(UnsupportedModelError, match=r"several denoisers of one class \(transformer, transformer_2\)"):
        denoiser_name(pipe)
    assert denoiser_name(pipe, "transformer_2") == "transformer_2"
    pipe.components.pop("transformer_2")
    assert denoiser_name(pipe) == "transformer"
    adapter = find_adapter(_dit().model)
    for size, multiple in ((2, 2), ((1, 2, 2), 2), ((1, 4, 4), 4), (None, 1)):
        assert adapter.size_multiple(SimpleNamespace(config=SimpleNamespace(patch_size=size))) == multiple
