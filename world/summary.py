"""The evidence's numbers for machines and for the report: SEA's effect paired by seed with
95 % intervals, the stage-2 learning curves and their areas, the baseline and blind checks.

Pairing: each lambda = 1 arm against the lambda = 0 arm of the same LM, seed by seed (the
same data order and initialisation); the interval is Student's t over the per-seed
differences (a null result with its interval is a result)."""

from __future__ import annotations

import math

import numpy as np

# two-sided 95 % quantiles of Student's t by degrees of freedom (beyond: the normal's)
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262, 10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def t95(df: int) -> float:
    if df <= 0:
        return math.nan
    return _T95.get(df) or next((v for k, v in sorted(_T95.items()) if k >= df), 1.96)


def mean_ci(values: list[float]) -> dict:
    """Mean and its 95 % t interval; no interval (None) from a single value."""
    v = np.asarray(values, dtype=float)
    m = float(v.mean())
    if len(v) < 2:
        return {"mean": m, "ci_low": None, "ci_high": None, "n": len(v)}
    half = t95(len(v) - 1) * float(v.std(ddof=1)) / math.sqrt(len(v))
    return {"mean": m, "ci_low": m - half, "ci_high": m + half, "n": len(v)}


def curve_area(curve: list[dict], key: str = "all") -> float:
    """Area under accuracy against the stage's progress (0 .. 1), trapezoids: the mean
    accuracy over stage 2, higher when the model learns to see sooner."""
    pts = sorted((c["step"], c[key]) for c in curve if key in c)
    if len(pts) < 2:
        return math.nan
    x = np.array([p[0] for p in pts], dtype=float)
    y = np.array([p[1] for p in pts], dtype=float)
    x = x / x[-1]
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2))


def _metrics(run: dict, types: list[str]) -> dict[str, float]:
    t = run["alignment_truth"]
    out = {"truth_match_world": t["truth_match_world"], "truth_match_full": t["truth_match_full"],
           "caption_loss": run["caption_loss"]}
    for k in ("truth_match_balanced", "hub_share"):
        if k in t:
            out[k] = t[k]
    for k, a in run.get("answers_from_tokens", {}).items():
        out[f"answers_from_tokens.{k}"] = a["accuracy"]
    if "answers" in run:
        for t in types + ["all"]:
            if t in run["answers"]:
                out[f"answers.{t}"] = run["answers"][t]["accuracy"]
    for t in types + ["all"]:
        if run.get("stage2_curve"):
            out[f"curve_area.{t}"] = curve_area(run["stage2_curve"], t)
    return out


def paired_runs(res: dict) -> dict[str, list[tuple[dict, dict]]]:
    """Per lambda = 1 arm, its runs each with the lambda = 0 run of the same LM and seed."""
    base = {(r.get("lm", "main"), r["seed"]): r for r in res["runs"] if r["weight"] == 0}
    arms: dict[str, list[tuple[dict, dict]]] = {}
    for r in res["runs"]:
        b = base.get((r.get("lm", "main"), r["seed"]))
        if r["weight"] > 0 and b is not None:
            arms.setdefault(r["arm"], []).append((r, b))
    return arms


def sea_effect(res: dict) -> list[dict]:
    """Every lambda = 1 arm minus the lambda = 0 arm of its LM, paired by seed."""
    types = [t for t in res.get("answer_chance", {}) if t != "all"]
    out = []
    for arm, pairs in paired_runs(res).items():
        per = [(_metrics(r, types), _metrics(b, types)) for r, b in pairs]
        for k in per[0][0]:
            d = [a[k] - b[k] for a, b in per if k in a and k in b and not
                 (math.isnan(a[k]) or math.isnan(b[k]))]
            if d:
                ci = mean_ci(d)
                out.append({"arm": arm, "metric": k, "mean_diff": ci["mean"], "ci_low": ci["ci_low"],
                            "ci_high": ci["ci_high"], "seeds": ci["n"]})
    return out


def _mean_answers(runs: list[dict], key) -> dict:
    acc: dict[str, list[float]] = {}
    for r in runs:
        for t, a in key(r).items():
            acc.setdefault(t, []).append(a["accuracy"])
    return {t: float(np.mean(v)) for t, v in acc.items()}


# Protocol v3's primary endpoints: (a) token alignment after stage 1 that a hub word cannot
# win by frequency alone, (b) the questions answered from the visual tokens after stage 1
# (the LM frozen), (c) the area under the stage-2 learning curve, all questions and per type
PRIMARY_ENDPOINTS = ("truth_match_balanced", "answers_from_tokens.all", "curve_area.all")
# endpoints a protocol file demoted, with its reason (v3: evidence/protocol-v3.json, "analysis")
DEMOTED = {3: {"answers_from_tokens.all": "secondary: the world's LM does not answer from a "
                                          "text context (sizing), so it cannot read the tokens"}}


def treatment(res: dict) -> list[dict]:
    """Protocol v3's rule, per lambda = 1 arm: did its objective train? Trained when, paired
    by seed with lambda = 0 of its LM on the same held-out pairs at the same temperature
    (``heldout_align``), L_a is lower by more than the seeds' spread (mean difference >
    the standard deviation of the per-seed differences; with one seed: > 0), and the
    trainer's chance watcher stayed silent in every seed. Endpoints are not used."""
    out = []
    for arm, pairs in paired_runs(res).items():
        r0 = pairs[0][0]
        key = next(iter(r0.get("heldout_align", {})), None)
        d = [b["heldout_align"][key]["loss"] - r["heldout_align"][key]["loss"] for r, b in pairs
             if key is not None and key in b.get("heldout_align", {})
             and r["heldout_align"][key]["loss"] is not None]
        fired = sum(bool(r.get("align_at_chance")) for r, _ in pairs)
        if not d:
            out.append({"arm": arm, "trained": None, "criterion": None})
            continue
        mean = float(np.mean(d))
        sd = float(np.std(d, ddof=1)) if len(d) > 1 else 0.0
        trained = bool(mean > sd and mean > 0 and fired == 0)
        out.append({"arm": arm, "trained": trained,
                    "criterion": {"labels": key, "heldout_align_lambda0_minus_lambda1": mean,
                                  "sd_over_seeds": sd, "seeds": len(d), "watcher_fired": fired,
                                  "lambda1_heldout_align": float(np.mean(
                                      [r["heldout_align"][key]["loss"] for r, _ in pairs])),
                                  "chance": pairs[0][0]["heldout_align"][key]["chance"],
                                  "tau": pairs[0][0]["heldout_align"][key].get("tau")}})
    return out


def primary(res: dict, effects: list[dict]) -> list[dict]:
    """The primary endpoints of the primary lambda = 1 arm (the one that goes on to stage 2)
    against lambda = 0, paired by seed, with their 95 % t intervals."""
    arms = {r["arm"] for r in res["runs"] if r.get("primary") and r["weight"] > 0 and r.get("lm", "main") == "main"}
    types = [t for t in res.get("answer_chance", {}) if t != "all"]
    want = set(PRIMARY_ENDPOINTS) | {f"curve_area.{t}" for t in types}
    demoted = DEMOTED.get(res["protocol"].get("version", 2), {})
    return [{"endpoint": e["metric"], "arm": e["arm"], "mean_diff": e["mean_diff"],
             "ci_low": e["ci_low"], "ci_high": e["ci_high"], "seeds": e["seeds"],
             "role": demoted.get(e["metric"], "primary")}
            for e in effects if e["arm"] in arms and e["metric"] in want]


def machine_summary(res: dict, protocol_sha256: str | None) -> dict:
    """``results.json``'s ``summary``: what a script needs to tell whether the evidence can
    tell (baseline and blind against the majority answer) and what it found."""
    base = [r for r in res["runs"] if r["weight"] == 0 and r.get("lm", "main") == "main"
            and "answers" in r]
    out = {"seeds": len(res["protocol"]["seeds"]), "majority": res.get("answer_chance"),
           "baseline_final": _mean_answers(base, lambda r: r["answers"]) if base else None,
           "baseline_final_alone": _mean_answers(base, lambda r: r["answers_alone"])
           if base and all("answers_alone" in r for r in base) else None,
           "blind_final": None, "blind_swap_final": None,
           "sea_effect": sea_effect(res), "total_seconds": res.get("total_seconds"),
           "protocol_sha256": protocol_sha256,
           "protocol_version": res["protocol"].get("version", 2)}
    out["arms"] = treatment(res)
    out["primary"] = primary(res, out["sea_effect"])
    blind = [r for r in base if "blind" in r]
    if blind:
        out["blind_final"] = _mean_answers(blind, lambda r: r["blind"]["zero"])
        out["blind_swap_final"] = _mean_answers(blind, lambda r: r["blind"]["swap"])
    return out


def baseline_check(summary: dict, background: float = 0.9, blind_margin: float = 0.05) -> dict:
    """The precondition: the lambda = 0 model sees (background >= 0.9 after stage 2 in the
    training format) and the blind controls stay within 0.05 of the majority answer. Protocol
    v2's colour >= 0.8 is withdrawn in v3: the world's CLIP does not carry an object's shape in
    a single patch (docs/evidence-notes.md), so colour-of-a-shape questions have a ceiling."""
    b, maj = summary.get("baseline_final") or {}, summary.get("majority") or {}
    out = {"colour": b.get("color"), "background": b.get("background"),
           "sees": bool(b) and b.get("background", 0) >= background}
    for name in ("blind_final", "blind_swap_final"):
        bl = summary.get(name) or {}
        gaps = {t: bl[t] - maj[t] for t in bl if t in maj}
        out[name] = {"max_gap_over_majority": max(gaps.values()) if gaps else None,
                     "at_chance": bool(gaps) and max(gaps.values()) <= blind_margin}
    return out
