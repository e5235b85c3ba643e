"""Quantization: calibration, quantized layers, plans with a quant section, and bad input."""

import warnings

import pytest
import torch

import diffaccel
from conftest import run_cli
from diffaccel import methods
from diffaccel.calibration.record import activation_ranges
from diffaccel.calibration.reference import identity_plan
from diffaccel.errors import CacheError
from diffaccel.plan import Plan, PlanError
from diffaccel.quant import Calibration, QuantError, QuantSpec, quantize_, weight_bytes
from diffaccel.quant import layers as quant_layers
from diffaccel.quant.calibrate import shortcut_splits
from diffaccel.quant.layers import QuantLinear, pack_nibbles, quantize_weight, unpack_nibbles
from diffaccel.runtime.features import quantization as quantization_feature
from diffaccel.zoo.models import build_dit
from test_engine import call, make_pipes, untouched

STEPS = 4


@pytest.fixture(scope="module")
def pipes():
    return make_pipes()


@pytest.fixture(scope="module")
def calibrations(pipes, tmp_path_factory):
    folder = tmp_path_factory.mktemp("calib")
    paths = []
    for pipe in pipes:
        cal = activation_ranges(pipe, pipe.workload_calls(STEPS, per_class=1, classes=[0, 1, 2, 3]), progress=False)
        paths.append(cal.save(folder / f"{type(pipe.denoiser).__name__}.safetensors"))
    return paths


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


def same_state(model, saved) -> bool:
    tensors, types = saved
    now = model.state_dict()
    return [type(m) for m in model.modules()] == types and all(torch.equal(now[k], v) for k, v in tensors.items())


def test_int8_matmul_path_equals_simulated_quantization():
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 96)
    x = torch.randn(3, 40, 64) * 2
    absmax = x.abs().amax().reshape(1, 1)
    fake, real = QuantLinear(layer, 8, 8, absmax), QuantLinear(layer, 8, 8, absmax, mode="int8")
    assert real.weight_q.dtype == torch.int8
    torch.testing.assert_close(real(x), fake(x), rtol=1e-5, atol=1e-5)
    # fbgemm's dynamic kernel measures the activation range itself (7-bit unsigned): close, not equal
    dynamic = QuantLinear(layer, 8, 8, absmax, mode="int8-dynamic")
    assert (dynamic(x) - fake(x)).abs().max() < 0.05 * fake(x).abs().max()
    skewed = torch.nn.functional.silu(x)  # mostly positive, as after an activation
    assert (dynamic(skewed) - layer(skewed)).norm() < 0.05 * layer(skewed).norm()
    assert (fake(x) - layer(x)).abs().max() < 0.05 * layer(x).abs().max()  # close to fp32, not equal
    assert not torch.equal(fake(x), layer(x))


def test_four_bit_weights_pack_two_per_byte_and_round_trip():
    q, scale = quantize_weight(torch.randn(7, 5), 4)
    assert q.abs().max() <= 7 and scale.shape == (7,)
    packed = pack_nibbles(q)
    assert packed.dtype == torch.uint8 and packed.numel() == 18  # 35 values -> 18 bytes
    assert torch.equal(unpack_nibbles(packed, q.shape), q)


@pytest.mark.parametrize("which", [0, 1])
def test_quantized_plan_runs_restores_the_model_and_counts_full_macs(pipes, calibrations, which):
    pipe = pipes[which]
    base = call(pipe, steps=STEPS)
    saved = state(pipe.denoiser)
    plan = methods.fora(pipe.denoiser, STEPS, interval=1).with_quant(
        QuantSpec(weight_bits=8, act_bits=8, backend="int8", calibration=str(calibrations[which])))
    with diffaccel.accelerate(pipe, plan) as run:
        out = call(pipe, steps=STEPS)
        with pytest.raises(PlanError, match="plans do not nest"):  # not "fitted on other weights": they are swapped
            diffaccel.enable(pipe, plan)
    assert not torch.equal(out, base) and (out - base).abs().mean() < 0.05
    assert run.stats.macs == run.stats.full_macs  # int8 products are counted, not dropped
    assert untouched(pipe.denoiser) and same_state(pipe.denoiser, saved)
    assert torch.equal(call(pipe, steps=STEPS), base)


def test_per_step_scales_refuse_another_step_count(pipes, calibrations):
    """A per-step quantized plan without a schedule runs at any step count but its scales fit one."""
    pipe = pipes[0]
    spec = QuantSpec(weight_bits=8, act_bits=8, calibration=str(calibrations[0]))
    trajectory = identity_plan(pipe.denoiser).with_quant(spec)
    per_step = identity_plan(pipe.denoiser).with_quant(spec.model_copy(update={"per_step": True}))
    assert per_step.step_free
    base = call(pipe, steps=STEPS + 2)
    with diffaccel.accelerate(pipe, per_step):
        call(pipe, steps=STEPS)  # the step count it was calibrated for
        with pytest.raises(PlanError, match=f"calibrated per step for {STEPS} steps but the pipeline runs {STEPS + 2}"):
            call(pipe, steps=STEPS + 2)
    with diffaccel.accelerate(pipe, trajectory):
        call(pipe, steps=STEPS + 2)
    assert untouched(pipe.denoiser) and torch.equal(call(pipe, steps=STEPS + 2), base)


@pytest.mark.parametrize("backend", ["int8", "int8-dynamic"])
def test_flop_counter_sees_the_int8_products(pipes, calibrations, backend):
    """torch's FLOP counter must count int8 GEMMs as MACs, or a quantized row's MAC ratio is inflated."""
    from diffaccel.eval.cost import count_macs

    pipe = pipes[0]
    full = count_macs(lambda: call(pipe, steps=STEPS))
    plan = methods.fora(pipe.denoiser, STEPS, interval=1).with_quant(
        QuantSpec(weight_bits=8, act_bits=8, backend=backend, calibration=str(calibrations[0])))
    with diffaccel.accelerate(pipe, plan):
        quantized = count_macs(lambda: call(pipe, steps=STEPS))
    assert quantized == pytest.approx(full, rel=0.01)


def test_quantized_weights_take_a_fraction_of_the_memory(pipes, calibrations):
    model = pipes[0].denoiser
    full = weight_bytes(model)
    sizes = {}
    for bits in (8, 4):
        handle = quantize_(model, QuantSpec(weight_bits=bits, calibration=str(calibrations[0])),
                           Calibration.load(calibrations[0]))
        sizes[bits] = weight_bytes(model)
        handle.restore()
    assert sizes[4] < sizes[8] < 0.35 * full
    assert weight_bytes(model) == full


def test_unet_skip_concatenations_get_one_range_per_half(pipes, calibrations):
    unet = pipes[1].denoiser
    splits = shortcut_splits(unet)
    assert splits and all(name.startswith("up_blocks.") for name in splits)
    cal = Calibration.load(calibrations[1])
    for name in splits:
        assert cal.absmax[name].shape == (STEPS + 1, 2)
    assert cal.absmax["conv_in"].shape == (STEPS + 1, 1)


def test_plan_file_carries_its_calibration_beside_it(pipes, calibrations, tmp_path, monkeypatch):
    plan = methods.fora(pipes[0].denoiser, STEPS, interval=2).with_quant(
        QuantSpec(calibration=str(calibrations[0])))
    plan.save(tmp_path / "joint.json")
    assert (tmp_path / "joint.calibration.safetensors").is_file()
    loaded = Plan.load(tmp_path / "joint.json")
    assert loaded.quant.calibration == str((tmp_path / "joint.calibration.safetensors").resolve())
    with diffaccel.accelerate(pipes[0], loaded):
        call(pipes[0], steps=STEPS)
    monkeypatch.chdir(tmp_path.parent)  # loaded by a relative path, then the working folder changes
    relative = Plan.load(f"{tmp_path.name}/joint.json")
    monkeypatch.chdir(tmp_path)
    with diffaccel.accelerate(pipes[0], relative):
        call(pipes[0], steps=STEPS)
    with pytest.raises(QuantError, match="is a folder"):
        Calibration.load(tmp_path)


def test_quantization_refuses_what_it_cannot_run_before_running(pipes, calibrations):
    """fbgemm's dynamic int8 layers take float32 activations (autocast fed them bfloat16 mid-run), and
    the quantized layers compute from float32 weights (a bfloat16 model failed mid-run)."""
    plan = methods.fora(pipes[0].denoiser, STEPS, interval=2).with_quant(
        QuantSpec(backend="int8-dynamic", calibration=str(calibrations[0])))
    with pytest.raises(PlanError, match="int8-dynamic backend .* takes float32 activations"):
        Plan.from_dict({**plan.model_dump(), "precision": "bfloat16"})
    half = build_dit().to(torch.bfloat16)
    with pytest.raises(QuantError, match="needs a float32 denoiser; this DiTTransformer2DModel holds torch.bfloat16"):
        quantize_(half, QuantSpec(calibration=str(calibrations[0])), Calibration.load(calibrations[0]))


def bad_calibration(path, tmp_path, change):
    cal = Calibration.load(path)
    change(cal)
    return cal.save(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("case", ["other model", "other bits", "nan range", "zero range", "zero step", "flat range",
                                  "few rows"])
def test_bad_calibration_is_refused_and_the_model_left_untouched(pipes, calibrations, tmp_path, case):
    pipe = pipes[0]
    saved, base = state(pipe.denoiser), call(pipe, steps=STEPS)
    name = "transformer_blocks.0.attn1.to_q"
    if case == "other model":
        path = calibrations[1]
    elif case == "other bits":
        path = bad_calibration(calibrations[0], tmp_path, lambda c: setattr(c, "act_bits", 6))
    elif case == "nan range":
        path = bad_calibration(calibrations[0], tmp_path, lambda c: c.absmax[name].fill_(float("nan")))
    elif case == "zero range":
        path = bad_calibration(calibrations[0], tmp_path, lambda c: c.absmax[name].zero_())
    elif case == "zero step":  # a per-step scale of zero: NaN at that step
        path = bad_calibration(calibrations[0], tmp_path, lambda c: c.absmax[name][1].zero_())
    else:  # a damaged tensor: a bare IndexError, or another step's range used silently
        rows = {"flat range": lambda t: t[:, 0].contiguous(), "few rows": lambda t: t[-2:].contiguous()}[case]
        path = bad_calibration(calibrations[0], tmp_path, lambda c: c.absmax.update({name: rows(c.absmax[name])}))
    plan = methods.fora(pipe.denoiser, STEPS, interval=1).with_quant(QuantSpec(calibration=str(path)))
    with pytest.raises(QuantError) as info:
        with diffaccel.accelerate(pipe, plan):
            pass
    assert {"other model": "another model", "other bits": "6-bit", "nan range": "not finite",
            "zero range": "is zero", "zero step": "is zero at step 1", "flat range": "not one row per step",
            "few rows": "not one row per step"}[case] in str(info.value)
    assert untouched(pipe.denoiser) and same_state(pipe.denoiser, saved)
    assert torch.equal(call(pipe, steps=STEPS), base)


def test_overrides_on_unsupported_or_missing_layers_are_refused(pipes, calibrations):
    model = pipes[0].denoiser
    saved = state(model)
    cal = Calibration.load(calibrations[0])
    with pytest.raises(QuantError, match="LayerNorm"):
        quantize_(model, QuantSpec(overrides={"transformer_blocks.0.norm3": 8}, calibration="x"), cal)
    with pytest.raises(QuantError, match="matches no"):
        quantize_(model, QuantSpec(overrides={"nothing.here*": 8}, calibration="x"), cal)
    assert same_state(model, saved)


def test_int8_backend_refuses_other_bit_widths():
    with pytest.raises(PlanError, match="W8A8 only"):
        Plan.from_dict({"adapter": "dit", "model_class": "DiTTransformer2DModel", "units": ["a"], "num_steps": 1,
                        "schedule": ["C"], "quant": {"weight_bits": 4, "backend": "int8", "calibration": "c"}})


def test_quantize_command_rejects_bad_bits(monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "quantize", "--bits", "w8", "--out", "/tmp/never")
    assert code == 2 and "w8a8" in err
    code, _, err = run_cli(monkeypatch, capsys, "quantize", "--bits", "w3a9", "--out", "/tmp/never")
    assert code == 2 and "activations 4 to 8" in err and len(err.strip().splitlines()) == 1


def test_generate_rejects_a_backend_that_cannot_run_the_bit_width(monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "generate", "--quant", "w4a8", "--quant-backend", "int8",
                           "--per-class", "1", "--out", "/tmp/never")
    assert code == 2 and "W8A8 only" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("speed", [0.04, 1.5])
def test_the_int8_backend_warns_where_this_cpus_int8_products_are_slower_than_float(pipes, calibrations,
                                                                                   monkeypatch, speed):
    """``torch._int_mm`` ran 23x slower than float32 on an AVX2-only CPU: a plan with the int8
    backend says so and names the backend to use; where int8 is faster, nothing is said. The
    measurement itself is real and cheap."""
    assert 0 < quant_layers.int8_matmul_speed() < float("inf")
    monkeypatch.setattr(quantization_feature, "int8_matmul_speed", lambda: speed)
    spec = QuantSpec(weight_bits=8, act_bits=8, backend="int8", calibration=str(calibrations[0]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with diffaccel.accelerate(pipes[0], methods.fora(pipes[0].denoiser, STEPS, interval=1).with_quant(spec)):
            pass
    said = [str(w.message) for w in caught if "int8 matrices" in str(w.message)]
    assert (said == []) == (speed > 1) and all("25x slower" in s and "int8-dynamic" in s for s in said)


# -- found by using quantization on stock pipelines as a user would ----------------------------------
@pytest.mark.parametrize("backend", ["fake", "int8", "int8-dynamic"])
def test_sdxl_runs_under_every_backend_its_pipeline_reading_layer_shapes(backend, tmp_path):
    """SDXL's pipeline reads ``unet.add_embedding.linear_1.in_features``: the quantized stand-ins had
    no such attribute, and every quantized plan stopped there."""
    from stock_pipelines import sdxl

    pipe, call_ = sdxl()
    spec = methods.quant_spec(pipe, [call_], "w8a8", backend, calibration=str(tmp_path / "c.safetensors"))
    base = pipe(**call_, generator=torch.Generator().manual_seed(0), output_type="pt").images
    with diffaccel.accelerate(pipe, methods.fora(pipe, call_["num_inference_steps"], interval=1).with_quant(spec)):
        layer = pipe.unet.add_embedding.linear_1
        assert isinstance(layer, QuantLinear) and (layer.in_features, layer.out_features) == (40, 32)
        assert layer.weight.shape == (32, 40) and layer.weight.dtype == torch.float32
        out = pipe(**call_, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert out.shape == base.shape and (out - base).abs().max() < 0.1


@pytest.mark.parametrize("backend", ["int8", "int8-dynamic"])
def test_the_integer_backends_stop_on_a_non_finite_input_as_the_float_run_does(pipes, calibrations, backend):
    spec = QuantSpec(weight_bits=8, act_bits=8, backend=backend, calibration=str(calibrations[0]))
    plan = methods.fora(pipes[0].denoiser, STEPS, interval=1).with_quant(spec)
    model = pipes[0].denoiser
    x = torch.randn(2, model.config.in_channels, model.config.sample_size, model.config.sample_size)
    x[0, 0, 0, 0] = float("nan")  # rounded to an integer, it had run on to a finite output
    with diffaccel.accelerate(model, plan), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CacheError, match="non-finite value .* int8 layer"):
            model(x, torch.tensor([999, 999]), class_labels=torch.tensor([0, 1]))


def test_a_calibration_is_reused_only_for_the_same_calls_pipeline_and_file(pipes, tmp_path):
    from diffaccel.calibration.workload import Workload
    from diffaccel.methods.ptq import workload_key

    big = torch.zeros(1, 3, 64, 64)
    other = big.clone()
    other[..., 30:34, 30:34] = 1.0  # repr shows a large tensor's corners only: the same text
    keys = {workload_key(Workload.from_calls([{"image": image}])) for image in (big, other)}
    assert len(keys) == 2
    pipe = pipes[0]
    path = tmp_path / "ranges.safetensors"
    methods.quant_spec(pipe, pipe.workload_calls(STEPS, per_class=1, classes=[0]), calibration=str(path))
    made = path.stat().st_mtime_ns
    methods.quant_spec(pipe, pipe.workload_calls(STEPS, per_class=1, classes=[0]), calibration=str(path))
    assert path.stat().st_mtime_ns == made  # the same calls: read back
    with pytest.raises(QuantError, match="calibrated on other calls"):  # had returned the 4-step file for 6 steps
        methods.quant_spec(pipe, pipe.workload_calls(6, per_class=1, classes=[0]), calibration=str(path))
    assert [p.name for p in tmp_path.iterdir()] == ["ranges.safetensors"]  # no temporary file left


def test_an_override_below_eight_bits_on_an_integer_backend_is_refused():
    with pytest.raises(ValueError, match="runs 8-bit weights only"):  # had run simulated, labelled W8A8 int8
        QuantSpec(backend="int8-dynamic", overrides={"*": 4}, calibration="c")
    assert QuantSpec(backend="int8", overrides={"final_layer*": 32}, calibration="c").overrides


def test_overrides_that_keep_every_layer_in_floating_point_warn_that_nothing_is_quantized(pipes, tmp_path):
    pipe = pipes[0]
    with pytest.warns(UserWarning, match="quantizes nothing"):
        methods.quant_spec(pipe, pipe.workload_calls(STEPS, per_class=1, classes=[0]), overrides={"*": 32},
                           calibration=str(tmp_path / "c.safetensors"))


def test_sensitivity_measures_each_layer_at_the_width_the_plan_gives_it():
    """`--keep` layers had been ranked as if at the spec's bits (the worst of all, for an output layer
    the plan keeps in floating point), and the 8-bit defaults scored at 4 bits."""
    from diffaccel.calibration.record import denoiser_calls
    from diffaccel.quant.sensitivity import sensitivity

    pipe = make_pipes()[0]
    workload = pipe.workload_calls(4, per_class=1, classes=[0, 1])
    plan = methods.ptq(pipe, workload, bits="w4a8", keep=("proj_out_2",))
    rows = sensitivity(pipe.denoiser, plan.quant, Calibration.load(plan.quant.calibration),
                       denoiser_calls(pipe, workload, every=2), progress=False)
    by_layer = {row["layer"]: row for row in rows}
    assert by_layer["proj_out_2"]["relative_error"] is None and rows[-1]["layer"] == "proj_out_2"
    assert by_layer["pos_embed.proj"]["bits"] == 8 and {r["bits"] for r in rows[:-1]} == {4, 8}
    assert all(r["relative_error"] > 0 for r in rows[:-1])


def test_the_output_layer_of_pixart_stays_at_8_bits_and_quantize_takes_a_calibration_path():
    from diffaccel.methods.ptq import default_overrides
    from stock_pipelines import build

    pixart, _ = build("pixart-alpha")
    assert default_overrides(4, pixart.transformer).get("proj_out") == 8  # the docs' "layers that touch pixels"
    pipe = make_pipes()[0]
    plan = methods.ptq(pipe, pipe.workload_calls(4, per_class=1, classes=[0]), bits="w8a8")
    handle = quantize_(pipe.denoiser, plan.quant, plan.quant.calibration)  # a path: had been an AttributeError
    handle.restore()
    assert untouched(pipe.denoiser)


class _KeywordCaller(torch.nn.Module):
    """Calls its Linear as ``linear(input=...)``, as AnimateDiff's motion modules call ``proj_in``."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.linear = linear

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(input=hidden)


@pytest.mark.parametrize("backend", ["fake", "int8", "int8-dynamic"])
def test_a_layer_called_with_its_input_by_keyword_is_calibrated_and_quantized(backend, tmp_path):
    """The range recorder read ``args[0]`` (an IndexError blamed on the user's call) and the quantized
    layers took ``x``, not nn.Linear's ``input``."""
    pipe = make_pipes()[0]
    block = pipe.denoiser.transformer_blocks[0].ff.net
    block[-1] = _KeywordCaller(block[-1])
    base = call(pipe, steps=STEPS)
    calls = pipe.workload_calls(STEPS, per_class=1, classes=[0, 1])
    cal = activation_ranges(pipe, calls, progress=False)
    assert any(name.endswith("ff.net.2.linear") for name in cal.absmax)
    plan = methods.fora(pipe.denoiser, STEPS, interval=1).with_quant(
        QuantSpec(weight_bits=8, act_bits=8, backend=backend, calibration=str(cal.save(tmp_path / "c.safetensors"))))
    with diffaccel.accelerate(pipe, plan):
        out = call(pipe, steps=STEPS)
    assert torch.isfinite(out).all() and (out - base).abs().mean() < 0.05
