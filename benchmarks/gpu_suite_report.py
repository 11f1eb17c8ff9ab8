"""The GPU suite's verdicts and its markdown table (``gpu_suite.py`` writes both beside its JSON)."""

from __future__ import annotations

# (name, threshold, what is compared) of the targets; each is read from the result JSON.
TARGETS = [
    ("VISOR 8CA-7SA LLM prefill at max batch, 7371 tokens: speedup / analytic FLOP ratio", 0.9),
    ("VISOR 8CA-2SA LLM prefill at max batch, 7371 tokens: speedup / analytic FLOP ratio", 0.9),
    ("visorlib dense end-to-end throughput / transformers (sdpa), 7371 tokens, max batch", 1.2),
    ("decode tokens/s at batch 32: VISOR 8CA-2SA / visorlib dense", 2.0),
    ("KV bytes per sample: visorlib dense / VISOR 8CA-2SA", 2.4),
]


def _row(table, label):
    if not isinstance(table, list):
        return None
    return next((r for r in table if r.get("row") == label), None)


def _target_values(result: dict) -> list:
    sections = result.get("sections", {})
    prefill = sections.get("prefill_7371") if isinstance(sections.get("prefill_7371"), dict) else {}
    llm, e2e = prefill.get("language_model"), prefill.get("end_to_end")
    decode = sections.get("decode") if isinstance(sections.get("decode"), dict) else {}
    batches = decode.get("batches", {})
    decode32 = batches.get("32") if not result.get("smoke") else batches.get(str(max(map(int, batches), default=0)))

    def get(table, label, key):
        row = _row(table, label)
        return None if row is None else row.get(key)

    kv_table = next((t for t in batches.values() if isinstance(t, list)), None)
    return [get(llm, "VISOR 8CA-7SA", "speedup_over_analytic"), get(llm, "VISOR 8CA-2SA", "speedup_over_analytic"),
            get(e2e, "visorlib dense", "throughput_vs_transformers"), get(decode32, "VISOR 8CA-2SA", "speedup"),
            get(kv_table, "VISOR 8CA-2SA", "kv_ratio")]


def targets(result: dict) -> list[dict]:
    """The issue's targets with the measured value and ``met`` / ``missed`` / ``unmeasured``.

    In smoke runs the values come from tiny models on the CPU and say nothing about the targets;
    they are computed anyway so the smoke test proves the wiring.
    """
    out = []
    for (name, threshold), value in zip(TARGETS, _target_values(result), strict=True):
        status = "unmeasured" if value is None else ("met" if value >= threshold else "missed")
        out.append({"target": name, "threshold": threshold, "value": value,
                    "status": status + (" (smoke: not meaningful)" if result.get("smoke") and value is not None else "")})
    return out


def _f(value, digits=3, suffix=""):
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}g}{suffix}"
    return f"{value}{suffix}"


def _mb(value):
    return "—" if value is None else f"{value / 2**20:.1f} MiB"


def _agreement(name, entry):
    if not isinstance(entry, dict):
        return f"| {name} | {entry} | | |"
    return f"| {name} | {_f(entry['max_abs'])} | {_f(entry['mean_abs'])} | {_f(entry['top1_agreement'], 4)} |"


def markdown(result: dict) -> str:
    """The result as markdown tables, one per section (skipped and failed sections say so)."""
    env, s = result["environment"], result["sections"]
    lines = [f"# GPU suite{' (smoke: tiny models, numbers not meaningful)' if result['smoke'] else ''}", "",
             f"Device: {env.get('device')} · driver {env.get('driver', '—')} · torch {env['torch']} "
             f"(CUDA {env.get('cuda_runtime')}) · transformers {env['transformers'] or 'not installed'} · flash-attn "
             f"{env.get('flash_attn') or 'not installed'} · dtype {result['settings']['dtype']} · "
             f"{result.get('elapsed_s', 0):.0f} s in all", ""]
    missing = [f"- `{name}`: {value if isinstance(value, str) else value['error']}" for name, value in s.items()
               if isinstance(value, str) or (isinstance(value, dict) and "error" in value)]
    if missing:
        lines += ["## Sections not measured in this run", "", *missing, ""]
    if isinstance(s.get("correctness_fp32"), dict) and "logits_sdpa" in s["correctness_fp32"]:
        c32, cd = s["correctness_fp32"], s.get("correctness_dtype")
        lines += ["## Correctness: visorlib vs transformers, same weights", "",
                  "| comparison | max abs Δ | mean abs Δ | top-1 agreement |", "|---|---|---|---|",
                  _agreement("fp32, SDPA, prefill (all positions)", c32["logits_sdpa"]),
                  _agreement("fp32, SDPA, the timed decode loops (teacher-forced steps)", c32["decode_path_logits"])]
        if isinstance(cd, dict) and "sdpa" in cd:
            lines += [_agreement(f"{cd['dtype']}, SDPA", cd["sdpa"]), _agreement(f"{cd['dtype']}, flash-attn", cd["flash"]),
                      _agreement(f"noise floor: transformers {cd['dtype']} vs its fp32",
                                 cd["noise_floor_transformers_vs_its_fp32"])]
        g = c32["greedy"]
        lines += ["", f"Greedy fp32, {g['steps']} steps: tokens equal = **{g['equal']}**"
                  + ("" if g["equal"] else f" (first difference at step {g['first_difference']})"), ""]
    for key in ("prefill_7371", "prefill_1485"):
        section = s.get(key)
        if not isinstance(section, dict) or "visual_tokens" not in section:
            continue
        for mode in ("language_model", "end_to_end"):
            table = section.get(mode)
            title = f"## Prefill, {section['visual_tokens']} visual tokens, {mode.replace('_', ' ')}"
            if not isinstance(table, list):
                lines += [title, "", f"**{table}**", ""]
                continue
            lines += [title, "", "| row | batch-1 s | max batch (search stopped by) | s at max | samples/s | "
                      "speedup b1 | speedup max | analytic FLOP ratio | speedup / analytic | vs transformers |",
                      "|---|---|---|---|---|---|---|---|---|---|"]
            for r in table:
                if "samples_per_s" not in r:
                    lines.append(f"| {r['row']} | {r.get('status', '—')} | | | | | | | | |")
                    continue
                lines.append(
                    f"| {r['row']} | {_f(r['batch1_seconds'])} | {r['max_batch']} ({r['search']['stopped_by']}) | "
                    f"{_f(r['max_batch_seconds'])} | {_f(r['samples_per_s'])} | {_f(r.get('speedup_batch1'), suffix='×')} | "
                    f"{_f(r.get('speedup_max_batch'), suffix='×')} | {_f(r.get('analytic_flop_ratio'), suffix='×')} | "
                    f"{_f(r.get('speedup_over_analytic'))} | {_f(r.get('throughput_vs_transformers'), suffix='×')} |")
            lines.append("")
    decode = s.get("decode")
    if isinstance(decode, dict) and "batches" in decode:
        lines += [f"## Decode after a {decode['prefix_visual_tokens']}-visual-token prefix ({decode['steps']} steps a round)",
                  "", "| row | batch | tokens/s | ms/step | speedup | analytic decode-FLOP ratio | KV/sample | "
                  "KV ratio (analytic) | peak extra memory |", "|---|---|---|---|---|---|---|---|---|"]
        for batch, table in decode["batches"].items():
            if not isinstance(table, list):
                lines.append(f"| all | {batch} | {table} | | | | | | |")
                continue
            for r in table:
                if "tokens_per_s" not in r:
                    lines.append(f"| {r['row']} | {batch} | {r.get('status', '—')} | | | | | | |")
                    continue
                lines.append(
                    f"| {r['row']} | {batch} | {_f(r['tokens_per_s'])} | {_f(r['ms_per_step'])} | {_f(r.get('speedup'), suffix='×')} | "
                    f"{_f(r['analytic_decode_flop_ratio'], suffix='×')} | {_mb(r['kv_bytes_per_sample'])} | "
                    f"{_f(r.get('kv_ratio'), suffix='×')} ({_f(r['analytic_kv_ratio'], suffix='×')}) | {_mb(r['peak_extra_bytes'])} |")
        lines.append("")
    mixed = s.get("mixed")
    if isinstance(mixed, dict) and "times" in mixed:
        lines += [f"## Mixed configurations, batch {mixed['batch']} at {mixed['visual_tokens']} visual tokens "
                  f"({', '.join(mixed['configurations'])})", "", "| strategy | LLM seconds (median) | min |", "|---|---|---|"]
        lines += [f"| {k} | {_f(v['seconds'])} | {_f(v['seconds_min'])} |" for k, v in mixed["times"].items()]
        lines += ["", f"gather / group = {_f(mixed['gather_over_group'])}; max |Δ logits| = "
                  f"{_f(mixed['max_abs_logit_difference'])}", ""]
    profile = s.get("profile")
    if isinstance(profile, dict) and "error" not in profile:
        lines += ["## Profile (language model, batch 1, top ops by self time)", ""]
        for label, entry in profile.items():
            top = ", ".join(f"{t['name']} {t['self_ms']:.2f} ms" for t in entry["top"][:5])
            lines.append(f"- **{label}**: {top}")
        lines.append("")
    lines += ["## Targets", "", "| target | threshold | value | status |", "|---|---|---|---|"]
    lines += [f"| {t['target']} | {t['threshold']} | {_f(t['value'])} | {t['status']} |" for t in result.get("targets", [])]
    return "\n".join(lines) + "\n"
