"""Render a benchmark result (run.run's dict) as a Markdown table and a tokens/s plot."""

from __future__ import annotations

from typing import Any

_NAMES = {"llama_cpp": "llama.cpp", "hf": "HF transformers"}


def _f(x: Any, fmt: str = "{:.1f}") -> str:
    return "—" if x is None else fmt.format(x)


def markdown(res: dict[str, Any]) -> str:
    j, mach, peers = res["jaxinfer"], res["machine"], res.get("peers", {})
    cfg, model = res["config"], res["model"]
    live = {k: v for k, v in peers.items() if "skipped" not in v}
    cols = ["jaxinfer", *(_NAMES[k] for k in live)]
    rows: list[tuple[str, list[str]]] = []

    def peer(fn, fmt="{:.1f}"):
        return [_f(fn(v), fmt) for v in live.values()]

    b = j["batches"]
    b1 = b.get("1", {})
    rows.append(("batch-1 decode tok/s", [_f(b1.get("decode_tps", {}).get("median"))]
                 + peer(lambda v: v["summary"]["decode_tps"])))
    rows.append(("batch-1 decode tok/s, streaming", [_f(j["stream"]["decode_tps"]["median"])]
                 + ["—"] * len(live)))
    rows.append(("warm TTFT ms (streaming)", [_f(j["stream"]["ttft_s"]["median"] * 1e3)]
                 + peer(lambda v: v["summary"]["ttft_s"] * 1e3)))
    rows.append(("inter-token ms p50 / p90",
                 [f"{_f(j['stream']['itl_ms_p50'])} / {_f(j['stream']['itl_ms_p90'])}"]
                 + [f"{_f(v['summary']['itl_ms_p50'])} / {_f(v['summary']['itl_ms_p90'])}"
                    for v in live.values()]))
    for bs, x in b.items():
        rows.append((f"batch-{bs} throughput tok/s (incl. prefill)",
                     [_f(x["throughput_tps"]["median"])]
                     + peer(lambda v, bs=bs: v["batches"].get(bs, {}).get("throughput_tps"))))
    for bs, x in b.items():
        rows.append((f"batch-{bs} MBU", [_f(x["mbu"] * 100, "{:.0f}%")] + ["—"] * len(live)))
    if "engine" in j:
        e = j["engine"]
        val = e["error"] if "error" in e else _f(e["throughput_tps"]["median"])
        rows.append((f"engine, {e['batch']} slots, tok/s", [val] + ["—"] * len(live)))
    cs = res.get("cold_start")
    if cs and "error" in cs:
        rows.append(("cold start", [cs["error"]] + ["—"] * len(live)))
    elif cs:
        rows.append(("cold start s (process to 1st token)", [_f(cs["cold"]["total_s"], "{:.2f}")]
                     + ["—"] * len(live)))
        rows.append(("warm restart s (persistent cache)",
                     [_f(cs["warm_restart"]["total_s"], "{:.2f}")] + ["—"] * len(live)))
    rows.append(("compiles in warm-up (count / s)",
                 [f"{j['warmup_compiles']['count']} / {j['warmup_compiles']['seconds']:.1f}"]
                 + ["—"] * len(live)))
    rows.append(("compiles after warm-up", [str(j["steady_compiles"]["count"])]
                 + ["—"] * len(live)))
    mem = j["memory"]
    rows.append(("peak host RSS MiB", [_f(mem["host_peak_rss_bytes"] / 2**20, "{:.0f}")]
                 + peer(lambda v: v["host_peak_rss_bytes"] / 2**20, "{:.0f}")))
    if mem.get("device_peak_bytes"):
        rows.append(("peak device MiB", [_f(mem["device_peak_bytes"] / 2**20, "{:.0f}")]
                     + ["—"] * len(live)))
    q = f", {model['quantize']} weights" if model.get("quantize") else ""
    lines = [f"Model {model['name']} ({model['params'] / 1e6:.0f}M params, {model['dtype']}{q}, "
             f"attention {model['impl']}); prompt {cfg['prompt_len']}, {cfg['max_new_tokens']} "
             f"new tokens, {cfg['repeats']} repeats (medians). {mach['device']} "
             f"({mach['cpu']}, {mach['cores']} cores), jax {mach['jax']}, commit "
             f"{mach['commit']}, load average {mach['loadavg_start']:.1f} -> "
             f"{mach.get('loadavg_end', float('nan')):.1f}; copy bandwidth "
             f"{res['copy_bandwidth_Bps'] / 1e9:.1f} GB/s.", "",
             "| | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(vals) + " |" for name, vals in rows]
    for k, v in peers.items():
        if "skipped" in v:
            lines.append(f"\n{_NAMES[k]}: skipped ({v['skipped']}).")
    if "speculative" in res:
        from jaxinfer.bench.speculative import markdown as spec_markdown

        lines += spec_markdown(res["speculative"])
    r = res.get("ratios", {})
    ratio_txt = ", ".join(f"{k} = {v:.2f}" for k, v in r.items()
                          if isinstance(v, float) and k != "stream_vs_loop_b1")
    if ratio_txt:
        lines.append(f"\nRatios: {ratio_txt}.")
    if r.get("goals"):
        lines.append("Goals: " + ", ".join(f"{k}: {'met' if v else 'NOT met'}"
                                          for k, v in r["goals"].items()) + ".")
    return "\n".join(lines) + "\n"


def plot(res: dict[str, Any], path: str) -> None:
    """Tokens/s against batch size for jaxinfer and every peer that ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    j, peers = res["jaxinfer"], res.get("peers", {})
    bs = sorted(int(b) for b in j["batches"])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(bs, [j["batches"][str(b)]["throughput_tps"]["median"] for b in bs], "o-",
            label="jaxinfer (incl. prefill)")
    ax.plot(bs, [j["batches"][str(b)]["decode_tps"]["median"] for b in bs], "o--",
            label="jaxinfer decode only")
    hf = peers.get("hf", {})
    if "skipped" not in hf and hf:
        pts = [(1, hf["summary"]["decode_tps"])] + [
            (int(b), v["throughput_tps"]) for b, v in hf["batches"].items()]
        ax.plot(*zip(*sorted(pts), strict=True), "s-", label="HF transformers")
    lc = peers.get("llama_cpp", {})
    if "skipped" not in lc and lc:
        ax.axhline(lc["summary"]["decode_tps"], color="gray", ls=":",
                   label="llama.cpp single stream")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("tokens / s")
    q = res["model"].get("quantize") or res["model"]["dtype"]
    ax.set_title(f"{res['model']['name']} {q} on {res['machine']['device']}")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
