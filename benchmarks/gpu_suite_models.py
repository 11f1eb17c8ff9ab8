"""Models, inputs and correctness checks of the GPU suite (``gpu_suite.py``).

The transformers reference and both visorlib models share one set of random weights:
transformers initialises them, and visorlib's own converter (:mod:`visorlib.models.llava_onevision.convert`, the one
``visorlib.from_pretrained`` runs on Hugging Face checkpoints) maps them to visorlib's names.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_suite_rows as rows  # noqa: E402 - the benchmark folder is not a package

import visorlib  # noqa: E402
from visorlib.hub import load_state_into  # noqa: E402
from visorlib.models.llava_onevision import LlavaOnevisionProcessor  # noqa: E402
from visorlib.models.llava_onevision.convert import config_from_hf, convert_llava_onevision_state  # noqa: E402
from visorlib.processing import anyres  # noqa: E402

VISOR_CARD = "visor-llava-ov-0.5b"
# The three configurations the issue names (paper appendix A; all in the card's list of 13).
CONFIGURATIONS = {"8CA-7SA": [1, 4, 7, 10, 16, 19, 22], "8CA-5SA": [1, 4, 7, 10, 16], "8CA-2SA": [1, 4]}
# Square image sides at real size (384-px tiles): 384 px -> 2 tiles, 1485 tokens; 1000 px -> 10 tiles, 7371.
IMAGE_SIDES = {"1485": 384, "7371": 1000}
NO_TRANSFORMERS = "skipped: transformers not installed (or --no-transformers)"

# ----------------------------------------------------------------------------------- models
def hf_config_for(cfg):
    """transformers' ``LlavaOnevisionConfig`` describing the same architecture as ``cfg``."""
    from transformers import LlavaOnevisionConfig

    d, v = cfg.decoder, cfg.vision
    return LlavaOnevisionConfig(
        text_config=dict(
            model_type="qwen2", vocab_size=d.vocab_size, hidden_size=d.hidden_size,
            intermediate_size=d.intermediate_size, num_hidden_layers=d.num_layers, num_attention_heads=d.num_heads,
            num_key_value_heads=d.num_kv_heads, rms_norm_eps=d.rms_norm_eps, tie_word_embeddings=d.tie_word_embeddings,
            max_position_embeddings=d.max_position_embeddings,
            rope_parameters={"rope_type": "default", "rope_theta": d.rope_theta},
        ),
        vision_config=dict(
            model_type="siglip_vision_model", hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
            num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads, image_size=v.image_size,
            patch_size=v.patch_size, layer_norm_eps=v.layer_norm_eps, vision_use_head=False,
        ),
        image_token_index=cfg.tokens.image_token_id, video_token_index=cfg.tokens.video_token_id,
        image_grid_pinpoints=cfg.processing.pinpoints(v.image_size),
        vision_aspect_ratio=cfg.processing.vision_aspect_ratio, projector_hidden_act=cfg.projector_act,
        tie_word_embeddings=d.tie_word_embeddings,
    )


def check_config_round_trip(hf_config, cfg) -> None:
    """visorlib's converter must read the transformers config back as ``cfg`` (else the parity is moot)."""
    back = config_from_hf(hf_config.to_dict(), "generated transformers config")
    problems = [f"decoder.{f.name}" for f in dataclasses.fields(cfg.decoder)
                if getattr(back.decoder, f.name) != getattr(cfg.decoder, f.name)]
    problems += [f"vision.{name}" for name in ("image_size", "patch_size", "hidden_size", "intermediate_size",
                                               "num_layers", "num_heads", "layer_norm_eps")
                 if getattr(back.vision, name) != getattr(cfg.vision, name)]
    if back.processing.pinpoints(cfg.vision.image_size) != cfg.processing.pinpoints(cfg.vision.image_size):
        problems.append("processing.grid_pinpoints")
    if problems:
        raise RuntimeError(f"transformers config does not round-trip through visorlib.models.llava_onevision.convert: {', '.join(problems)}")


def transformers_available() -> bool:
    """Whether transformers is installed (the suite still measures visorlib's rows without it)."""
    return importlib.util.find_spec("transformers") is not None


def build_models(smoke: bool, device: torch.device, seed: int = 0, with_transformers: bool = True):
    """transformers reference (fp32, SDPA), visorlib dense and VISOR, all with the same weights.

    transformers initialises the weights; :func:`convert_llava_onevision_state` (the converter
    ``visorlib.from_pretrained`` uses for Hugging Face checkpoints) maps them to visorlib's names;
    the VISOR model is the dense one plus blocks initialised from it (:func:`visorlib.visorize`).
    Without transformers (``with_transformers=False``) visorlib initialises the weights itself and
    the reference is None.
    """
    vcfg = visorlib.get_config(VISOR_CARD)
    vcfg = vcfg.tiny() if smoke else vcfg
    dense_cfg = dataclasses.replace(vcfg, visor=None, name=VISOR_CARD.replace("visor-", ""))
    torch.manual_seed(seed)
    hf = None
    if with_transformers:
        from transformers import LlavaOnevisionForConditionalGeneration

        hf_config = hf_config_for(dense_cfg)
        check_config_round_trip(hf_config, dense_cfg)
        with torch.device(device):
            hf = LlavaOnevisionForConditionalGeneration(hf_config).eval()
        hf.set_attn_implementation("sdpa")
        with torch.no_grad():  # as tests/hf_oracle.py: a swapped norm or bias must not hide behind ones/zeros
            for name, param in hf.named_parameters():
                if "norm" in name or name.endswith("bias"):
                    param.add_(torch.randn_like(param) * 0.1)
        state = convert_llava_onevision_state(hf.state_dict(), tied=dense_cfg.decoder.tie_word_embeddings)
    else:
        state = visorlib.zoo.instantiate(dense_cfg, device, torch.float32).state_dict()
    models = []
    for _ in range(2):  # dense, and the one visorize() turns into VISOR
        model = visorlib.zoo.instantiate(dense_cfg, "meta", torch.float32)
        load_state_into(model, state, "transformers reference weights")
        models.append(model.to(device).eval())
    dense, visor = models
    visor = visorlib.visorize(visor, vcfg.visor, warn=False).eval()
    for name, config in CONFIGURATIONS.items():
        if config not in visor.plan.configurations or visor.plan.describe(config) != name:
            raise RuntimeError(f"{VISOR_CARD}: configuration {name} {config} is not in the card's plan")
    return hf, dense, visor


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------- inputs
def image_side(cfg, label: str) -> int:
    """Image side for a visual-token label, scaled to the card's tile size (tiny cards: 30 px)."""
    return round(IMAGE_SIDES[label] * cfg.vision.image_size / 384)


def make_inputs(cfg, side: int, n_text: int, batch: int, device, dtype, seed: int = 0) -> dict:
    """One square image of ``side`` px and ``n_text`` random text ids around it, repeated ``batch`` times."""
    g = torch.Generator().manual_seed(seed)
    n_visual = LlavaOnevisionProcessor(cfg).num_image_tokens((side, side))
    tiles = anyres.num_tiles((side, side), cfg.processing.pinpoints(cfg.vision.image_size), cfg.vision.image_size)
    high = min(1000, cfg.decoder.vocab_size, cfg.tokens.image_token_id) - 8  # below every special id
    row = torch.cat([torch.randint(0, high, (n_text // 2,), generator=g),
                     torch.full((n_visual,), cfg.tokens.image_token_id),
                     torch.randint(0, high, (n_text - n_text // 2,), generator=g)])
    tile = cfg.vision.image_size
    return dict(
        input_ids=row.expand(batch, -1).clone().to(device),
        attention_mask=torch.ones(batch, len(row), dtype=torch.long, device=device),
        pixel_values=torch.randn(1, tiles, 3, tile, tile, generator=g).expand(batch, -1, -1, -1, -1).to(device, dtype),
        image_sizes=torch.tensor([[side, side]] * batch, device=device),
    )


def visual_tokens(cfg, side: int) -> tuple[int, int]:
    """``(visual tokens, tiles)`` of a square image of ``side`` px."""
    tiles = anyres.num_tiles((side, side), cfg.processing.pinpoints(cfg.vision.image_size), cfg.vision.image_size)
    return LlavaOnevisionProcessor(cfg).num_image_tokens((side, side)), tiles


# ----------------------------------------------------------------------------------- correctness
def logit_agreement(got: torch.Tensor, expected: torch.Tensor) -> dict:
    """Max and mean |delta| and top-1 agreement over all positions (compared in fp32)."""
    got, expected = got.float(), expected.float()
    delta = (got - expected).abs()
    return {"max_abs": float(delta.max()), "mean_abs": float(delta.mean()),
            "top1_agreement": float((got.argmax(-1) == expected.argmax(-1)).float().mean()),
            "reference_abs_mean": float(expected.abs().mean()), "positions": int(got.shape[0] * got.shape[1])}


def flash_available() -> bool:
    """Whether flash-attn is installed (checked without importing it)."""
    return importlib.util.find_spec("flash_attn") is not None


@torch.inference_mode()
def correctness_fp32(ctx) -> dict | str:
    """fp32 logits and greedy tokens, visorlib dense vs transformers, SDPA on both sides."""
    hf, dense, args = ctx["hf"], ctx["dense"], ctx["args"]
    if hf is None:
        return NO_TRANSFORMERS
    inputs = make_inputs(dense.cfg, image_side(dense.cfg, "1485"), args.text_tokens, 1, ctx["device"], torch.float32)
    expected = hf(**inputs).logits
    ctx["fp32_reference"] = (inputs, expected)
    result = {"inputs": "one 384-px image (1485 visual tokens at real size)" if not args.smoke else "tiny image",
              "logits_sdpa": logit_agreement(dense(**inputs).logits, expected)}
    steps = ctx["settings"]["greedy_steps"]
    want = hf.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, eos_token_id=None,
                       pad_token_id=0)
    got = dense.generate(**inputs, max_new_tokens=steps, eos_token_id=[])
    new_want, new_got = want[0, inputs["input_ids"].shape[1]:], got[0, inputs["input_ids"].shape[1]:]
    differ = (new_want != new_got).nonzero()
    # The timed decode loops themselves (gpu_suite_rows), fed the same tokens, compared per step.
    forced = want[:, inputs["input_ids"].shape[1]:]
    result["decode_path_logits"] = logit_agreement(
        rows.teacher_forced_logits(rows.VisorlibRow("dense", dense), inputs, forced),
        rows.teacher_forced_logits(rows.TransformersRow("transformers", hf), inputs, forced))
    result["greedy"] = {"steps": steps, "equal": bool(torch.equal(want, got)),
                        "first_difference": int(differ[0]) if len(differ) else None,
                        "distinct_tokens": len(set(new_want.tolist())),
                        "tokens_transformers": new_want.tolist(), "tokens_visorlib": new_got.tolist()}
    return result


def convert_dtype(ctx) -> None:
    """Cast every model to the measurement dtype (after the fp32 checks).

    transformers' rotary ``inv_freq`` buffers stay fp32, as ``from_pretrained(dtype=...)`` leaves
    them (a plain ``.to(bfloat16)`` would round them and shift every rotary angle at long positions).
    """
    dtype = ctx["dtype"]
    kept = {name: buf for name, buf in ctx["hf"].named_buffers() if buf.is_floating_point()} if ctx["hf"] else {}
    for key in ("hf", "dense", "visor"):
        ctx[key] = ctx[key].to(dtype) if ctx[key] is not None else None
    for name, buf in kept.items():
        owner, _, leaf = name.rpartition(".")
        ctx["hf"].get_submodule(owner)._buffers[leaf] = buf


@torch.inference_mode()
def correctness_dtype(ctx) -> dict | str:
    """``--dtype`` logits, visorlib vs transformers, SDPA and flash-attn; plus the dtype's own noise floor."""
    hf, dense, dtype = ctx["hf"], ctx["dense"], ctx["dtype"]
    if hf is None:
        return NO_TRANSFORMERS
    if "fp32_reference" not in ctx:
        return "skipped: needs the fp32 reference of correctness_fp32"
    inputs32, reference32 = ctx.pop("fp32_reference")
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs32.items()}
    expected = hf(**inputs).logits
    result = {"dtype": str(dtype).replace("torch.", ""), "sdpa": logit_agreement(dense(**inputs).logits, expected),
              "noise_floor_transformers_vs_its_fp32": logit_agreement(expected, reference32),
              "noise_floor_visorlib_vs_transformers_fp32": logit_agreement(dense(**inputs).logits, reference32)}
    if not flash_available():
        result["flash"] = "skipped: flash_attn not installed"
    elif ctx["device"].type != "cuda" or dtype == torch.float32:
        result["flash"] = "skipped: flash-attn needs CUDA and fp16/bf16"
    else:
        try:
            result["flash"] = flash_agreement(hf, dense, inputs)
        except Exception as err:  # noqa: BLE001 - keep the SDPA comparison whatever flash-attn does
            result["flash"] = f"error: {type(err).__name__}: {err}"
        finally:
            hf.set_attn_implementation("sdpa")
            dense.cfg.attn_implementation = "sdpa"
    return result


def flash_agreement(hf, dense, inputs: dict) -> dict:
    """Logits with flash-attn on both sides, and how often visorlib really called the flash kernel.

    visorlib uses flash-attn only where no explicit mask is needed and falls back to SDPA
    elsewhere, so the number of kernel calls says which path the comparison exercised.
    """
    import visorlib.modules.layers as layers

    kernel, calls = layers._flash_attn_func, [0]

    def counting(*args, **kwargs):
        calls[0] += 1
        return kernel(*args, **kwargs)

    hf.set_attn_implementation("flash_attention_2")
    dense.cfg.attn_implementation = "flash"
    layers._flash_attn_func = counting
    try:
        got = dense(**inputs).logits
    finally:
        layers._flash_attn_func = kernel
    entry = logit_agreement(got, hf(**inputs).logits)
    entry.update(flash_attn_version=importlib.metadata.version("flash_attn"), visorlib_flash_kernel_calls=calls[0])
    return entry
