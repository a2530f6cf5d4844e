"""Figures (PNG, matplotlib) and ``EVIDENCE.md`` from an evidence run's ``results.json``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from trainer.runlog import read_metrics
from world.summary import baseline_check, paired_runs, treatment


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def untrained(res: dict) -> set[str]:
    """The lambda = 1 arms whose objective did not train by the protocol's rule (v3): they
    enter no comparison, no effect table and no plot of effects."""
    arms = (res.get("summary") or {}).get("arms")
    if arms is None:
        arms = treatment(res) if res.get("protocol", {}).get("criterion_tau") else []
    return {a["arm"] for a in arms if a["trained"] is False}


def figures(res: dict, out: Path, test_dir: Path, work: Path) -> list[Path]:
    out_ = [precision_figure(res, out / "precision.png"),
            alignment_curve_figure(res, out / "alignment_curve.png"),
            answers_figure(res, out / "answers.png"),
            scene_figure(res, out / "scene.png", test_dir, work)]
    if any(r.get("stage2_curve") for r in res["runs"]):
        out_.append(learning_curve_figure(res, out / "learning_curve.png"))
    return out_


def learning_curve_figure(res: dict, path: Path) -> Path:
    """Stage-2 accuracy (training format) against the stage's progress, per arm: mean over
    seeds, one colour per arm in every panel, the majority answer dashed."""
    plt = _plt()
    types = ["color", "background", "count", "exists", "all"]
    fig, axes = plt.subplots(1, len(types), figsize=(17, 3.6), sharey=True)
    arms: dict[str, list[dict]] = {}
    skip = untrained(res)
    for r in res["runs"]:
        if r.get("stage2_curve") and r["arm"] not in skip:
            arms.setdefault(r["arm"], []).append(r)
    for j, (arm, runs) in enumerate(arms.items()):
        for ax, t in zip(axes, types, strict=True):
            xs = [c["step"] / max(1, runs[0]["stage2_steps"]) for c in runs[0]["stage2_curve"]]
            ys = np.nanmean([[c.get(t, np.nan) for c in r["stage2_curve"]] for r in runs], axis=0)
            ax.plot(xs, ys, color=f"C{j}", marker="o", ms=3, label=arm)
    for ax, t in zip(axes, types, strict=True):
        if t in res.get("answer_chance", {}):
            ax.axhline(res["answer_chance"][t], color="k", ls="--", lw=1)
        ax.set_title(t)
        ax.set_xlabel("stage-2 progress")
        ax.set_ylim(0, 1)
    axes[0].set_ylabel(f"exact match (mean of {len(res['protocol']['seeds'])} seeds)")
    axes[-1].legend(fontsize=7, loc="lower right")
    fig.suptitle("Stage 2: held-out accuracy in the training format (dashed: majority answer)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def precision_figure(res: dict, path: Path) -> Path:
    plt = _plt()
    table = res["label_precision"]
    modes = list(table)
    keys = ("top1_precision", "precision_at_n", "dominant_recall")
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    for ax, lst in zip(axes, ("full", "world"), strict=True):
        x = np.arange(len(modes))
        for j, k in enumerate(keys):
            v = [table[m][lst][k]["value"] for m in modes]
            lo = [v[i] - table[m][lst][k]["ci95"][0] for i, m in enumerate(modes)]
            hi = [table[m][lst][k]["ci95"][1] - v[i] for i, m in enumerate(modes)]
            ax.bar(x + (j - 1) * 0.26, v, 0.26, yerr=[lo, hi], capsize=2, label=k.replace("_", " "))
            ch = [table[m][lst][f"chance_{k}"]["value"] for m in modes]
            ax.scatter(x + (j - 1) * 0.26, ch, marker="_", color="k", s=120, zorder=3,
                       label="chance" if j == 0 else None)
        ax.set_xticks(x, modes)
        n = table[modes[0]][lst]["wordlist_size"]
        ax.set_title(f"word list: {'2of12' if lst == 'full' else 'world vocabulary'} ({n} words)")
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("share (95 % bootstrap CI)")
    axes[0].legend(fontsize=8, loc="upper left")
    fig.suptitle("Label precision against the ground truth, per mode (held-out scenes)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def alignment_curve_figure(res: dict, path: Path) -> Path:
    """eval-align (the trainer's periodic held-out evaluation) over stage-1 steps."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    colours = {}
    for run in res["runs"]:
        lines = read_metrics(Path(run["stage1_dir"]) / "metrics.jsonl")
        ev = [x for x in lines if x.get("kind") == "eval" and x.get("in_labels") is not None]
        if not ev:
            continue
        c = colours.setdefault(run["arm"], f"C{len(colours)}")
        for ax, k in zip(axes, ("mean_cos_top1", "in_labels"), strict=True):
            ax.plot([x["step"] for x in ev], [x[k] for x in ev], color=c, alpha=0.8,
                    label=run["arm"] if run["seed"] == res["protocol"]["seeds"][0] else None)
    for ax, k in zip(axes, ("mean_cos_top1", "in_labels"), strict=True):
        ax.set_xlabel("stage-1 step")
        ax.set_ylabel(k)
        ax.set_title(f"eval-align {k} (held-out images of the training labels; all seeds)",
                     fontsize=9)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summarise(res: dict) -> dict:
    """Per arm: mean and standard deviation over seeds of every stage-1 and stage-2 figure."""
    arms: dict[str, list[dict]] = {}
    for r in res["runs"]:
        arms.setdefault(r["arm"], []).append(r)
    out = {}
    for arm, runs in arms.items():
        vals: dict[str, list[float]] = {}

        def add(k, v, vals=vals):
            if v is not None:
                vals.setdefault(k, []).append(float(v))

        for r in runs:
            for k in ("truth_match_full", "truth_match_world", "truth_match_balanced", "hub_share"):
                add(k, r["alignment_truth"].get(k))
            for t, a in r.get("answers_from_tokens", {}).items():
                add(f"answers_from_tokens.{t}", a["accuracy"])
            for k, v in r.items():
                if k.startswith("eval_align_") and isinstance(v, dict):
                    add(f"{k}.top1_match", v.get("top1_match"))
                    add(f"{k}.in_labels", v.get("in_labels"))
            add("caption_loss", r["caption_loss"])
            for t, a in r.get("answers", {}).items():  # none for an arm stopped after stage 1
                add(f"answers.{t}", a["accuracy"])
        out[arm] = {k: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
                        "n": len(v)} for k, v in vals.items()}
    return out


def answers_figure(res: dict, path: Path) -> Path:
    plt = _plt()
    summ = summarise(res)
    types = [t for t in res["answer_chance"] if t != "all"] + ["all"]
    arms = [a for a in summ if a not in untrained(res)]
    fig, ax = plt.subplots(figsize=(11, 3.8))
    x = np.arange(len(types))
    w = 0.8 / max(1, len(arms))
    for j, arm in enumerate(arms):
        m = [summ[arm].get(f"answers.{t}", {}).get("mean", np.nan) for t in types]
        s = [summ[arm].get(f"answers.{t}", {}).get("std", 0) for t in types]
        ax.bar(x + (j - (len(arms) - 1) / 2) * w, m, w, yerr=s, capsize=2, label=arm)
    ax.scatter(x, [res["answer_chance"][t] for t in types], marker="_", s=300, color="k",
               zorder=3, label="majority answer (chance)")
    ax.set_xticks(x, types)
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"exact match (mean ± sd over {len(res['protocol']['seeds'])} seeds)")
    ax.set_title("Held-out answer accuracy after stage 2")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def scene_figure(res: dict, path: Path, test_dir: Path, work: Path, index: int = 0) -> Path:
    """One held-out scene as the encoder saw it, twice: per patch the dominant true word
    (black) and the best mode's top-1 label (green when true at the patch, red when not),
    searching the full 2of12 list (left) and the world's words (right)."""
    from PIL import Image

    from wordlist import load_wordlist
    from world.metrics import read_labels
    from world.scenes import VOCAB, read_truth

    plt = _plt()
    truth = read_truth(test_dir / "ground_truth.jsonl")
    key = sorted(truth)[index]
    t = truth[key]
    img = Image.open(test_dir / "images" / key).convert("RGB")
    (rw, rh), (left, top), s = t["crop"]["resized"], t["crop"]["offset"], t["crop"]["image_size"]
    img = img.resize((rw, rh), Image.BICUBIC).crop((left, top, left + s, top + s))
    gh, gw = t["grid"]
    fig, axes = plt.subplots(1, 2, figsize=(14, 7.4))
    for ax, (lst, words) in zip(axes, (("full", load_wordlist().words), ("world", VOCAB)), strict=True):
        _, labels = read_labels(work / "shards" / f"test-{res['best_mode']}-{lst}")
        ids = labels[key][0]
        ax.imshow(img, extent=(0, gw, gh, 0))
        for p in range(gh * gw):
            r, c = divmod(p, gw)
            top1 = words[int(ids[p, 0])] if ids[p, 0] != 65535 else "-"
            ok = top1 in t["true_words"][p]
            ax.text(c + 0.5, r + 0.32, t["dominant"][p], ha="center", va="center", fontsize=6,
                    color="white", bbox={"facecolor": "black", "alpha": 0.55, "pad": 1, "lw": 0})
            ax.text(c + 0.5, r + 0.7, top1, ha="center", va="center", fontsize=6, color="white",
                    bbox={"facecolor": "green" if ok else "red", "alpha": 0.7, "pad": 1, "lw": 0})
        for k in range(1, gw):
            ax.axvline(k, color="white", lw=0.5, alpha=0.6)
        for k in range(1, gh):
            ax.axhline(k, color="white", lw=0.5, alpha=0.6)
        ax.set_axis_off()
        ax.set_title(f"{'2of12 list' if lst == 'full' else 'world words'}: top-1 label "
                     f"({res['best_mode']})", fontsize=10)
    fig.suptitle(f"{key}: dominant true word (black) / top-1 label (green: true at the patch)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

def _f(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and np.isnan(x)):
        return "-"
    if 0 < abs(x) < 10 ** -digits:
        return f"{x:.1e}"
    return f"{x:.{digits}f}"


def _ci(d: dict) -> str:
    return f"{_f(d['value'])} ({_f(d['ci95'][0])}-{_f(d['ci95'][1])})"


def precision_table(res: dict, lst: str) -> list[str]:
    rows = ["| mode | top-1 precision | chance | precision@n | chance | dominant recall | chance | no-label share |",
            "|---|---|---|---|---|---|---|---|"]
    for mode, v in res["label_precision"].items():
        m = v[lst]
        rows.append(f"| `{mode}` | {_ci(m['top1_precision'])} | {_f(m['chance_top1_precision']['value'])} "
                    f"| {_ci(m['precision_at_n'])} | {_f(m['chance_precision_at_n']['value'])} "
                    f"| {_ci(m['dominant_recall'])} | {_f(m['chance_dominant_recall']['value'])} "
                    f"| {_f(m['no_label_share']['value'])} |")
    return rows


def effect_table(res: dict) -> list[str]:
    summ = summarise(res)
    any_run = res["runs"][0]
    ev = sorted(k for k in any_run if k.startswith("eval_align_"))
    head = (["arm", "truth match (2of12)", "truth match (world)", "balanced truth match (world)",
             "hub share", "answers from the tokens (all)"]
            + [f"eval-align top-1 vs `{k[len('eval_align_'):]}` labels" for k in ev]
            + ["held-out caption loss", "answer accuracy (all)",
               "L_a first → last 5 steps (ln pairs), final tau"])
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def ms(arm, k):
        d = summ[arm].get(k)
        return "-" if d is None else f"{_f(d['mean'])} ± {_f(d['std'])}"

    la = _align_loss_summary(res)
    skip = untrained(res)
    for arm in summ:
        cells = [arm + (" (**did not train**)" if arm in skip else ""), ms(arm, "truth_match_full"),
                 ms(arm, "truth_match_world"), ms(arm, "truth_match_balanced"), ms(arm, "hub_share"),
                 ms(arm, "answers_from_tokens.all")]
        cells += [ms(arm, f"{k}.top1_match") for k in ev]
        cells += [ms(arm, "caption_loss"), ms(arm, "answers.all"), la.get(arm, "-")]
        rows.append("| " + " | ".join(cells) + " |")
    t = any_run["alignment_truth"]
    ans = _f(res["answer_chance"]["all"]) + " (majority answer)" if "answer_chance" in res else "-"
    rows.append(f"| chance | {_f(t['chance_full'])} | {_f(t['chance_world'])} | "
                f"{_f(t.get('chance_balanced', np.nan))} | | | "
                + " | ".join("" for _ in ev) + f" | | {ans} | |")
    return rows


def _align_loss_summary(res: dict) -> dict:
    """Per arm (first seed): mean L_a over the first and the last 5 stage-1 steps, ln of the
    mean number of pairs (a loss that has learnt nothing), and the final temperature."""
    out = {}
    for r in res["runs"]:
        if r["weight"] <= 0 or r["arm"] in out:
            continue
        path = Path(r["stage1_dir"]) / "metrics.jsonl"
        if not path.is_file():
            continue
        tr = read_metrics(path)
        tr = [x for x in tr if x.get("kind") == "train"]
        if len(tr) < 2:
            continue
        first = np.mean([x["align_loss"] for x in tr[:5]])
        last = np.mean([x["align_loss"] for x in tr[-5:]])
        pairs = np.mean([x["pairs"] for x in tr])
        out[r["arm"]] = f"{first:.2f} → {last:.2f} ({np.log(pairs):.2f}), {tr[-1].get('tau', float('nan')):.3f}"
    return out


def answers_table(res: dict, key: str = "answers", title: str | None = None) -> list[str]:
    types = [t for t in res["answer_chance"] if t != "all"] + ["all"]
    arms: dict[str, list[dict]] = {}
    for r in res["runs"]:
        if key in r:
            arms.setdefault(r["arm"], []).append(r)
    if not arms:
        return []
    rows = ([title, ""] if title else []) + ["| arm | " + " | ".join(types) + " |",
                                             "|---|" + "---|" * len(types)]
    for arm, runs in arms.items():
        cells = []
        for t in types:
            v = [r[key][t]["accuracy"] for r in runs if t in r[key]]
            cells.append(f"{_f(np.mean(v))} ± {_f(np.std(v, ddof=1) if len(v) > 1 else 0.0)}"
                         if v else "-")
        rows.append(f"| {arm} | " + " | ".join(cells) + " |")
    rows.append("| majority answer (chance) | " + " | ".join(_f(res["answer_chance"][t]) for t in types) + " |")
    return rows + [""]


def baseline_lines(res: dict) -> list[str]:
    """Whether the comparison can tell: the lambda = 0 model against the majority answer and
    against itself without the image (protocol v2's precondition)."""
    summ = res.get("summary")
    if not summ or not summ.get("baseline_final"):
        return []
    chk = baseline_check(summ)
    b, maj = summ["baseline_final"], summ["majority"]
    lines = ["Can this comparison tell? The lambda = 0 arm (main LM, mean over seeds, training "
             "format) against the majority answer and its blind controls:", "",
             "| | " + " | ".join(maj) + " |", "|---|" + "---|" * len(maj),
             "| lambda = 0 | " + " | ".join(_f(b.get(t, np.nan)) for t in maj) + " |"]
    for name, label in (("blind_final", "same model, image zeroed"),
                        ("blind_swap_final", "same model, another scene's image")):
        if summ.get(name):
            lines.append(f"| {label} | " + " | ".join(_f(summ[name].get(t, np.nan)) for t in maj) + " |")
    lines.append("| majority answer | " + " | ".join(_f(maj[t]) for t in maj) + " |")
    sees = "yes" if chk["sees"] else "no"
    blind = all(chk[n]["at_chance"] for n in ("blind_final", "blind_swap_final") if summ.get(n))
    lines += ["", f"Baseline sees (background >= 0.9 after stage 2; protocol v2's colour >= 0.8 is "
              f"withdrawn: the world's CLIP does not carry shape in a patch): **{sees}** (background "
              f"{_f(chk['background'])}, colour {_f(chk['colour'])}); blind controls at most "
              f"0.05 above the majority answer: **{'yes' if blind else 'no'}**."]
    return lines


def treatment_lines(res: dict) -> list[str]:
    """Was the treatment delivered? Protocol v3's rule per lambda = 1 arm (world/summary.py)."""
    arms = (res.get("summary") or {}).get("arms") or []
    if not arms:
        return []
    tau = res["protocol"].get("criterion_tau")
    rows = [f"Did SEA's objective train? Held-out L_a (the test scenes' labels of the arm, pairs "
            f"drawn from one seed, tau = {tau}) of lambda = 0 minus lambda = 1, paired by seed; "
            f"an arm trained when that difference exceeds its standard deviation over seeds and "
            f"the trainer's chance watcher stayed silent in every seed (rule fixed in the "
            f"protocol). An arm that did not train enters no comparison below.", "",
            "| arm | trained | L_a(lambda=0) - L_a(lambda=1) | sd over seeds | lambda = 1's L_a (ln pairs) | watcher fired |",
            "|---|---|---|---|---|---|"]
    for a in arms:
        c = a["criterion"]
        if c is None:
            rows.append(f"| {a['arm']} | - | - | - | - | - |")
            continue
        rows.append(f"| {a['arm']} | **{'yes' if a['trained'] else 'did not train'}** | "
                    f"{c['heldout_align_lambda0_minus_lambda1']:+.3f} | {c['sd_over_seeds']:.3f} | "
                    f"{c['lambda1_heldout_align']:.3f} ({c['chance']:.3f}) | "
                    f"{c['watcher_fired']} of {c['seeds']} |")
    return rows + [""]


def primary_lines(res: dict) -> list[str]:
    prim = (res.get("summary") or {}).get("primary") or []
    skip = untrained(res)
    if not prim:
        return []
    arm = prim[0]["arm"]
    if arm in skip:
        return [f"Primary endpoints: the primary arm (`{arm}`) **did not train**; no primary "
                "endpoint is reported.", ""]
    rows = [f"Primary endpoints, `{arm}` minus lambda = 0, paired by seed (mean difference, "
            "95 % t interval; no correction for multiplicity):", "",
            "| endpoint | difference | seeds | role |", "|---|---|---|---|"]
    for e in prim:
        rows.append(f"| {e['endpoint']} | {_diff(e)} | {e['seeds']} | {e.get('role', 'primary')} |")
    return rows + [""]


def lm_context_lines(res: dict) -> list[str]:
    """Does the LM answer from its context (text only)? SEA's premise is an LLM that reads."""
    lines = []
    for name in ("lm", "lm_small"):
        rc = (res.get(name) or {}).get("reads_context")
        if not rc:
            continue
        types = [t for t in rc["caption"] if t != "all"] + ["all"]
        maj = res.get("answer_chance", {})
        lines += [f"Does the {'main' if name == 'lm' else 'small'} LM answer from its context? Each "
                  "held-out question after its scene's caption, and alone (text only, greedy, "
                  "exact match):", "", "| context | " + " | ".join(types) + " |",
                  "|---|" + "---|" * len(types)]
        for c, label in (("caption", "caption, then the question"), ("none", "the question alone")):
            lines.append(f"| {label} | " + " | ".join(_f(rc[c][t]["accuracy"]) for t in types) + " |")
        if maj:
            lines.append("| majority answer | " + " | ".join(_f(maj.get(t, np.nan)) for t in types) + " |")
        lines.append("")
    return lines


def _diff(e: dict | None) -> str:
    if e is None:
        return "-"
    if e["ci_low"] is None:
        return f"{e['mean_diff']:+.3f} (1 seed: no interval)"
    return f"{e['mean_diff']:+.3f} [{e['ci_low']:+.3f}, {e['ci_high']:+.3f}]"


def effect_lines(res: dict) -> list[str]:
    """SEA's effect, paired by seed against lambda = 0 of the same LM, 95 % t intervals."""
    eff = (res.get("summary") or {}).get("sea_effect") or []
    if not eff:
        return []
    skip = untrained(res)
    eff = [e for e in eff if e["arm"] not in skip]
    if not eff:
        return ["No lambda = 1 arm trained: nothing is said here about SEA's effect."]
    keep = ("truth_match_balanced", "answers_from_tokens.all", "curve_area.all", "truth_match_world",
            "hub_share", "caption_loss", "answers.all", "answers.color", "curve_area.color")
    rows = ["SEA's effect, each lambda = 1 arm minus lambda = 0 of the same LM, paired by seed "
            "(mean difference and 95 % t interval over seeds; `curve_area`: mean accuracy over "
            "stage 2, the area under its learning curve):", "",
            "| arm | " + " | ".join(keep) + " |", "|---|" + "---|" * len(keep)]
    by_arm: dict[str, dict] = {}
    for e in eff:
        by_arm.setdefault(e["arm"], {})[e["metric"]] = e
    for arm, m in by_arm.items():
        rows.append(f"| {arm} | " + " | ".join(_diff(m.get(k)) for k in keep) + " |")
    return rows


def markdown(res: dict, command: str, figures_dir: str) -> str:
    p, c, m = res["protocol"], res["clip"], res["machine"]
    zs = "; ".join(f"{fam} {_f(v['accuracy'])} (chance {_f(v['chance'])})" for fam, v in c["zero_shot"].items())
    lines = [
        "# Evidence: label precision and SEA's effect in a world with known truth", "",
        f"Produced by `{command}` in {res['total_seconds'] / 60:.1f} min on {m['cpus']} CPU cores "
        f"(GPU: {m['gpu'] or 'none'}; {m['platform']}, torch {m['torch']}). Every figure here is in "
        f"`results.json`; the protocol was fixed before lambda = 1 was compared with lambda = 0"
        + (f" (`{res['protocol_file']}`, sha256 `{res['summary']['protocol_sha256']}`). "
           if res.get("protocol_file") else ". ")
        + (f"It reused {res['reused_runs']} of the {len(res['runs'])} training runs from an earlier "
           f"invocation with the same settings (the resumable protocol); the stage-1 and stage-2 "
           f"training of all runs took {sum(r['stage1_seconds'] + r.get('stage2_seconds', 0) for r in res['runs']) / 60:.0f} min in all. "
           if res.get("reused_runs") else "")
        + "Step times: " + ", ".join(f"{k} {v:.0f} s" for k, v in res["timings_s"].items())
        + f" (the CLIP's and the LM's training took {c['train_seconds']:.0f} s and "
        f"{res['lm']['train_seconds']:.0f} s when they were made; a run that finds them in the "
        f"cache loads them).", "",
        "## The world and its models", "",
        f"- Scenes: {p['train_scenes']} for the CLIP and the LM, the first {p['mllm_scenes']} of "
        f"them for stages 1 and 2, {p['test_scenes']} held out (other scene "
        f"indices, same generator); grid {res['world']['grid'][0]}x{res['world']['grid'][1]} "
        f"after the encoder's resize and crop; {len(res['world']['vocab'])} patch words "
        f"(shapes, backgrounds, colours, patterns, sizes), a word true at a patch when its region "
        f"covers >= {res['world']['min_area']:.0%} of it. Ground truth: `ground_truth.jsonl` "
        f"(format in the README).",
        f"- CLIP trained from scratch on image-caption pairs only ({c['spec']['steps']} steps, "
        f"batch {c['spec']['batch_size']}, final loss {_f(c['final_loss'])}, {c['train_seconds']:.0f} s). "
        f"Zero-shot on held-out scenes (best word of the family present in the scene): {zs}.",
        f"- LM: Llama architecture, {res['lm']['spec']['hidden']} wide, {res['lm']['spec']['layers']} "
        f"layers, trained on {res['lm']['sentences']} world texts"
        + (" (its sentences and one document per scene: the caption, then its questions with "
           "their answers)" if res['lm']['spec'].get('scene_documents') else "")
        + f" ({res['lm']['spec']['steps']} steps, final loss {_f(res['lm']['final_loss'])})"
        + (f"; the small LM: {res['lm_small']['spec']['hidden']} wide, "
           f"{res['lm_small']['spec']['layers']} layers, final loss {_f(res['lm_small']['final_loss'])}."
           if res.get("lm_small") else "."),
        "", "## Label precision per mode (held-out scenes, 95 % bootstrap CI over images)", "",
        f"Extraction: the real pipeline (`run.runner={p['runner']}`), top n = {p['top_n']}, "
        f"scores <= 0 dropped, surgery over the last {p['surgery_depth']} blocks.", "",
        "Full 2of12 list (41,241 words):", "", *precision_table(res, "full"), "",
        f"World vocabulary only ({len(res['world']['vocab'])} words, `labels.wordlist`):", "",
        *precision_table(res, "world"), "",
        f"Best mode by the fixed criterion (top-1 precision, {p.get('label_list', 'full')} list): "
        f"**`{res['best_mode']}`**"
        + (f" (on the full list: `{res['best_mode_by_list']['full']}`)." if res.get("best_mode_by_list") else "."),
        "", "![precision](evidence/precision.png)", "",
        "## SEA's effect (mean ± sd over seeds " + ", ".join(map(str, p["seeds"]))
        + (f"; secondary arms: seeds {', '.join(map(str, p['secondary_seeds']))}" if p.get("secondary_seeds") else "")
        + ")", "",
        f"Stage 1: {p['stage1_epochs']} epochs, lr {p['stage1_lr']}, global batch {p['global_batch']}"
        + (f", the temperature at {p['tau_lr_scale']:g}x lr" if p.get("tau_lr_scale") else "")
        + (f", each patch's top {p['train_top_k']} label(s) unless the arm says otherwise"
           if p.get("train_top_k") else "") + "; "
        f"stage 2 from {_stage2_arms(res)}: {p['stage2_epochs']} epochs, lr {p['stage2_lr']}, "
        "LLM + adapter. "
        "Truth match: share of held-out visual tokens whose nearest word (Eq. 8 features, cosine) "
        "is true at the patch, searching the 2of12 list or the world's words. eval-align: the "
        "trainer's own figure (nearest word over the arm's label list equals the patch's top-1 label).", "",
        *lm_context_lines(res),
        *treatment_lines(res),
        *effect_table(res), "",
        *primary_lines(res),
        *comparisons(res), "",
        *baseline_lines(res), "",
        "Answer accuracy per question type after stage 2, training format (each held-out "
        "question inside its conversation, earlier turns with their true answers; exact match):", "",
        *answers_table(res), "",
        *answers_table(res, "answers_alone", "Asked alone, as the first turn (a format stage 2 "
                                             "never trained; reported for comparison):"),
        *effect_lines(res), "",
        *(["![learning curve](evidence/learning_curve.png)", ""]
          if any(r.get("stage2_curve") for r in res["runs"]) else []),
        "![alignment](evidence/alignment_curve.png)", "", "![answers](evidence/answers.png)", "",
        "![scene](evidence/scene.png)", "",
    ]
    return "\n".join(lines).replace("evidence/", figures_dir.rstrip("/") + "/")


def _stage2_arms(res: dict) -> str:
    """Which arms went on to stage 2, as the runs say (the protocol's stage2_arms)."""
    arms = list(dict.fromkeys(r["arm"] for r in res["runs"]))
    later = [a for a in arms if any(r["arm"] == a and "stage2_steps" in r for r in res["runs"])]
    if len(later) == len(arms):
        return "every run"
    return "; ".join(f"`{a}`" for a in later) + " (the other arms are measured after stage 1)"


def comparisons(res: dict) -> list[str]:
    """Each lambda = 1 arm minus lambda = 0 of the same LM, paired by seed (same data order
    and init); answers only where both runs went on to stage 2."""
    out = ["Paired by seed, lambda = 1 minus lambda = 0 of the same LM (mean, and the per-seed "
           "range):", ""]
    skip = untrained(res)
    for arm, pairs in paired_runs(res).items():
        if arm in skip:
            continue
        parts = []
        for name, get in (("truth match (world)", lambda r: r["alignment_truth"]["truth_match_world"]),
                          ("truth match (2of12)", lambda r: r["alignment_truth"]["truth_match_full"]),
                          ("caption loss", lambda r: r["caption_loss"]),
                          ("answer accuracy", lambda r: r["answers"]["all"]["accuracy"])):
            if name == "answer accuracy" and not all("answers" in a and "answers" in b for a, b in pairs):
                continue  # an arm measured after stage 1 only
            d = [get(a) - get(b) for a, b in pairs]
            parts.append(f"{name} {np.mean(d):+.3f} [{min(d):+.3f}, {max(d):+.3f}]")
        out.append(f"- {arm}: " + "; ".join(parts))
    return out
